//! Running as one process of a multi-process timely cluster.
//!
//! timely can connect its processes itself (`Config::Cluster`), but it
//! retries forever without saying whom it waits for, it cannot tell a job
//! from another one started with different flags, and when a peer goes away
//! its network threads panic with a message that names nobody. A data
//! engineer running the job needs better, so livepipe forms the cluster
//! itself and hands the connected sockets to timely:
//!
//! * **Any start order.** Process `i` listens on line `i` of the hostfile
//!   and dials every lower-numbered process, retrying until
//!   `--cluster-timeout`; then it gives up naming whom it could not reach.
//! * **One job.** Before any data moves, each pair of processes exchanges a
//!   [`Hello`] with the settings every process must share (workers, input,
//!   billing rules). A difference would quietly break exactly-once billing,
//!   so it is an error naming the flag.
//! * **Fail-stop, said clearly.** Every connection is watched
//!   ([`PeerStream`]): when a peer crashes (its connection ends without
//!   timely's shutdown message), the process says which peer it lost and
//!   exits 1; a peer that leaves cleanly while the job still runs is
//!   reported the same way after a grace period (see [`watch_peers`]).
//!   Outputs are crash-safe, so dying is safe; restarting every process
//!   resumes exactly once from process 0's ledger.

use serde::{Deserialize, Serialize};
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::zero_copy::stream::Stream;
use timely::communication::allocator::ProcessBuilder;
use timely::communication::{AllocatorBuilder, Hooks};

use std::any::Any;
use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the processes of one cluster are, and which one this is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// `host:port` of every process, process 0 first.
    pub addresses: Vec<String>,
    /// This process's index.
    pub process: usize,
    /// How long to keep trying to reach the other processes at start.
    pub timeout: Duration,
}

impl ClusterSpec {
    /// Reads the hostfile: one `host:port` per line, line `i` for process
    /// `i`; blank lines and `#` comments are skipped. Errors say what to fix.
    pub fn load(
        processes: usize,
        process: usize,
        hostfile: &Path,
        timeout: Duration,
    ) -> Result<Self, String> {
        if processes == 0 {
            return Err("--processes must be at least 1".into());
        }
        if process >= processes {
            return Err(format!(
                "--process {process} is out of range: with --processes {processes} it must be 0 to {}",
                processes - 1
            ));
        }
        let text = std::fs::read_to_string(hostfile)
            .map_err(|err| format!("--hostfile {}: cannot read: {err}", hostfile.display()))?;
        let addresses = parse_hostfile(&text)
            .map_err(|err| format!("--hostfile {}: {err}", hostfile.display()))?;
        if addresses.len() != processes {
            return Err(format!(
                "--hostfile {} lists {} processes but --processes is {processes}: \
                 give one host:port line per process",
                hostfile.display(),
                addresses.len()
            ));
        }
        Ok(ClusterSpec {
            addresses,
            process,
            timeout,
        })
    }

    pub fn processes(&self) -> usize {
        self.addresses.len()
    }

    /// "process 1 (10.0.0.2:7400)".
    pub fn describe(&self, process: usize) -> String {
        describe(&self.addresses, process)
    }
}

fn describe(addresses: &[String], process: usize) -> String {
    match addresses.get(process) {
        Some(address) => format!("process {process} ({address})"),
        None => format!("process {process}"),
    }
}

fn parse_hostfile(text: &str) -> Result<Vec<String>, String> {
    let mut addresses = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let valid = line
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !valid {
            return Err(format!(
                "line {}: `{line}` is not host:port (like 10.0.0.1:7400)",
                number + 1
            ));
        }
        if addresses.iter().any(|a| a == line) {
            return Err(format!(
                "line {}: `{line}` is listed twice; every process needs its own host:port",
                number + 1
            ));
        }
        addresses.push(line.to_string());
    }
    Ok(addresses)
}

/// The settings every process of one job must share, by flag name.
pub type JobShape = BTreeMap<String, String>;

/// What each process tells each other one when they connect.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hello {
    livepipe: String,
    process: usize,
    processes: usize,
    shape: JobShape,
}

/// Starts every connection, before the JSON [`Hello`].
const MAGIC: &[u8; 8] = b"livepipe";
/// A hello is a few hundred bytes; anything much larger is not a peer.
const MAX_HELLO_BYTES: u32 = 1 << 20;
/// How long a connected peer may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one connection attempt may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between rounds of attempts while the cluster forms.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// How often the wait for peers is logged.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// Started wrongly (port taken, another job's process, bad index): exit 2.
    #[error("{0}")]
    Usage(String),
    /// Could not reach the other processes in time: exit 1.
    #[error("{0}")]
    Unreachable(String),
}

/// A formed cluster, ready for `timely::execute::execute_from`.
pub struct Cluster {
    pub builders: Vec<AllocatorBuilder>,
    /// timely's network threads; dropping it waits for them.
    pub guard: Box<dyn Any + Send>,
    pub health: Arc<PeerHealth>,
}

/// Connects to every other process of `spec`, checks that they run the same
/// job, and starts timely's network threads over those connections.
pub fn form(
    spec: &ClusterSpec,
    workers: usize,
    shape: &JobShape,
    stop: Arc<AtomicBool>,
) -> Result<Cluster, ClusterError> {
    let hello = Hello {
        livepipe: env!("CARGO_PKG_VERSION").to_string(),
        process: spec.process,
        processes: spec.processes(),
        shape: shape.clone(),
    };
    let sockets = connect_all(spec, &hello)?;
    let health = Arc::new(PeerHealth {
        addresses: spec.addresses.clone(),
        gone: Mutex::new(None),
    });
    report_network_panics(health.clone(), stop);
    let sockets: Vec<Option<PeerStream>> = sockets
        .into_iter()
        .enumerate()
        .map(|(peer, socket)| {
            socket.map(|stream| PeerStream {
                stream,
                peer,
                health: health.clone(),
            })
        })
        .collect();
    let hooks = Hooks::default();
    let local =
        ProcessBuilder::new_typed_vector(workers, hooks.refill.clone(), hooks.spill.clone());
    let (builders, guard) =
        initialize_networking_from_sockets(local, sockets, spec.process, workers, hooks).map_err(
            |err| ClusterError::Unreachable(format!("starting the cluster's network: {err}")),
        )?;
    tracing::info!(
        process = spec.process,
        processes = spec.processes(),
        workers,
        "cluster formed"
    );
    Ok(Cluster {
        builders: builders.into_iter().map(AllocatorBuilder::Tcp).collect(),
        guard: Box::new(guard),
        health,
    })
}

/// Dials every lower-numbered process and accepts every higher-numbered
/// one, until all are connected or the timeout passes.
fn connect_all(spec: &ClusterSpec, hello: &Hello) -> Result<Vec<Option<TcpStream>>, ClusterError> {
    let own = &spec.addresses[spec.process];
    let started = Instant::now();
    let listener = listen(own, spec, started)?;
    listener
        .set_nonblocking(true)
        .map_err(|err| ClusterError::Unreachable(format!("listening on {own}: {err}")))?;
    let processes = spec.processes();
    let mut sockets: Vec<Option<TcpStream>> = (0..processes).map(|_| None).collect();
    let mut last_error: BTreeMap<usize, String> = BTreeMap::new();
    let mut last_log = started;
    tracing::info!(
        listen = %own,
        peers = processes - 1,
        "forming the cluster (timeout {} s)",
        spec.timeout.as_secs()
    );
    loop {
        for (peer, socket) in sockets.iter_mut().enumerate().take(spec.process) {
            if socket.is_some() {
                continue;
            }
            match dial(&spec.addresses[peer], hello) {
                Ok(stream) => {
                    tracing::info!(peer = %spec.describe(peer), "connected");
                    *socket = Some(stream);
                }
                Err(Handshake::Mismatch(why)) => {
                    return Err(ClusterError::Usage(format!(
                        "{}: {why}",
                        spec.describe(peer)
                    )))
                }
                Err(Handshake::Failed(why)) => {
                    last_error.insert(peer, why);
                }
            }
        }
        loop {
            match listener.accept() {
                Ok((stream, from)) => match greet(stream, hello) {
                    Ok((peer, stream)) => {
                        if sockets[peer].is_some() {
                            return Err(ClusterError::Usage(format!(
                                "two processes claim to be process {peer} (the second from \
                                 {from}); give each process its own --process"
                            )));
                        }
                        tracing::info!(peer = %spec.describe(peer), "connected");
                        sockets[peer] = Some(stream);
                    }
                    Err(Handshake::Mismatch(why)) => {
                        return Err(ClusterError::Usage(format!("a peer at {from}: {why}")))
                    }
                    // Not a peer (a port scanner, a health check): ignore.
                    Err(Handshake::Failed(why)) => {
                        tracing::warn!(%from, "ignoring a connection that is not a peer: {why}")
                    }
                },
                Err(err) if err.kind() == io::ErrorKind::WouldBlock => break,
                Err(err) if err.kind() == io::ErrorKind::Interrupted => {}
                Err(err) => {
                    return Err(ClusterError::Unreachable(format!(
                        "accepting connections on {own}: {err}"
                    )))
                }
            }
        }
        let missing: Vec<usize> = (0..processes)
            .filter(|&p| p != spec.process && sockets[p].is_none())
            .collect();
        if missing.is_empty() {
            return Ok(sockets);
        }
        if started.elapsed() >= spec.timeout {
            let why: Vec<String> = missing
                .iter()
                .map(|&p| match last_error.get(&p) {
                    Some(error) => format!("{}: {error}", spec.describe(p)),
                    None => format!("{}: never connected to this one", spec.describe(p)),
                })
                .collect();
            return Err(ClusterError::Unreachable(format!(
                "gave up forming the cluster after {} s; {}. Start every process with the same \
                 --hostfile (each with its own --process), check that the ports are open \
                 between the machines, or wait longer with --cluster-timeout",
                spec.timeout.as_secs(),
                why.join("; ")
            )));
        }
        if last_log.elapsed() >= WAIT_LOG_EVERY {
            last_log = Instant::now();
            let waiting: Vec<String> = missing.iter().map(|&p| spec.describe(p)).collect();
            tracing::info!("waiting for {}", waiting.join(", "));
        }
        std::thread::sleep(RETRY_EVERY);
    }
}

/// Listens on this process's own hostfile address. A name that does not
/// resolve yet is retried until the timeout (an orchestrator may publish a
/// machine's name only after it started); a port in use or an address of
/// another machine is a mistake to fix now.
fn listen(own: &str, spec: &ClusterSpec, started: Instant) -> Result<TcpListener, ClusterError> {
    loop {
        let err = match TcpListener::bind(own) {
            Ok(listener) => return Ok(listener),
            Err(err) => err,
        };
        let mistake = matches!(
            err.kind(),
            io::ErrorKind::AddrInUse
                | io::ErrorKind::AddrNotAvailable
                | io::ErrorKind::PermissionDenied
        );
        if mistake || started.elapsed() >= spec.timeout {
            let why = format!(
                "cannot listen on {own} (line {} of the hostfile, this process's own): {err}; \
                 check --process, and that the address is this machine's and the port free",
                spec.process + 1
            );
            return Err(if mistake {
                ClusterError::Usage(why)
            } else {
                ClusterError::Unreachable(why)
            });
        }
        tracing::info!("cannot listen on {own} yet ({err}); retrying");
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Why a connection did not become a peer.
enum Handshake {
    /// A peer of another job, or of another cluster layout: stop.
    Mismatch(String),
    /// Nobody there yet, or not a peer: try again / ignore.
    Failed(String),
}

fn dial(address: &str, hello: &Hello) -> Result<TcpStream, Handshake> {
    let targets: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|err| Handshake::Failed(format!("cannot resolve {address}: {err}")))?
        .collect();
    let mut failure = Handshake::Failed(format!("{address} resolves to no address"));
    for target in targets {
        let mut stream = match TcpStream::connect_timeout(&target, DIAL_TIMEOUT) {
            Ok(stream) => stream,
            Err(err) => {
                failure = Handshake::Failed(err.to_string());
                continue;
            }
        };
        let theirs = prepare(&stream)
            .and_then(|()| send_hello(&mut stream, hello))
            .and_then(|()| read_hello(&mut stream))
            .map_err(|err| Handshake::Failed(format!("handshake: {err}")))?;
        check(hello, &theirs)?;
        return Ok(stream);
    }
    Err(failure)
}

/// Answers a process that dialed this one: which process it is.
fn greet(mut stream: TcpStream, hello: &Hello) -> Result<(usize, TcpStream), Handshake> {
    let theirs = prepare(&stream)
        .and_then(|()| read_hello(&mut stream))
        .map_err(|err| Handshake::Failed(format!("handshake: {err}")))?;
    // Answer before judging, so the other side can say what is wrong too.
    send_hello(&mut stream, hello).map_err(|err| Handshake::Failed(format!("handshake: {err}")))?;
    check(hello, &theirs)?;
    if theirs.process <= hello.process {
        return Err(Handshake::Mismatch(format!(
            "it says it is process {}, which should be listening, not dialing; \
             give each process its own --process",
            theirs.process
        )));
    }
    Ok((theirs.process, stream))
}

fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(HELLO_TIMEOUT))?;
    stream.set_write_timeout(Some(HELLO_TIMEOUT))
}

fn send_hello(stream: &mut TcpStream, hello: &Hello) -> io::Result<()> {
    let body = serde_json::to_vec(hello)?;
    let mut message = Vec::with_capacity(12 + body.len());
    message.extend_from_slice(MAGIC);
    message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    message.extend_from_slice(&body);
    stream.write_all(&message)?;
    stream.flush()
}

fn read_hello(stream: &mut TcpStream) -> io::Result<Hello> {
    let mut head = [0u8; 12];
    stream.read_exact(&mut head)?;
    if &head[..8] != MAGIC {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not a livepipe process",
        ));
    }
    let length = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if length > MAX_HELLO_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a {length}-byte hello"),
        ));
    }
    let mut body = vec![0u8; length as usize];
    stream.read_exact(&mut body)?;
    let hello = serde_json::from_slice(&body)?;
    // From here on the connection is timely's, which blocks on reads.
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    Ok(hello)
}

/// Whether `theirs` belongs to the same job as `mine`.
fn check(mine: &Hello, theirs: &Hello) -> Result<(), Handshake> {
    if theirs.livepipe != mine.livepipe {
        return Err(Handshake::Mismatch(format!(
            "it runs livepipe {}, this process {}; run the same build everywhere",
            theirs.livepipe, mine.livepipe
        )));
    }
    if theirs.processes != mine.processes {
        return Err(Handshake::Mismatch(format!(
            "it was started with --processes {}, this process with --processes {}",
            theirs.processes, mine.processes
        )));
    }
    if theirs.process >= mine.processes {
        return Err(Handshake::Mismatch(format!(
            "it says it is process {}, out of range",
            theirs.process
        )));
    }
    let differences: Vec<String> = mine
        .shape
        .keys()
        .chain(theirs.shape.keys())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .filter(|flag| mine.shape.get(*flag) != theirs.shape.get(*flag))
        .map(|flag| {
            let show = |shape: &JobShape| {
                shape
                    .get(flag)
                    .map_or("(not given)".to_string(), |v| format!("`{v}`"))
            };
            format!(
                "{flag} {} there, {} here",
                show(&theirs.shape),
                show(&mine.shape)
            )
        })
        .collect();
    if !differences.is_empty() {
        return Err(Handshake::Mismatch(format!(
            "it runs another job: {}. Every process must be started with the same --workers, \
             input and billing rules",
            differences.join("; ")
        )));
    }
    Ok(())
}

/// The first peer this process lost, if any.
pub struct PeerHealth {
    addresses: Vec<String>,
    gone: Mutex<Option<Gone>>,
}

/// A peer whose connection ended.
#[derive(Clone, Debug)]
pub struct Gone {
    pub process: usize,
    pub cause: String,
    pub since: Instant,
}

impl PeerHealth {
    fn note_gone(&self, process: usize, cause: String) {
        let mut gone = self.gone.lock().unwrap_or_else(|p| p.into_inner());
        gone.get_or_insert(Gone {
            process,
            cause,
            since: Instant::now(),
        });
    }

    /// The first peer whose connection ended.
    pub fn gone(&self) -> Option<Gone> {
        self.gone.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn describe(&self, process: usize) -> String {
        describe(&self.addresses, process)
    }
}

/// How long a peer that left cleanly may be gone while this process still
/// runs before that counts as losing it. A peer leaves cleanly when its
/// input ended (then this process's input has ended too and the job is
/// completing: nothing to do) or when it was stopped on its own (then this
/// process would wait for it forever).
const LEAVE_GRACE: Duration = Duration::from_secs(10);

/// Watches for a peer that left cleanly while this process still runs (a
/// crashed peer is reported at once, see [`report_network_panics`]), and
/// calls `lost` with a message if the job is not completing on its own.
/// Returns when `done` is set.
pub fn watch_peers(
    health: Arc<PeerHealth>,
    completing: impl Fn() -> bool + Send + 'static,
    done: Arc<AtomicBool>,
    lost: impl Fn(String) + Send + 'static,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(100));
            let Some(gone) = health.gone() else { continue };
            if completing() || gone.since.elapsed() < LEAVE_GRACE {
                continue;
            }
            lost(format!(
                "lost {}: it left the cluster ({}) while this process was running, \
                 perhaps stopped on its own. A cluster stops together: signal every process. \
                 Restart every process to resume from process 0's ledger",
                health.describe(gone.process),
                gone.cause
            ));
            return;
        }
    })
}

/// The peer health the panic hook reports to; one cluster per process.
static HEALTH: OnceLock<(Arc<PeerHealth>, Arc<AtomicBool>)> = OnceLock::new();

/// timely's network threads panic when a connection fails ("timely
/// communication error: ..."), naming no peer, and the workers then hang or
/// panic in turn. This hook turns that into one clear message naming the
/// lost peer, and exits: 1, or 0 if this process was being stopped anyway.
fn report_network_panics(health: Arc<PeerHealth>, stop: Arc<AtomicBool>) {
    if HEALTH.set((health, stop)).is_err() {
        return;
    }
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let thread = std::thread::current();
        let peer = thread
            .name()
            .and_then(|name| {
                name.strip_prefix("timely:recv-")
                    .or_else(|| name.strip_prefix("timely:send-"))
            })
            .and_then(|index| index.parse::<usize>().ok());
        let network = peer.is_some() || message.contains("timely communication error");
        let Some((health, stop)) = HEALTH.get().filter(|_| network) else {
            previous(info);
            return;
        };
        let gone = health.gone();
        let process = peer.or(gone.as_ref().map(|g| g.process));
        let cause = gone.map_or_else(|| message.to_string(), |g| g.cause);
        let who = process.map_or_else(|| "a peer".to_string(), |p| health.describe(p));
        if stop.load(Ordering::Relaxed) {
            tracing::info!("{who} went away while this process was stopping: {cause}");
            std::process::exit(0);
        }
        let text = format!(
            "lost {who}: {cause} (it crashed, was killed, or the network failed). \
             A cluster cannot go on without any of its processes; restart every process \
             to resume exactly once from process 0's ledger"
        );
        tracing::error!("{text}");
        eprintln!("error: {text}");
        std::process::exit(1);
    }));
}

/// A connection to one peer, as timely's network threads use it, that
/// notes in [`PeerHealth`] when the peer goes away.
struct PeerStream {
    stream: TcpStream,
    peer: usize,
    health: Arc<PeerHealth>,
}

impl PeerStream {
    fn note<T>(&self, result: io::Result<T>) -> io::Result<T> {
        if let Err(err) = &result {
            self.health.note_gone(self.peer, err.to_string());
        }
        result
    }
}

impl Read for PeerStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let read = self.stream.read(buf);
        if matches!(read, Ok(0)) && !buf.is_empty() {
            self.health
                .note_gone(self.peer, "its connection closed".to_string());
        }
        self.note(read)
    }
}

impl Write for PeerStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.stream.write(buf);
        self.note(written)
    }

    fn flush(&mut self) -> io::Result<()> {
        let flushed = self.stream.flush();
        self.note(flushed)
    }
}

impl Stream for PeerStream {
    fn try_clone(&self) -> io::Result<Self> {
        Ok(PeerStream {
            stream: self.stream.try_clone()?,
            peer: self.peer,
            health: self.health.clone(),
        })
    }

    fn set_nonblocking(&self, nonblocking: bool) -> io::Result<()> {
        self.stream.set_nonblocking(nonblocking)
    }

    fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(process: usize, workers: &str) -> Hello {
        Hello {
            livepipe: "1".into(),
            process,
            processes: 2,
            shape: JobShape::from([
                ("--workers".to_string(), workers.to_string()),
                ("--topic".to_string(), "t".to_string()),
            ]),
        }
    }

    #[test]
    fn hostfile_lines_are_checked() {
        let text = "# three machines\n10.0.0.1:7400\n\n  10.0.0.2:7400  \nnode-3.example:7400\n";
        assert_eq!(
            parse_hostfile(text).unwrap(),
            ["10.0.0.1:7400", "10.0.0.2:7400", "node-3.example:7400"]
        );
        assert!(parse_hostfile("10.0.0.1\n").unwrap_err().contains("line 1"));
        assert!(parse_hostfile("a:1\nb:99999\n")
            .unwrap_err()
            .contains("line 2"));
        assert!(parse_hostfile("a:1\na:1\n")
            .unwrap_err()
            .contains("listed twice"));
    }

    #[test]
    fn a_different_job_is_named_by_its_flag() {
        assert!(check(&hello(0, "2"), &hello(1, "2")).is_ok());
        let Err(Handshake::Mismatch(why)) = check(&hello(0, "1"), &hello(1, "2")) else {
            panic!("workers differ");
        };
        assert!(why.contains("--workers `2` there, `1` here"), "{why}");
    }

    #[test]
    fn peers_find_each_other_in_any_order() {
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                TcpListener::bind("127.0.0.1:0")
                    .unwrap()
                    .local_addr()
                    .unwrap()
                    .port()
            })
            .collect();
        let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let spec = |process| ClusterSpec {
            addresses: addresses.clone(),
            process,
            timeout: Duration::from_secs(20),
        };
        // The dialer starts first and retries until the listener is up.
        let one = spec(1);
        let dialer = std::thread::spawn(move || connect_all(&one, &hello(1, "2")));
        std::thread::sleep(Duration::from_millis(500));
        let zero = connect_all(&spec(0), &hello(0, "2")).map_err(|e| e.to_string());
        let one = dialer.join().unwrap().map_err(|e| e.to_string());
        assert!(zero.unwrap()[1].is_some());
        assert!(one.unwrap()[0].is_some());
    }

    #[test]
    fn an_absent_peer_is_named_after_the_timeout() {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let spec = ClusterSpec {
            // Process 0 never starts: nothing listens on its port.
            addresses: vec![format!("127.0.0.1:{port}"), "127.0.0.1:0".into()],
            process: 1,
            timeout: Duration::from_millis(500),
        };
        let err = connect_all(&spec, &hello(1, "1")).unwrap_err().to_string();
        assert!(
            err.contains(&format!("process 0 (127.0.0.1:{port})")),
            "{err}"
        );
        assert!(err.contains("gave up"), "{err}");
    }
}
