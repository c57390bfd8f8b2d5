#!/usr/bin/env bash
# Start an N-process livepipe cluster on this machine: one hostfile on
# loopback ports, every process with the same flags, each logging to a file
# of its own. For trying cluster mode out; a real cluster runs one process
# per machine (docs/operations.md, "Running as a cluster").
#
#   deploy/local-cluster.sh --input events.jsonl
#   N=3 WORKERS=2 deploy/local-cluster.sh --brokers 127.0.0.1:9092 --topic livestream-events
#
# Environment (defaults in brackets):
#   N          processes [2]
#   WORKERS    timely worker threads per process [1]
#   BASE_PORT  process i listens for its peers on BASE_PORT+i [7400]
#   HTTP_PORT  process i serves HTTP on 127.0.0.1:HTTP_PORT+i [8080]
#   OUT        the --out every process shares [./out-cluster]
#   LIVEPIPE   the binary [target/release/livepipe]
#   SECRET_FILE  the --cluster-secret-file every process gets [a new random
#              secret in a temporary directory, removed when the script ends]
# The arguments are passed to every process: the source (--brokers/--topic
# or --input), -X properties, the billing rules. --out, --workers, --http
# and the cluster flags are set here.
#
# Process 0 writes the billing outputs at the top of $OUT, process i > 0
# its dead letters under $OUT/process-i/; logs go to $OUT/process-i.log,
# the hostfile is $OUT/hosts. Ctrl-C or SIGTERM stops every process
# gracefully (a second one ends them at once, as with one process). Exits
# with the worst exit code of the processes: 0 when all exited 0.
set -euo pipefail

N=${N:-2}
WORKERS=${WORKERS:-1}
BASE_PORT=${BASE_PORT:-7400}
HTTP_PORT=${HTTP_PORT:-8080}
OUT=${OUT:-./out-cluster}
LIVEPIPE=${LIVEPIPE:-target/release/livepipe}
SECRET_FILE=${SECRET_FILE:-}

die() {
    echo "local-cluster: $*" >&2
    exit 2
}

for var in N WORKERS BASE_PORT HTTP_PORT; do
    [[ ${!var} =~ ^[1-9][0-9]*$ ]] || die "$var must be a positive integer, not '${!var}'"
done
((BASE_PORT + N <= 65536)) || die "BASE_PORT + N is past port 65535"
((HTTP_PORT + N <= 65536)) || die "HTTP_PORT + N is past port 65535"
[[ -x $LIVEPIPE ]] || die "no executable at LIVEPIPE=$LIVEPIPE (cargo build --release, or set LIVEPIPE)"
[[ -z $SECRET_FILE || -r $SECRET_FILE ]] || die "cannot read SECRET_FILE=$SECRET_FILE"

has_source=0
for arg in "$@"; do
    case $arg in
    --out | --out=*) die "set OUT=DIR instead of passing --out" ;;
    --workers | --workers=*) die "set WORKERS=N instead of passing --workers" ;;
    --http | --http=*) die "HTTP ports are HTTP_PORT+i; set HTTP_PORT instead of passing --http" ;;
    --processes | --processes=* | --process | --process=* | --hostfile | --hostfile=*)
        die "$arg is set by this script (use N=...)" ;;
    --cluster-secret-file | --cluster-secret-file=*)
        die "set SECRET_FILE=FILE instead of passing --cluster-secret-file" ;;
    --brokers | --brokers=* | --input | --input=*) has_source=1 ;;
    esac
done
# Without a source every process would start a demo broker of its own.
((has_source)) || die "usage: [N=2] [WORKERS=1] $0 (--brokers HOST:PORT --topic T | --input FILE...) [livepipe run flags]"

mkdir -p "$OUT"
hostfile=$OUT/hosts
{
    echo "# written by local-cluster.sh: line i is process i"
    for ((i = 0; i < N; i++)); do
        echo "127.0.0.1:$((BASE_PORT + i))"
    done
} >"$hostfile"

# The secret every process must prove it holds to join: a fresh one per
# run unless SECRET_FILE names one, readable by this user only, and never
# in $OUT (which may be shared or copied).
if [[ -z $SECRET_FILE ]]; then
    secret_dir=$(mktemp -d)
    trap 'rm -rf "$secret_dir"' EXIT
    SECRET_FILE=$secret_dir/cluster-secret
    (
        umask 077
        head -c 32 /dev/urandom | base64 >"$SECRET_FILE"
    )
fi

pids=()
stopping=0
# SIGINT and SIGTERM both stop livepipe gracefully; both are passed on as
# SIGTERM, which a background process cannot have inherited as ignored.
# shellcheck disable=SC2317  # called by the traps
stop() {
    stopping=1
    echo "local-cluster: SIG$1, stopping ${#pids[@]} processes" >&2
    for pid in "${pids[@]}"; do
        kill -s TERM "$pid" 2>/dev/null || true
    done
}
trap 'stop INT' INT
trap 'stop TERM' TERM

for ((i = 0; i < N; i++)); do
    # setsid: a process group of its own, so that a Ctrl-C on the terminal
    # reaches the processes once, through stop(), and not also directly
    # (a second signal would end them at once). NO_COLOR: plain log files.
    NO_COLOR=1 setsid "$LIVEPIPE" run \
        --processes "$N" --process "$i" --hostfile "$hostfile" \
        --cluster-secret-file "$SECRET_FILE" \
        --workers "$WORKERS" --out "$OUT" --http "127.0.0.1:$((HTTP_PORT + i))" \
        "$@" >"$OUT/process-$i.log" 2>&1 &
    pids+=("$!")
done

echo "local-cluster: $N processes x $WORKERS workers, hostfile $hostfile, logs $OUT/process-*.log"
echo "local-cluster: dashboard http://127.0.0.1:$HTTP_PORT/ (process 0); billing output in $OUT/billing/"
for ((i = 1; i < N; i++)); do
    echo "local-cluster: process $i: http://127.0.0.1:$((HTTP_PORT + i))/metrics, dead letters in $OUT/process-$i/"
done

# Wait for all. bash reaps a finished child at once (kill -0 then fails)
# and keeps its status for `wait PID`. When one fails, the others are
# stopped (once: a second signal would end them at once) rather than left
# retrying for --cluster-timeout.
worst=0
left=$N
status=()
while ((left > 0)); do
    for ((i = 0; i < N; i++)); do
        if [[ -n ${status[i]:-} ]] || kill -0 "${pids[i]}" 2>/dev/null; then
            continue
        fi
        rc=0
        wait "${pids[i]}" || rc=$?
        status[i]=$rc
        left=$((left - 1))
        if ((rc == 0)); then
            echo "local-cluster: process $i exited 0"
            continue
        fi
        echo "local-cluster: process $i exited $rc; the end of $OUT/process-$i.log:" >&2
        tail -n 5 "$OUT/process-$i.log" | sed 's/^/    /' >&2
        if ((!stopping && left > 0)); then
            stopping=1
            echo "local-cluster: stopping the others" >&2
            for ((j = 0; j < N; j++)); do
                if [[ -z ${status[j]:-} ]]; then
                    kill -s TERM "${pids[j]}" 2>/dev/null || true
                fi
            done
        fi
        if ((rc > worst)); then
            worst=$rc
        fi
    done
    if ((left > 0)); then
        sleep 0.2 || true # a Ctrl-C ends the sleep too
    fi
done
exit "$worst"
