//! The live sink's HTTP side: dashboard, JSON API, Server-Sent Events,
//! `/metrics` and `/healthz` (SPEC §2).
//!
//! warp runs on a thread of its own with its own tokio runtime, so the
//! dataflow's workers never run (or wait on) HTTP work. The only thing the
//! two share is the [`LiveBoard`]'s watch channel: workers replace the
//! board without waiting, handlers read the newest one or are woken when
//! it changes. A slow or stuck client therefore costs its own connection,
//! never a tick.
//!
//! | route | |
//! |---|---|
//! | `GET /` | the dashboard (one self-contained page) |
//! | `GET /api/live?limit=N` | latest snapshots, most viewers first |
//! | `GET /api/live/{stream_id}` | one stream's latest snapshot, or a JSON 404 |
//! | `GET /api/live/{stream_id}/events` | SSE, one `snapshot` event per tick |
//! | `GET /api/board/events` | SSE, one `board` event (all snapshots) per tick |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | 200 while both paths run, 503 with the reason otherwise |

use futures_util::{Stream, StreamExt};
use livepipe_dataflow::live::Snapshot;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use warp::http::StatusCode;
use warp::sse::Event;
use warp::{Filter, Rejection, Reply};

use std::convert::Infallible;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::live::{Board, LiveBoard};
use crate::metrics::JobMetrics;

const DASHBOARD: &str = include_str!("dashboard.html");

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
    runtime.spawn(warp::serve(routes(state)).incoming(listener).run());
    Ok(HttpServer {
        addr,
        runtime: Some(runtime),
    })
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

/// The board's snapshots, most viewers first (ties by `stream_id`).
fn ranked(board: &Board) -> Vec<&Snapshot> {
    let mut snapshots: Vec<&Snapshot> = board.values().collect();
    snapshots.sort_by(|a, b| {
        b.viewers
            .cmp(&a.viewers)
            .then_with(|| a.stream_id.cmp(&b.stream_id))
    });
    snapshots
}

fn routes(
    state: HttpState,
) -> impl Filter<Extract = (warp::reply::Response,), Error = Infallible> + Clone {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };

    let dashboard = warp::path::end().map(|| warp::reply::html(DASHBOARD).into_response());

    let list = warp::path!("api" / "live")
        .and(warp::query::<LiveQuery>())
        .and(with_state.clone())
        .map(|query: LiveQuery, state: HttpState| {
            let board = state.board.latest();
            let mut snapshots = ranked(&board);
            snapshots.truncate(query.limit.unwrap_or(usize::MAX));
            warp::reply::json(&snapshots).into_response()
        });

    let board_events = warp::path!("api" / "board" / "events")
        .and(with_state.clone())
        .map(|state: HttpState| sse(&state, board_stream(state.board.subscribe())));

    let one = warp::path!("api" / "live" / String)
        .and(with_state.clone())
        .map(
            |stream_id: String, state: HttpState| match state.board.latest().get(&stream_id) {
                Some(snapshot) => warp::reply::json(snapshot).into_response(),
                None => json_error(StatusCode::NOT_FOUND, "unknown stream", Some(&stream_id)),
            },
        );

    let stream_events = warp::path!("api" / "live" / String / "events")
        .and(with_state.clone())
        .map(|stream_id: String, state: HttpState| {
            if !state.board.latest().contains_key(&stream_id) {
                return json_error(StatusCode::NOT_FOUND, "unknown stream", Some(&stream_id));
            }
            sse(&state, stream_snapshots(state.board.subscribe(), stream_id))
        });

    let metrics =
        warp::path!("metrics")
            .and(with_state.clone())
            .map(|state: HttpState| match state.metrics.render() {
                Ok(text) => warp::reply::with_header(
                    text,
                    "content-type",
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
                .into_response(),
                Err(_) => json_error(StatusCode::INTERNAL_SERVER_ERROR, "encoding metrics", None),
            });

    let health = warp::path!("healthz")
        .and(with_state)
        .map(|state: HttpState| health(&state));

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
            .or(own)
            .unify()
            .boxed()
    } else {
        let elsewhere = warp::any().map(|| {
            json_error(
                StatusCode::NOT_FOUND,
                "not served here: the dashboard and live API are on process 0 of the cluster",
                None,
            )
        });
        own.or(elsewhere).unify().boxed()
    };
    warp::get()
        .and(served)
        .recover(|rejection: Rejection| async move {
            let response = if rejection.is_not_found() {
                json_error(StatusCode::NOT_FOUND, "no such route", None)
            } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
                json_error(StatusCode::METHOD_NOT_ALLOWED, "only GET is served", None)
            } else {
                json_error(StatusCode::BAD_REQUEST, "bad request", None)
            };
            Ok::<_, Infallible>(response)
        })
        .unify()
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
fn health(state: &HttpState) -> warp::reply::Response {
    let last_tick = state.metrics.probes.last_tick_ms.load(Ordering::Relaxed);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let started = last_tick > 0;
    let fresh = started && now.saturating_sub(last_tick) <= TICK_STALE.as_millis() as u64;
    let (status, live) = match (started, fresh) {
        (true, true) => (StatusCode::OK, "ticking"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "starting: no tick yet"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "stalled: no tick for 5 s"),
    };
    let stall = state.metrics.billing.stall();
    let billing = match &stall {
        Some(stall) => format!(
            "stalled for {} s: {}",
            now.saturating_sub(stall.since_ms) / 1000,
            stall.cause
        ),
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

/// One `board` event (every stream, most viewers first) per tick.
fn board_stream(mut board: watch::Receiver<Board>) -> impl Stream<Item = Event> + Send + 'static {
    board.mark_changed();
    futures_util::stream::unfold(board, |mut board| async move {
        board.changed().await.ok()?;
        // Let the other workers' parts of the same tick land.
        tokio::time::sleep(BOARD_SETTLE).await;
        let latest = board.borrow_and_update().clone();
        let event = Event::default()
            .event("board")
            .json_data(ranked(&latest))
            .ok()?;
        Some((event, board))
    })
}
