# syntax=docker/dockerfile:1
#
# livepipe in a container: the binary, built from this checkout, on a slim
# Debian with nothing else (docs/operations.md, Container).
#
#   docker build -t livepipe .
#   docker run --rm -p 8080:8080 livepipe          # the embedded demo
#
# The default command is the embedded demo with HTTP on 0.0.0.0:8080, so
# that the published port reaches it. Any other run takes its flags as the
# command, or from LIVEPIPE_* variables (docker run -e LIVEPIPE_BROKERS=...)
# or a mounted --config file.

# ---- build -------------------------------------------------------------------
# librdkafka, OpenSSL (ssl-vendored), zlib (libz-static), zstd and SQLite
# (bundled) are compiled from source by their crates: the image needs a C/C++
# toolchain, make and perl (OpenSSL's configure), which rust:1-bookworm
# already has; no -dev packages of system libraries are linked.
FROM rust:1-bookworm AS builder
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential perl \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Cargo.lock pins every dependency (--locked). The caches keep the registry
# and the compiled dependencies between builds (BuildKit); the binary is
# copied out of the cached target directory.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin livepipe \
    && install -m 755 target/release/livepipe /usr/local/bin/livepipe

# ---- run ---------------------------------------------------------------------
# The binary links only libc, libm and libgcc_s (all in the base image);
# ca-certificates for Kafka over TLS (-X ssl.ca.location=probe, or
# /etc/ssl/certs/ca-certificates.crt).
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --create-home \
       --home-dir /var/lib/livepipe --shell /usr/sbin/nologin livepipe \
    && install -d -o livepipe -g livepipe -m 750 /var/lib/livepipe/out
COPY --from=builder /usr/local/bin/livepipe /usr/local/bin/livepipe
USER livepipe
# Outputs go to ./out, i.e. /var/lib/livepipe/out: mount a volume there (or
# give --out) to keep billing files and the ledger. The directory exists and
# is the user's, so that a new named volume mounted there is writable.
WORKDIR /var/lib/livepipe
# A container's log is read by a collector, not a terminal.
ENV NO_COLOR=1
EXPOSE 8080
ENTRYPOINT ["livepipe"]
CMD ["run", "--http", "0.0.0.0:8080"]
