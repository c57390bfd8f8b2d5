//! The live sink's HTTP side: dashboard, JSON API, Server-Sent Events,
//! `/metrics` and `/healthz` (docs/contract.md, Live path).
//!
//! The server runs on a thread of its own with its own tokio runtime, so the
//! dataflow's workers never run (or wait on) HTTP work. The only thing the
//! two share is the [`LiveBoard`]'s watch channel: workers replace the
//! board without waiting, handlers read the newest one or are woken when
//! it changes. A slow or stuck client therefore costs its own connection,
//! never a tick.
//!
//! | route | |
//! |---|---|
//! | `GET /` | the dashboard (one self-contained page) |
//! | `GET /api/live?limit=N` | latest snapshots, most viewers first (500 without `limit`) |
//! | `GET /api/live/{stream_id}` | one stream's latest snapshot, or a JSON 404 |
//! | `GET /api/live/{stream_id}/events` | SSE, one `snapshot` event per tick |
//! | `GET /api/live/{stream_id}/history` | the stream's last 5 minutes of snapshots, oldest first ([`crate::history`]) |
//! | `GET /api/board/events` | SSE, per tick a `totals` event, then a `board` event (the top 500) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while the paths the job runs run (`--paths`), 503 with the reason otherwise |
//!
//! `HEAD` is served wherever `GET` is; `{stream_id}` is one percent-encoded
//! path segment (`%2F` for `/`, UTF-8 bytes for the rest).
//!
//! # Facing a hostile client
//!
//! The port may be reachable from a network (the Kubernetes deployment
//! binds `0.0.0.0`), so the connections are driven here, with hyper, not by
//! warp's own server loop, which has neither of the first two bounds:
//!
//! * at most [`MAX_CONNECTIONS`] connections at once (half the open-file
//!   limit when that is lower, so that a flood never takes the descriptors
//!   billing needs); a connection beyond the cap is closed at once;
//! * a request head must arrive complete within [`HEADER_READ_TIMEOUT`],
//!   and an idle keep-alive connection is closed after as long (a request
//!   in flight, like an SSE stream, is not idle); heads are at most
//!   [`MAX_HEAD_BYTES`] (431 beyond, hyper's answer);
//! * every response says `X-Content-Type-Options: nosniff`, the page comes
//!   with a `Content-Security-Policy` that lets only its own inline script
//!   and style run (by hash) and talk only to its own origin, and forbids
//!   framing; the rest is `Cache-Control: no-store`;
//! * with `--http-allowed-hosts`, a request naming another host gets 421
//!   (DNS rebinding: a hostile page whose name resolves to this address
//!   sends its own name as `Host`).
//! * with `--http-token-file`, every route but `/healthz` wants the token,
//!   as `Authorization: Bearer TOKEN` or as `?access_token=TOKEN` (the
//!   page's `EventSource` cannot set headers); without it a request gets
//!   401 and `WWW-Authenticate: Bearer`. The token is compared in constant
//!   time and never logged.

use base64::prelude::{Engine, BASE64_STANDARD};
use futures_util::{Stream, StreamExt};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use livepipe_dataflow::live::Snapshot;
use livepipe_dataflow::time::wall_clock_ms;
use percent_encoding::percent_decode_str;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, watch, Semaphore};
use warp::filters::path::FullPath;
use warp::http::header::{self, HeaderValue};
use warp::http::uri::Authority;
use warp::http::StatusCode;
use warp::sse::Event;
use warp::{Filter, Rejection, Reply};

use std::convert::Infallible;
use std::io;
use std::net::{IpAddr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use crate::history::History;
use crate::live::{Board, LiveBoard};
use crate::metrics::JobMetrics;

const DASHBOARD: &str = include_str!("dashboard.html");
/// The page's `Content-Security-Policy`, with the hashes of its inline
/// script and style (computed from the page, so that they cannot drift).
static DASHBOARD_CSP: LazyLock<HeaderValue> = LazyLock::new(|| {
    HeaderValue::from_str(&page_csp(DASHBOARD)).expect("the CSP is a valid header value")
});

/// At most this many connections at once (see [`max_connections`]).
pub const MAX_CONNECTIONS: usize = 4096;
/// A request head must be complete this long after the connection opened
/// or went idle; an idle keep-alive connection is closed after as long.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest request head read (hyper answers 431 beyond), so that
/// [`MAX_CONNECTIONS`] slow heads hold at most 256 MiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// How long accepting pauses after an error (out of file descriptors).
const ACCEPT_PAUSE: Duration = Duration::from_secs(1);

/// At most this many SSE connections at once; more get a 503, so that a
/// flood of idle clients cannot exhaust the process's sockets.
pub const MAX_SSE_CLIENTS: usize = 2048;
/// Keep-alive comments on idle SSE connections.
const KEEP_ALIVE: Duration = Duration::from_secs(15);
/// `/healthz` calls the live path stalled when no tick came for this long.
const TICK_STALE: Duration = Duration::from_secs(5);
/// Board updates within this window are one tick (workers tick a few ms
/// apart and each publishes its own streams).
const BOARD_SETTLE: Duration = Duration::from_millis(50);

/// What the handlers read.
#[derive(Clone)]
pub struct HttpState {
    pub board: LiveBoard,
    pub metrics: JobMetrics,
    /// Serve the dashboard and the live API. In a cluster only process 0
    /// has the live board; the others serve `/healthz` and `/metrics`.
    pub dashboard: bool,
    /// The job runs the live path (not `--paths billing`): `/healthz`
    /// then wants its ticks; without it, the dashboard is not served.
    pub live_path: bool,
    /// The job runs the billing path (not `--paths live`).
    pub billing_path: bool,
    /// `--http-allowed-hosts`: when not empty, a request whose `Host` (port
    /// stripped) is none of these names gets 421. An IP address as `Host`
    /// is always served (DNS rebinding needs a name), and so is
    /// `/healthz` (probes name the pod's address).
    pub allowed_hosts: Vec<String>,
    /// `--http-token-file`: when set, every route but `/healthz` wants this
    /// bearer token (see [`token_check`]).
    pub token: Option<Token>,
}

/// The bearer token of `--http-token-file`. Its `Debug` shows none of it,
/// so that no log line or panic message about a struct holding it (the
/// job's settings) can leak it.
#[derive(Clone)]
pub struct Token(Arc<str>);

impl Token {
    pub fn new(token: &str) -> Token {
        Token(Arc::from(token))
    }

    /// Whether `given` is the token. Constant time in the contents (a
    /// timing difference at the first wrong byte would let a client guess
    /// the token byte by byte); only the length can leak, which says little
    /// about a random token.
    fn matches(&self, given: &str) -> bool {
        use subtle::ConstantTimeEq;
        bool::from(self.0.as_bytes().ct_eq(given.as_bytes()))
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(<redacted>)")
    }
}

/// A running server; stopped on drop.
pub struct HttpServer {
    addr: SocketAddr,
    runtime: Option<tokio::runtime::Runtime>,
}

impl HttpServer {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        // Not a graceful shutdown: SSE connections never end on their own,
        // and a stopping job has nothing more to tell them.
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

/// Binds `addr` now, so that a port in use is an error before the job
/// starts (`127.0.0.1:0` picks a free port).
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let listener = TcpListener::bind(addr)?;
    listener.set_nonblocking(true)?;
    Ok(listener)
}

/// Serves on `listener` from a runtime of its own (one thread) until the
/// server is dropped.
pub fn serve(listener: TcpListener, state: HttpState) -> io::Result<HttpServer> {
    let addr = listener.local_addr()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("http")
        .enable_all()
        .build()?;
    let listener = {
        let _entered = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    let max = max_connections();
    tracing::info!(
        max_connections = max,
        "HTTP: at most {max} open connections; request heads within {} s",
        HEADER_READ_TIMEOUT.as_secs()
    );
    let history = History::default();
    if state.dashboard {
        runtime.spawn(history.clone().follow(state.board.clone()));
    }
    runtime.spawn(accept(listener, routes(state, history), max));
    Ok(HttpServer {
        addr,
        runtime: Some(runtime),
    })
}

/// [`MAX_CONNECTIONS`], or half the process's open-file limit if that is
/// lower: the other half stays for billing's files, the ledger and the
/// brokers, which a flood of connections must not starve.
fn max_connections() -> usize {
    #[cfg(unix)]
    {
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit only writes the struct it is given.
        if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
            let half = usize::try_from(limit.rlim_cur / 2).unwrap_or(usize::MAX);
            return MAX_CONNECTIONS.min(half).max(1);
        }
    }
    MAX_CONNECTIONS
}

/// Accepts connections and serves each with hyper's HTTP/1 (warp's filter
/// as the service), at most `max` at once: one beyond is closed at once,
/// before a byte is read, so that the cap costs nothing to hit.
async fn accept<F>(listener: tokio::net::TcpListener, routes: F, max: usize)
where
    F: Filter<Extract = (warp::reply::Response,), Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    F::Future: Send,
{
    let permits = Arc::new(Semaphore::new(max));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES);
    // Warn once per episode of refusals, not once per refused connection.
    let mut refusing = false;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // A connection gone before it was accepted: that one only.
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::ConnectionAborted
                        | io::ErrorKind::ConnectionReset
                        | io::ErrorKind::ConnectionRefused
                ) =>
            {
                continue;
            }
            Err(err) => {
                // Out of file descriptors or memory: retrying at once
                // would spin.
                tracing::warn!(%err, "HTTP: accepting a connection failed");
                tokio::time::sleep(ACCEPT_PAUSE).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            if !refusing {
                tracing::warn!("HTTP: {max} connections open; closing new ones until some end");
                refusing = true;
            }
            drop(stream);
            continue;
        };
        refusing = false;
        let service = TowerToHyperService::new(warp::service(routes.clone()));
        let connection = http.serve_connection(TokioIo::new(stream), service);
        tokio::spawn(async move {
            let _permit = permit;
            if let Err(err) = connection.await {
                // Timeouts, resets and malformed heads: the client's problem.
                tracing::debug!(%err, "HTTP connection ended");
            }
        });
    }
}

#[derive(Deserialize)]
struct LiveQuery {
    limit: Option<usize>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    stream_id: Option<&'a str>,
}

fn json_error(status: StatusCode, error: &str, stream_id: Option<&str>) -> warp::reply::Response {
    warp::reply::with_status(warp::reply::json(&ErrorBody { error, stream_id }), status)
        .into_response()
}

/// A `{stream_id}` path segment, percent-decoded; `None` if the bytes are
/// not UTF-8 (see [`not_utf8`]).
fn stream_id(segment: &str) -> Option<String> {
    percent_decode_str(segment)
        .decode_utf8()
        .ok()
        .map(|id| id.into_owned())
}

fn not_utf8() -> warp::reply::Response {
    json_error(
        StatusCode::BAD_REQUEST,
        "the stream id is not UTF-8 once percent-decoded",
        None,
    )
}

/// A request to a host not in `--http-allowed-hosts`.
#[derive(Debug)]
struct HostNotAllowed;

impl warp::reject::Reject for HostNotAllowed {}

/// A host as compared: lowercase, without a trailing dot or IPv6 brackets.
fn normal_host(host: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(ip) => ip.to_string(),
        None => host,
    }
}

/// Whether a request naming `host` (no port) is served: an IP address
/// always (a rebinding page is reached by name, and sends that name), a
/// name only if listed.
fn host_allowed(allowed: &[String], host: &str) -> bool {
    let host = normal_host(host);
    host.parse::<IpAddr>().is_ok() || allowed.contains(&host)
}

/// Passes requests whose host is allowed (and `/healthz`, for probes);
/// rejects the others with [`HostNotAllowed`]. Everything passes when
/// `allowed` is empty.
fn host_check(allowed: &[String]) -> warp::filters::BoxedFilter<()> {
    if allowed.is_empty() {
        return warp::any().boxed();
    }
    let allowed: Arc<[String]> = allowed.iter().map(|h| normal_host(h)).collect();
    warp::path::full()
        .and(warp::host::optional())
        .and_then(move |path: FullPath, host: Option<Authority>| {
            let served = path.as_str() == "/healthz"
                || host.is_some_and(|host| host_allowed(&allowed, host.host()));
            async move {
                if served {
                    Ok(())
                } else {
                    Err(warp::reject::custom(HostNotAllowed))
                }
            }
        })
        .untuple_one()
        .boxed()
}

/// A request without the right bearer token (`--http-token-file`).
#[derive(Debug)]
struct Unauthorized;

impl warp::reject::Reject for Unauthorized {}

/// Passes requests that carry `token` (and `/healthz`, for probes, which
/// know no secrets), as `Authorization: Bearer TOKEN` or as the query
/// parameter `access_token`; rejects the others with [`Unauthorized`].
/// Everything passes without a token.
fn token_check(token: Option<Token>) -> warp::filters::BoxedFilter<()> {
    let Some(token) = token else {
        return warp::any().boxed();
    };
    let query = warp::query::raw().or(warp::any().map(String::new)).unify();
    warp::path::full()
        .and(warp::header::optional::<String>("authorization"))
        .and(query)
        .and_then(
            move |path: FullPath, authorization: Option<String>, query: String| {
                let served = path.as_str() == "/healthz"
                    || authorization
                        .as_deref()
                        .and_then(bearer)
                        .is_some_and(|given| token.matches(given))
                    || query_token(&query).is_some_and(|given| token.matches(&given));
                async move {
                    if served {
                        Ok(())
                    } else {
                        Err(warp::reject::custom(Unauthorized))
                    }
                }
            },
        )
        .untuple_one()
        .boxed()
}

/// The token of an `Authorization: Bearer TOKEN` header (the scheme's
/// case does not matter, RFC 9110).
fn bearer(header: &str) -> Option<&str> {
    let (scheme, token) = header.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// The percent-decoded value of `access_token` in a raw query string.
fn query_token(query: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let value = pair.strip_prefix("access_token=")?;
        percent_decode_str(value)
            .decode_utf8()
            .ok()
            .map(|v| v.into_owned())
    })
}

/// The page's CSP: nothing but its one inline script and one inline style
/// (by SHA-256), requests to its own origin only (the API and SSE), no
/// framing, no `<base>`, no forms.
fn page_csp(page: &str) -> String {
    let hash = |tag: &str| {
        let open = format!("<{tag}>");
        let start = page.find(&open).expect("the page has the element") + open.len();
        let end = start + page[start..].find(&format!("</{tag}>")).expect("closed");
        // Browsers hash the parsed text, whose line ends are LF.
        let text = page[start..end].replace("\r\n", "\n").replace('\r', "\n");
        format!(
            "'sha256-{}'",
            BASE64_STANDARD.encode(Sha256::digest(text.as_bytes()))
        )
    };
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
        hash("script"),
        hash("style")
    )
}

/// Headers on every response: no MIME sniffing (a JSON error that echoes
/// a stream id is never taken for HTML), and nothing cached but what a
/// route says otherwise (the page).
fn with_common_headers(mut response: warp::reply::Response) -> warp::reply::Response {
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Streams in one `board` event, and in `/api/live` without `?limit`: the
/// top of the board. All of a board of 100,000 streams, serialized every
/// tick for every client on the one HTTP thread, would be megabytes each
/// and hold up `/healthz`; the page shows the top 20 and gets the totals
/// in a `totals` event.
pub const TOP_STREAMS: usize = 500;

/// The board's size and total viewers, for the page's headline numbers.
#[derive(Serialize)]
struct Totals {
    streams: usize,
    viewers: u64,
}

impl Totals {
    /// One pass over the board: additions, no serialization.
    fn of(board: &Board) -> Self {
        Totals {
            streams: board.len(),
            viewers: board.values().map(|s| s.viewers).sum(),
        }
    }
}

fn routes(
    state: HttpState,
    history: History,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };

    let dashboard = warp::path::end().map(dashboard_page);
    let list = warp::path!("api" / "live")
        .and(warp::query::<LiveQuery>())
        .and(with_state.clone())
        .map(|query: LiveQuery, state: HttpState| {
            let snapshots = state.board.top(query.limit.unwrap_or(TOP_STREAMS));
            warp::reply::json(&snapshots).into_response()
        });

    let board_events = warp::path!("api" / "board" / "events")
        .and(with_state.clone())
        .map(|state: HttpState| sse(&state, board_stream(state.board.subscribe())));

    let one = warp::path!("api" / "live" / String)
        .and(with_state.clone())
        .map(one_stream);
    let stream_events = warp::path!("api" / "live" / String / "events")
        .and(with_state.clone())
        .map(one_stream_events);
    let stream_history = warp::path!("api" / "live" / String / "history")
        .and(with_state.clone())
        .map(move |segment: String, state: HttpState| {
            one_stream_history(segment, &state, &history)
        });
    let metrics = warp::path!("metrics")
        .and(with_state.clone())
        .map(|state: HttpState| metrics_text(&state));

    let health = warp::path!("healthz")
        .and(with_state)
        .map(|state: HttpState| health(&state));
    let hosts = host_check(&state.allowed_hosts);
    let authorized = token_check(state.token.clone());

    let own = metrics.or(health).unify();
    let served = if state.dashboard {
        dashboard
            .or(list)
            .unify()
            .or(board_events)
            .unify()
            .or(one)
            .unify()
            .or(stream_events)
            .unify()
            .or(stream_history)
            .unify()
            .or(own)
            .unify()
            .boxed()
    } else {
        let why = match state.live_path {
            true => "not served here: the dashboard and live API are on process 0 of the cluster",
            false => "not served here: this job runs only the billing path (--paths billing)",
        };
        let elsewhere = warp::any().map(move || json_error(StatusCode::NOT_FOUND, why, None));
        own.or(elsewhere).unify().boxed()
    };
    // hyper sends a HEAD response's headers and drops its body (an SSE
    // stream's too, which ends its task at its first event).
    warp::get()
        .or(warp::head())
        .unify()
        .and(hosts)
        .and(authorized)
        .and(served)
        .recover(|rejection: Rejection| async move {
            Ok::<_, Infallible>(rejection_response(&rejection))
        })
        .unify()
        .map(with_common_headers)
}

/// The page, under its CSP.
fn dashboard_page() -> warp::reply::Response {
    let mut response = warp::reply::html(DASHBOARD).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_SECURITY_POLICY, DASHBOARD_CSP.clone());
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    // Compiled into the binary: fetched again after an upgrade.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    response
}

/// `/api/live/{segment}`: one stream's latest snapshot.
fn one_stream(segment: String, state: HttpState) -> warp::reply::Response {
    let Some(stream_id) = stream_id(&segment) else {
        return not_utf8();
    };
    match state.board.latest().get(&stream_id) {
        Some(snapshot) => warp::reply::json(snapshot).into_response(),
        None => json_error(StatusCode::NOT_FOUND, "unknown stream", Some(&stream_id)),
    }
}

/// `/api/live/{segment}/events`: one stream's snapshots as SSE.
fn one_stream_events(segment: String, state: HttpState) -> warp::reply::Response {
    let Some(stream_id) = stream_id(&segment) else {
        return not_utf8();
    };
    if !state.board.latest().contains_key(&stream_id) {
        return json_error(StatusCode::NOT_FOUND, "unknown stream", Some(&stream_id));
    }
    sse(&state, stream_snapshots(state.board.subscribe(), stream_id))
}

/// `/api/live/{segment}/history`: the stream's recorded ticks, oldest
/// first; just its latest snapshot if it is on the board without a history
/// (below the recorded top), a JSON 404 if it is neither.
fn one_stream_history(
    segment: String,
    state: &HttpState,
    history: &History,
) -> warp::reply::Response {
    let Some(stream_id) = stream_id(&segment) else {
        return not_utf8();
    };
    let points = history
        .get(&stream_id)
        .or_else(|| state.board.get(&stream_id).map(|latest| vec![latest]));
    match points {
        Some(points) => warp::reply::json(&points).into_response(),
        None => json_error(StatusCode::NOT_FOUND, "unknown stream", Some(&stream_id)),
    }
}

fn metrics_text(state: &HttpState) -> warp::reply::Response {
    match state.metrics.render() {
        Ok(text) => warp::reply::with_header(
            text,
            "content-type",
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
        .into_response(),
        Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics", None),
    }
}

/// The JSON answer to a request no route took.
fn rejection_response(rejection: &Rejection) -> warp::reply::Response {
    if rejection.is_not_found() {
        json_error(StatusCode::NOT_FOUND, "no such route", None)
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        let mut response = json_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET and HEAD are served",
            None,
        );
        response
            .headers_mut()
            .insert(header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        response
    } else if rejection.find::<HostNotAllowed>().is_some() {
        json_error(
            StatusCode::MISDIRECTED_REQUEST,
            "this host is not served here (--http-allowed-hosts)",
            None,
        )
    } else if rejection.find::<Unauthorized>().is_some() {
        let mut response = json_error(
            StatusCode::UNAUTHORIZED,
            "this server wants its token: `Authorization: Bearer TOKEN`, or \
             `?access_token=TOKEN` (--http-token-file)",
            None,
        );
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        response
    } else {
        json_error(StatusCode::BAD_REQUEST, "bad request", None)
    }
}

#[derive(Serialize)]
struct Health<'a> {
    status: &'a str,
    live: &'a str,
    billing: String,
    input: String,
}

/// 200 while the live path ticks (the process does its most urgent job),
/// with `"status":"degraded"` and the cause while billing is stalled or the
/// brokers are unreachable: a restart would fix neither a full disk nor a
/// broker outage, and would stop the live path too. 503 when the live path
/// does not tick.
///
/// A billing-only job (`--paths billing`) has no ticks to watch: it answers
/// 200 with `"live":"not run here"` for as long as it serves, degraded on
/// the same causes.
fn health(state: &HttpState) -> warp::reply::Response {
    let now = wall_clock_ms();
    let (status, live) = live_health(state, now);
    let stall = state.metrics.billing.stall();
    let billing = match &stall {
        Some(stall) => format!(
            "stalled for {} s: {}",
            now.saturating_sub(stall.since_ms) / 1000,
            stall.cause
        ),
        None if !state.billing_path => "not run here (--paths live)".to_string(),
        None => "running".to_string(),
    };
    let input_problem = (state.metrics.input_problem)();
    let degraded = stall.is_some() || input_problem.is_some();
    let body = Health {
        status: match (status == StatusCode::OK, degraded) {
            (true, false) => "ok",
            (true, true) => "degraded",
            (false, _) => "unavailable",
        },
        live,
        billing,
        input: input_problem.map_or_else(|| "reading".to_string(), |why| format!("waiting: {why}")),
    };
    warp::reply::with_status(warp::reply::json(&body), status).into_response()
}

/// The live path's part of `/healthz`: its status and how it stands.
fn live_health(state: &HttpState, now: u64) -> (StatusCode, &'static str) {
    if !state.live_path {
        return (StatusCode::OK, "not run here (--paths billing)");
    }
    let last_tick = state.metrics.probes.last_tick_ms.load(Ordering::Relaxed);
    let started = last_tick > 0;
    let fresh = started && now.saturating_sub(last_tick) <= TICK_STALE.as_millis() as u64;
    match (started, fresh) {
        (true, true) => (StatusCode::OK, "ticking"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting: no tick yet"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "stalled: no tick for 5 s"),
    }
}

/// Counts an SSE connection for as long as its stream lives.
struct SseClient(Arc<AtomicUsize>);

impl Drop for SseClient {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

fn sse(
    state: &HttpState,
    events: impl Stream<Item = Event> + Send + 'static,
) -> warp::reply::Response {
    let clients = state.metrics.sse_clients.clone();
    if clients.fetch_add(1, Ordering::Relaxed) >= MAX_SSE_CLIENTS {
        clients.fetch_sub(1, Ordering::Relaxed);
        return json_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many event-stream clients",
            None,
        );
    }
    let guard = SseClient(clients);
    // warp wants a `Sync` stream; the watch-driven one is not, so a task
    // drives it into a small channel. A client that stops reading fills
    // the channel and parks its own task, nothing else; one that leaves
    // ends the task at its next event.
    let (sender, receiver) = mpsc::channel(4);
    tokio::spawn(async move {
        let _counted = guard;
        let mut events = std::pin::pin!(events);
        while let Some(event) = events.next().await {
            if sender.send(event).await.is_err() {
                break;
            }
        }
    });
    warp::sse::reply(
        warp::sse::keep_alive()
            .interval(KEEP_ALIVE)
            .stream(Channel(receiver)),
    )
    .into_response()
}

/// The receiving end of an SSE connection's channel, as a stream.
struct Channel(mpsc::Receiver<Event>);

impl Stream for Channel {
    type Item = Result<Event, Infallible>;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.0.poll_recv(cx).map(|event| event.map(Ok))
    }
}

/// One `snapshot` event per tick of `stream_id` (a tick is a new
/// `emitted_at`), starting with the current one.
fn stream_snapshots(
    mut board: watch::Receiver<Board>,
    stream_id: String,
) -> impl Stream<Item = Event> + Send + 'static {
    board.mark_changed();
    futures_util::stream::unfold(
        (board, stream_id, None::<u64>),
        |(mut board, stream_id, last)| async move {
            loop {
                board.changed().await.ok()?;
                let snapshot = board.borrow_and_update().get(&stream_id).cloned();
                if let Some(snapshot) = snapshot.filter(|s| Some(s.emitted_at) != last) {
                    let emitted_at = snapshot.emitted_at;
                    let event = Event::default()
                        .event("snapshot")
                        .json_data(&snapshot)
                        .ok()?;
                    return Some((event, (board, stream_id, Some(emitted_at))));
                }
            }
        },
    )
}

/// Per tick, a `totals` event (streams on the board, total viewers) and a
/// `board` event (the top [`TOP_STREAMS`], most viewers first).
fn board_stream(mut board: watch::Receiver<Board>) -> impl Stream<Item = Event> + Send + 'static {
    board.mark_changed();
    futures_util::stream::unfold(board, |mut board| async move {
        board.changed().await.ok()?;
        // Let the other workers' parts of the same tick land.
        tokio::time::sleep(BOARD_SETTLE).await;
        let latest = board.borrow_and_update().clone();
        let top: Vec<&Snapshot> = latest.top(TOP_STREAMS).collect();
        let events = vec![
            Event::default()
                .event("totals")
                .json_data(Totals::of(&latest))
                .ok()?,
            Event::default().event("board").json_data(top).ok()?,
        ];
        Some((futures_util::stream::iter(events), board))
    })
    .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_runs_nothing_inline_but_its_hashed_script_and_style() {
        // The CSP allows exactly one script and one style element, by
        // hash: anything else inline would be blocked in the browser.
        for tag in ["<script", "<style"] {
            assert_eq!(DASHBOARD.matches(tag).count(), 1, "one {tag} element");
        }
        assert!(DASHBOARD.contains("<script>") && DASHBOARD.contains("<style>"));
        let lower = DASHBOARD.to_ascii_lowercase();
        for banned in [
            " style=",
            " onclick=",
            " onload=",
            " onerror=",
            "javascript:",
        ] {
            assert!(!lower.contains(banned), "{banned} in the page");
        }
        let csp = page_csp(DASHBOARD);
        assert_eq!(csp.matches("'sha256-").count(), 2, "{csp}");
        assert!(!csp.contains("unsafe"), "{csp}");
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        // CRLF line ends hash like LF ones (the browser normalizes them).
        assert_eq!(
            page_csp("<style>a\n</style><script>b\n</script>"),
            page_csp("<style>a\r\n</style><script>b\r\n</script>")
        );
    }

    #[test]
    fn stream_ids_are_percent_decoded() {
        assert_eq!(stream_id("room%201%2F%C3%A9").unwrap(), "room 1/é");
        assert_eq!(stream_id("a+b").unwrap(), "a+b");
        assert_eq!(stream_id("plain").unwrap(), "plain");
        assert_eq!(stream_id("%FF"), None);
    }

    #[test]
    fn tokens_come_as_a_bearer_header_or_a_query_parameter() {
        assert_eq!(bearer("Bearer s3cret"), Some("s3cret"));
        assert_eq!(bearer("bearer  s3cret "), Some("s3cret"));
        assert_eq!(bearer("Basic czNjcmV0"), None);
        assert_eq!(bearer("s3cret"), None);
        assert_eq!(
            query_token("limit=3&access_token=a%2Bb%3D"),
            Some("a+b=".into())
        );
        assert_eq!(query_token("limit=3"), None);
        let token = Token::new("s3cret");
        assert!(token.matches("s3cret"));
        assert!(!token.matches("s3creT"));
        assert!(!token.matches("s3cre"));
        assert!(!token.matches(""));
        assert!(!format!("{token:?}").contains("s3cret"));
    }

    #[test]
    fn hosts_are_matched_without_case_trailing_dot_or_brackets() {
        let allowed = vec!["dash.example.com".to_string(), "localhost".to_string()];
        assert!(host_allowed(&allowed, "Dash.Example.COM."));
        assert!(host_allowed(&allowed, "localhost"));
        assert!(!host_allowed(&allowed, "evil.example"));
        assert!(!host_allowed(&allowed, "dash.example.com.evil.example"));
        // An address is never a rebinding page's Host.
        assert!(host_allowed(&allowed, "10.1.2.3"));
        assert!(host_allowed(&allowed, "[::1]"));
        assert!(host_allowed(&[], "127.0.0.1"));
        assert!(!host_allowed(&[], "localhost"));
    }
}
