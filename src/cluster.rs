//! Running as one process of a multi-process timely cluster.
//!
//! timely can connect its processes itself (`Config::Cluster`), but it
//! retries forever without saying whom it waits for, it cannot tell a job
//! from another one started with different flags, it lets anyone who
//! reaches the port in, and when a peer goes away its network threads panic
//! with a message that names nobody. A data engineer running the job needs
//! better, so livepipe forms the cluster itself and hands the connected
//! sockets to timely:
//!
//! * **Any start order.** Process `i` listens on line `i` of the hostfile
//!   and dials every lower-numbered process, retrying until
//!   `--cluster-timeout`; then it gives up naming whom it could not reach.
//! * **Only its own processes.** Every connection starts with a
//!   challenge–response on the shared secret of `--cluster-secret-file`
//!   (see [`ClusterSecret`] for the protocol): each side proves that it
//!   holds the secret, and a peer must connect from the address its
//!   hostfile line resolves to. A connection that fails either, or takes
//!   longer than [`HANDSHAKE_TIMEOUT`], is logged and ignored: never fatal,
//!   and it learns nothing of the job. Connections are checked each on a
//!   thread of its own, so a slow one holds nobody up.
//! * **One job.** Only then does each pair of processes exchange a
//!   [`Hello`] with the settings every process must share (workers, input,
//!   billing rules). A difference would quietly break exactly-once billing,
//!   so it is an error naming the flag.
//! * **One routing key.** Process 0 draws a random [`RoutingKey`] for the
//!   job and hands it to every peer in the handshake; [`form`] returns it.
//! * **Fail-stop, said clearly.** Every connection is watched
//!   ([`PeerStream`]): when a peer crashes (its connection ends without
//!   timely's shutdown message), the process says which peer it lost and
//!   exits 1; a peer that leaves cleanly while the job still runs is
//!   reported the same way after a grace period (see [`watch_peers`]).
//!   A peer that was stopped (SIGINT/SIGTERM) is not lost: it announces
//!   the stop through the dataflow before it closes anything, and this
//!   process then stops with it (`crate::stop`), so its leaving is
//!   expected. Outputs are crash-safe, so dying is safe; restarting every
//!   process resumes exactly once from process 0's ledger.
//!
//! After the handshake the traffic is timely's, neither encrypted nor
//! authenticated per message: the cluster port belongs on a private
//! network.

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use timely::communication::allocator::zero_copy::initialize::initialize_networking_from_sockets;
use timely::communication::allocator::zero_copy::stream::Stream;
use timely::communication::allocator::ProcessBuilder;
use timely::communication::{AllocatorBuilder, Hooks};

use std::any::Any;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Where the processes of one cluster are, which one this is, and the
/// secret they share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterSpec {
    /// `host:port` of every process, process 0 first.
    pub addresses: Vec<String>,
    /// This process's index.
    pub process: usize,
    /// How long to keep trying to reach the other processes at start.
    pub timeout: Duration,
    /// What every process proves it holds before it may join.
    pub secret: ClusterSecret,
}

impl ClusterSpec {
    /// Reads the hostfile (one `host:port` per line, line `i` for process
    /// `i`; blank lines and `#` comments are skipped) and the secret file.
    /// A cluster without a secret is refused. Errors say what to fix and
    /// never show the secret.
    pub fn load(
        processes: usize,
        process: usize,
        hostfile: &Path,
        timeout: Duration,
        secret_file: Option<&Path>,
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
        let secret = match secret_file {
            Some(path) => ClusterSecret::load(path)?,
            None => {
                return Err(format!(
                    "a cluster needs a shared secret, or anyone who reaches its port could \
                     join the job: give every process the same --cluster-secret-file FILE. \
                     Make one with `head -c 32 /dev/urandom | base64 > cluster-secret`, \
                     `chmod 600` it and copy it to every machine (at least \
                     {MIN_SECRET_BYTES} bytes)"
                ))
            }
        };
        Ok(ClusterSpec {
            addresses,
            process,
            timeout,
            secret,
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

/// The fewest bytes a cluster secret may have.
pub const MIN_SECRET_BYTES: usize = 16;

/// The secret every process of a cluster holds (`--cluster-secret-file`).
/// It is never logged: its `Debug` shows nothing of it.
///
/// # The handshake
///
/// Process `d` dials process `l < d` (the listener). `N` are 32 random
/// bytes, `MAC(label, ...)` is HMAC-SHA256 keyed with the secret over the
/// label, both nonces, `d` and `l` (u32, big-endian), and what follows:
///
/// 1. `d → l`: `lpcauth1`, `N_d`, `d`, `l`.
/// 2. `l` refuses (one status byte, then closes) a claim it cannot accept
///    (`l` is not its index, `d` out of range or not above `l`) or a
///    connection not from an address `d`'s hostfile line resolves to;
///    otherwise `l → d`: status 0, `N_l`.
/// 3. `d → l`: `MAC("dialer", N_d, N_l, d, l)`.
/// 4. `l` checks it in constant time; wrong: status 3, closes. Right:
///    `l → d`: status 0, `MAC("listener", N_d, N_l, d, l, K)`, and `K`,
///    where `K` (only when `l` is 0) is the routing key XOR the first 16
///    bytes of `MAC("routing key", N_d, N_l, d, l)`.
/// 5. `d` checks `l`'s MAC in constant time (wrong: it hangs up and
///    retries later) and unmasks the routing key.
/// 6. Only now the [`Hello`]s: `d` sends its own, `l` answers with its own,
///    and each compares them (a difference between authenticated peers is
///    a usage error, exit 2).
///
/// The labels differ by role, so a process's proof as a listener can never
/// serve as a dialer's proof; fresh nonces on both sides make a recorded
/// proof useless for another connection. Nothing is encrypted: someone
/// who can watch the private network sees the settings in the hellos (not
/// the secret, nor the routing key).
#[derive(Clone, PartialEq, Eq)]
pub struct ClusterSecret(Vec<u8>);

impl fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterSecret(not shown)")
    }
}

impl ClusterSecret {
    /// The file's content, trimmed of surrounding whitespace; at least
    /// [`MIN_SECRET_BYTES`] bytes. Errors never show the content.
    pub fn load(path: &Path) -> Result<Self, String> {
        let bytes = std::fs::read(path).map_err(|err| {
            format!(
                "--cluster-secret-file {}: cannot read: {err}",
                path.display()
            )
        })?;
        Self::new(&bytes).map_err(|err| format!("--cluster-secret-file {}: {err}", path.display()))
    }

    /// A secret from these bytes, trimmed; at least [`MIN_SECRET_BYTES`].
    pub fn new(bytes: &[u8]) -> Result<Self, String> {
        let secret = bytes.trim_ascii();
        if secret.len() < MIN_SECRET_BYTES {
            return Err(format!(
                "the secret holds {} bytes (not counting surrounding whitespace), fewer than \
                 {MIN_SECRET_BYTES}; make a strong one with \
                 `head -c 32 /dev/urandom | base64 > cluster-secret`",
                secret.len()
            ));
        }
        Ok(ClusterSecret(secret.to_vec()))
    }

    /// `MAC(label, N_d, N_l, d, l, extra)` of the handshake.
    fn mac(&self, label: &[u8], transcript: &Transcript, extra: &[u8]) -> HmacSha256 {
        let mut mac =
            HmacSha256::new_from_slice(&self.0).expect("HMAC-SHA256 takes a key of any length");
        mac.update(b"livepipe cluster v1: ");
        mac.update(label);
        mac.update(b"\0");
        mac.update(&transcript.dialer_nonce);
        mac.update(&transcript.listener_nonce);
        mac.update(&transcript.dialer.to_be_bytes());
        mac.update(&transcript.listener.to_be_bytes());
        mac.update(extra);
        mac
    }

    /// The routing key masked for one connection (XOR is its own inverse).
    fn mask(&self, transcript: &Transcript, key: &RoutingKey) -> [u8; 16] {
        let pad = self
            .mac(b"routing key", transcript, &[])
            .finalize()
            .into_bytes();
        std::array::from_fn(|i| key.0[i] ^ pad[i])
    }
}

type HmacSha256 = Hmac<Sha256>;

/// What both sides of one handshake have seen, that the proofs cover.
struct Transcript {
    dialer_nonce: [u8; 32],
    listener_nonce: [u8; 32],
    dialer: u32,
    listener: u32,
}

impl Transcript {
    /// The dialer's opening: magic, its nonce, its index, the index dialed.
    fn opening(&self) -> Vec<u8> {
        let mut opening = Vec::with_capacity(OPENING_BYTES);
        opening.extend_from_slice(AUTH_MAGIC);
        opening.extend_from_slice(&self.dialer_nonce);
        opening.extend_from_slice(&self.dialer.to_be_bytes());
        opening.extend_from_slice(&self.listener.to_be_bytes());
        opening
    }

    /// The listener's reading of an opening, with a fresh nonce of its own.
    fn from_opening(opening: &[u8; OPENING_BYTES]) -> Result<Self, Handshake> {
        if &opening[..8] == MAGIC {
            return Err(Handshake::Failed(
                "it opened with a livepipe hello without proving the cluster secret (a \
                 livepipe from before cluster secrets? run the same build everywhere)"
                    .into(),
            ));
        }
        if &opening[..8] != AUTH_MAGIC {
            return Err(Handshake::Failed(
                "it is not a livepipe process (it sent something else)".into(),
            ));
        }
        let word = |at: usize| u32::from_be_bytes(opening[at..at + 4].try_into().expect("4 bytes"));
        Ok(Transcript {
            dialer_nonce: opening[8..40].try_into().expect("32 bytes"),
            listener_nonce: rand::random(),
            dialer: word(40),
            listener: word(44),
        })
    }
}

/// A random key drawn once per job, the same in every process of a cluster
/// (process 0 draws it and hands it to each peer during the handshake; a
/// process alone draws its own with [`RoutingKey::random`]). It is for
/// keyed hashing of record keys to workers, so that nobody who can choose
/// `stream_id`s can steer them all to one worker. It changes at every
/// start, so nothing that outlives a run may depend on it; it is never
/// logged (`Debug` hides it).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RoutingKey(pub [u8; 16]);

impl RoutingKey {
    /// 16 bytes from the thread-local CSPRNG (ChaCha, seeded by the OS).
    pub fn random() -> Self {
        RoutingKey(rand::random())
    }

    /// The key as two little-endian words, as keyed hashers (SipHash) take it.
    pub fn words(&self) -> [u64; 2] {
        let (low, high) = self.0.split_at(8);
        [
            u64::from_le_bytes(low.try_into().expect("8 bytes")),
            u64::from_le_bytes(high.try_into().expect("8 bytes")),
        ]
    }
}

impl fmt::Debug for RoutingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RoutingKey(not shown)")
    }
}

/// The settings every process of one job must share, by flag name.
pub type JobShape = BTreeMap<String, String>;

/// What each process tells each other one once both are authenticated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Hello {
    livepipe: String,
    process: usize,
    processes: usize,
    shape: JobShape,
}

/// Starts a [`Hello`]. Also how livepipe before cluster secrets opened a
/// connection, which is how such a process is recognised.
const MAGIC: &[u8; 8] = b"livepipe";
/// Starts every connection: the handshake of [`ClusterSecret`], version 1.
const AUTH_MAGIC: &[u8; 8] = b"lpcauth1";
/// The dialer's opening: magic, nonce, its index, the index it dialed.
const OPENING_BYTES: usize = 8 + 32 + 4 + 4;
/// The listener's status bytes.
const GO_ON: u8 = 0;
const REFUSED_CLAIM: u8 = 1;
const REFUSED_ADDRESS: u8 = 2;
const REFUSED_PROOF: u8 = 3;
/// A hello is a few hundred bytes; anything much larger is not a peer.
const MAX_HELLO_BYTES: u32 = 1 << 20;
/// How long a whole handshake may take, from the first byte to the hellos;
/// a connection slower than that is dropped (the dialer tries again).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections being checked at once, from one address and in all; more
/// are closed at once.
const MAX_PENDING_PER_ADDRESS: usize = 8;
const MAX_PENDING: usize = 64;
/// How often the listener looks for new connections.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// How long one connection attempt may take.
const DIAL_TIMEOUT: Duration = Duration::from_secs(2);
/// Pause between rounds of attempts while the cluster forms.
const RETRY_EVERY: Duration = Duration::from_millis(200);
/// How often the wait for peers is logged.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(5);
/// Ignored connections logged one by one; after that, a count every
/// [`WAIT_LOG_EVERY`], so a flood cannot flood the log.
const IGNORED_LOGGED: usize = 20;

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
    /// The job's routing key, process 0's, the same in every process.
    pub routing_key: RoutingKey,
}

/// Connects to every other process of `spec`, each proving it holds the
/// cluster secret, checks that they run the same job, and starts timely's
/// network threads over those connections.
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
    let Connected {
        sockets,
        routing_key,
    } = connect_all(spec, &hello, RoutingKey::random())?;
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
        routing_key,
    })
}

/// What this process's handshakes need, shared with the threads that
/// answer connections.
struct Local {
    addresses: Vec<String>,
    process: usize,
    secret: ClusterSecret,
    hello: Hello,
    /// This process's own key; the job's only in process 0.
    routing_key: RoutingKey,
}

/// Every peer's connection (`None` at this process's own index) and the
/// job's routing key.
struct Connected {
    sockets: Vec<Option<TcpStream>>,
    routing_key: RoutingKey,
}

/// What became of a connection this process accepted.
enum Event {
    /// An authenticated peer of the same job.
    Joined {
        peer: usize,
        from: SocketAddr,
        stream: TcpStream,
    },
    /// An authenticated peer of another job: stop.
    Mismatch { from: SocketAddr, why: String },
    /// Not a peer, or too slow: logged and forgotten.
    Ignored { from: SocketAddr, why: String },
}

/// Dials every lower-numbered process and accepts every higher-numbered
/// one, until all are connected or the timeout passes. `routing_key` is
/// this process's own, the job's if it is process 0.
fn connect_all(
    spec: &ClusterSpec,
    hello: &Hello,
    routing_key: RoutingKey,
) -> Result<Connected, ClusterError> {
    let own = &spec.addresses[spec.process];
    let started = Instant::now();
    let listener = listen(own, spec, started)?;
    listener
        .set_nonblocking(true)
        .map_err(|err| ClusterError::Unreachable(format!("listening on {own}: {err}")))?;
    // Dial from the address peers expect this process at (see `dial`).
    let own_ip = listener
        .local_addr()
        .ok()
        .map(|address| address.ip())
        .filter(|ip| !ip.is_unspecified());
    let local = Arc::new(Local {
        addresses: spec.addresses.clone(),
        process: spec.process,
        secret: spec.secret.clone(),
        hello: hello.clone(),
        routing_key,
    });
    let (events_to, events) = mpsc::channel();
    let accepting = StopOnDrop(Arc::new(AtomicBool::new(true)));
    accept_peers(listener, local.clone(), events_to, accepting.0.clone())
        .map_err(|err| ClusterError::Unreachable(format!("listening on {own}: {err}")))?;

    let processes = spec.processes();
    let mut forming = Forming {
        sockets: (0..processes).map(|_| None).collect(),
        job_key: (spec.process == 0).then_some(routing_key),
        last_error: BTreeMap::new(),
    };
    let mut ignored = IgnoredLog::default();
    let mut last_log = started;
    tracing::info!(
        listen = %own,
        peers = processes - 1,
        "forming the cluster (timeout {} s)",
        spec.timeout.as_secs()
    );
    loop {
        forming.dial_lower(spec, &local, own_ip)?;
        let missing = forming.missing(spec);
        if missing.is_empty() {
            let routing_key = forming.job_key.ok_or_else(|| {
                ClusterError::Unreachable("process 0 sent no routing key".to_string())
            })?;
            return Ok(Connected {
                sockets: forming.sockets,
                routing_key,
            });
        }
        if started.elapsed() >= spec.timeout {
            return Err(gave_up(spec, &missing, &forming.last_error, ignored.count));
        }
        if last_log.elapsed() >= WAIT_LOG_EVERY {
            last_log = Instant::now();
            let waiting: Vec<String> = missing.iter().map(|&p| spec.describe(p)).collect();
            tracing::info!("waiting for {}", waiting.join(", "));
            ignored.summarize();
        }
        take_accepted(spec, &events, &mut forming.sockets, &mut ignored)?;
    }
}

/// The connections made so far while forming the cluster.
struct Forming {
    /// One per process (this process's own stays `None`).
    sockets: Vec<Option<TcpStream>>,
    /// The job's routing key, once process 0 handed it over.
    job_key: Option<RoutingKey>,
    /// Each unreachable peer's last error, for the give-up message.
    last_error: BTreeMap<usize, String>,
}

impl Forming {
    /// Dials every lower-numbered process not connected yet, once.
    fn dial_lower(
        &mut self,
        spec: &ClusterSpec,
        local: &Local,
        own_ip: Option<IpAddr>,
    ) -> Result<(), ClusterError> {
        for peer in 0..spec.process {
            if self.sockets[peer].is_some() {
                continue;
            }
            match dial(local, peer, own_ip) {
                Ok((stream, key)) => {
                    tracing::info!(peer = %spec.describe(peer), "connected");
                    self.sockets[peer] = Some(stream);
                    if peer == 0 {
                        self.job_key = key;
                    }
                }
                Err(Handshake::Mismatch(why)) => {
                    return Err(ClusterError::Usage(format!(
                        "{}: {why}",
                        spec.describe(peer)
                    )))
                }
                Err(Handshake::Refused(why)) => {
                    // Said once per cause, not at every retry.
                    if self.last_error.get(&peer) != Some(&why) {
                        tracing::warn!("{}: {why}", spec.describe(peer));
                    }
                    self.last_error.insert(peer, why);
                }
                Err(Handshake::Failed(why)) => {
                    self.last_error.insert(peer, why);
                }
            }
        }
        Ok(())
    }

    /// The peers not connected yet.
    fn missing(&self, spec: &ClusterSpec) -> Vec<usize> {
        (0..spec.processes())
            .filter(|&p| p != spec.process && self.sockets[p].is_none())
            .collect()
    }
}

/// Waits a little for what the accepted connections became, then takes
/// all that is there.
fn take_accepted(
    spec: &ClusterSpec,
    events: &mpsc::Receiver<Event>,
    sockets: &mut [Option<TcpStream>],
    ignored: &mut IgnoredLog,
) -> Result<(), ClusterError> {
    let mut next = events.recv_timeout(RETRY_EVERY).ok();
    while let Some(event) = next {
        match event {
            Event::Joined { peer, from, stream } => {
                // Only the process of that index can prove the secret
                // from that address: a second connection is the same
                // process trying again (its side of the first failed
                // late), or restarted. The newest is the live one.
                if sockets[peer].replace(stream).is_some() {
                    tracing::info!(peer = %spec.describe(peer), %from, "connected again");
                } else {
                    tracing::info!(peer = %spec.describe(peer), "connected");
                }
            }
            Event::Mismatch { from, why } => {
                return Err(ClusterError::Usage(format!("a peer at {from}: {why}")))
            }
            Event::Ignored { from, why } => ignored.note(from, &why),
        }
        next = events.try_recv().ok();
    }
    Ok(())
}

/// Why forming the cluster failed: each missing peer's last error.
fn gave_up(
    spec: &ClusterSpec,
    missing: &[usize],
    last_error: &BTreeMap<usize, String>,
    ignored: usize,
) -> ClusterError {
    let mut why: Vec<String> = missing
        .iter()
        .map(|&p| match last_error.get(&p) {
            Some(error) => format!("{}: {error}", spec.describe(p)),
            None => format!("{}: never connected to this one", spec.describe(p)),
        })
        .collect();
    if ignored > 0 {
        why.push(format!(
            "{ignored} connections were ignored as not this cluster's (see the warnings above)"
        ));
    }
    ClusterError::Unreachable(format!(
        "gave up forming the cluster after {} s; {}. Start every process with the same \
         --hostfile and --cluster-secret-file (each with its own --process), check \
         that the ports are open between the machines, or wait longer with \
         --cluster-timeout",
        spec.timeout.as_secs(),
        why.join("; ")
    ))
}

/// Sets its flag to false when dropped (however `connect_all` returns).
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// Warnings for ignored connections: each cause from each address once
/// (a peer with the wrong secret retries every 200 ms), up to
/// [`IGNORED_LOGGED`] of them; the rest counted.
#[derive(Default)]
struct IgnoredLog {
    count: usize,
    logged: BTreeSet<(IpAddr, String)>,
    unlogged: usize,
}

impl IgnoredLog {
    fn note(&mut self, from: SocketAddr, why: &str) {
        self.count += 1;
        let cause = (from.ip().to_canonical(), why.to_string());
        if self.logged.len() < IGNORED_LOGGED && !self.logged.contains(&cause) {
            tracing::warn!(%from, "ignoring a connection that is not a peer of this cluster: {why}");
            self.logged.insert(cause);
        } else {
            self.unlogged += 1;
        }
    }

    fn summarize(&mut self) {
        if self.unlogged > 0 {
            tracing::warn!(
                "ignored {} more connections that are not peers of this cluster (causes as \
                 logged before, or more of them)",
                self.unlogged
            );
            self.unlogged = 0;
        }
    }
}

/// Accepts connections until `accepting` is false, each checked on a
/// thread of its own within [`HANDSHAKE_TIMEOUT`], and reports what each
/// became on `events`.
fn accept_peers(
    listener: TcpListener,
    local: Arc<Local>,
    events: mpsc::Sender<Event>,
    accepting: Arc<AtomicBool>,
) -> io::Result<()> {
    let pending: Arc<Mutex<BTreeMap<IpAddr, usize>>> = Arc::default();
    std::thread::Builder::new()
        .name("livepipe:cluster-accept".into())
        .spawn(move || {
            while accepting.load(Ordering::Relaxed) {
                let (stream, from) = match listener.accept() {
                    Ok(connection) => connection,
                    Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                        std::thread::sleep(ACCEPT_POLL);
                        continue;
                    }
                    Err(err) if err.kind() == io::ErrorKind::Interrupted => continue,
                    // Out of file descriptors, a connection reset before it
                    // was accepted...: none of it is the peers' fault.
                    Err(err) => {
                        tracing::warn!("accepting a connection: {err}");
                        std::thread::sleep(RETRY_EVERY);
                        continue;
                    }
                };
                let Some(slot) = Pending::take(&pending, from.ip()) else {
                    drop(stream);
                    let _ = events.send(Event::Ignored {
                        from,
                        why: format!(
                            "too many connections are being checked (at most \
                             {MAX_PENDING_PER_ADDRESS} from one address, {MAX_PENDING} in all)"
                        ),
                    });
                    continue;
                };
                let (local, report) = (local.clone(), events.clone());
                let spawned = std::thread::Builder::new()
                    .name("livepipe:cluster-handshake".into())
                    .spawn(move || {
                        let event = answer(stream, from, &local);
                        drop(slot);
                        let _ = report.send(event);
                    });
                if let Err(err) = spawned {
                    let _ = events.send(Event::Ignored {
                        from,
                        why: format!("no thread to check it on: {err}"),
                    });
                }
            }
        })
        .map(|_| ())
}

/// One connection being checked, counted against the limits until dropped.
struct Pending {
    counts: Arc<Mutex<BTreeMap<IpAddr, usize>>>,
    ip: IpAddr,
}

impl Pending {
    fn take(counts: &Arc<Mutex<BTreeMap<IpAddr, usize>>>, ip: IpAddr) -> Option<Pending> {
        let ip = ip.to_canonical();
        let mut map = counts.lock().unwrap_or_else(|p| p.into_inner());
        let total: usize = map.values().sum();
        let here = map.entry(ip).or_default();
        if total >= MAX_PENDING || *here >= MAX_PENDING_PER_ADDRESS {
            return None;
        }
        *here += 1;
        Some(Pending {
            counts: counts.clone(),
            ip,
        })
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        let mut map = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = map.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                map.remove(&self.ip);
            }
        }
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
    /// An authenticated peer of another job, or of another cluster layout:
    /// stop.
    Mismatch(String),
    /// Refused by the other side, or the other side failed to prove the
    /// secret: worth a warning, then try again / ignore.
    Refused(String),
    /// Nobody there yet, not a peer, too slow: try again / ignore.
    Failed(String),
}

fn handshake_error(err: io::Error) -> Handshake {
    Handshake::Failed(format!("handshake: {err}"))
}

/// Connects to `peer` (from `own_ip`, this process's listening address,
/// where the peer expects it) and runs the dialer's side of the handshake.
/// Returns the connection and, from process 0, the job's routing key.
fn dial(
    local: &Local,
    peer: usize,
    own_ip: Option<IpAddr>,
) -> Result<(TcpStream, Option<RoutingKey>), Handshake> {
    let address = &local.addresses[peer];
    let targets: Vec<SocketAddr> = address
        .to_socket_addrs()
        .map_err(|err| Handshake::Failed(format!("cannot resolve {address}: {err}")))?
        .collect();
    let mut failure = Handshake::Failed(format!("{address} resolves to no address"));
    for target in targets {
        let mut stream = match connect(target, own_ip) {
            Ok(stream) => stream,
            Err(err) => {
                failure = Handshake::Failed(err.to_string());
                continue;
            }
        };
        let key = introduce(&mut stream, local, peer)?;
        return Ok((stream, key));
    }
    Err(failure)
}

/// A connection to `target` from `from` if given and of the same family
/// (so that the peer sees this process's hostfile address, whichever
/// address the route would pick), else from wherever the system chooses.
fn connect(target: SocketAddr, from: Option<IpAddr>) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, SockAddr, Socket, Type};
    if let Some(ip) = from.filter(|ip| ip.is_ipv4() == target.is_ipv4()) {
        let socket = Socket::new(
            Domain::for_address(target),
            Type::STREAM,
            Some(Protocol::TCP),
        )?;
        if socket.bind(&SockAddr::from(SocketAddr::new(ip, 0))).is_ok() {
            socket.connect_timeout(&SockAddr::from(target), DIAL_TIMEOUT)?;
            return Ok(socket.into());
        }
    }
    TcpStream::connect_timeout(&target, DIAL_TIMEOUT)
}

/// The dialer's side of the handshake (see [`ClusterSecret`]) with process
/// `peer`, then the hellos.
fn introduce(
    stream: &mut TcpStream,
    local: &Local,
    peer: usize,
) -> Result<Option<RoutingKey>, Handshake> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    prepare(stream).map_err(handshake_error)?;
    let mut transcript = Transcript {
        dialer_nonce: rand::random(),
        listener_nonce: [0; 32],
        dialer: local.process as u32,
        listener: peer as u32,
    };
    write_by(stream, &transcript.opening(), deadline).map_err(handshake_error)?;

    let status = read_status(stream, deadline)?;
    if status != GO_ON {
        return Err(refusal(status, local, peer));
    }
    read_by(stream, &mut transcript.listener_nonce, deadline).map_err(handshake_error)?;
    let proof = local
        .secret
        .mac(b"dialer", &transcript, &[])
        .finalize()
        .into_bytes();
    write_by(stream, &proof, deadline).map_err(handshake_error)?;

    let status = read_status(stream, deadline)?;
    if status != GO_ON {
        return Err(refusal(status, local, peer));
    }
    let mut theirs = [0u8; 32 + 16];
    let length = if peer == 0 { 48 } else { 32 };
    read_by(stream, &mut theirs[..length], deadline).map_err(handshake_error)?;
    let key = listener_proof(local, &transcript, &theirs[..length], peer)?;

    send_hello(stream, &local.hello, deadline).map_err(handshake_error)?;
    let hello = read_hello(stream, deadline).map_err(handshake_error)?;
    check(&local.hello, &hello)?;
    if hello.process != peer {
        return Err(Handshake::Mismatch(format!(
            "it says it is process {}; give every process the same --hostfile",
            hello.process
        )));
    }
    finish(stream).map_err(handshake_error)?;
    Ok(key)
}

/// Why the listener refused this process, from its status byte.
fn refusal(status: u8, local: &Local, peer: usize) -> Handshake {
    match status {
        REFUSED_CLAIM => Handshake::Refused(format!(
            "it refused this process: it is not process {peer}, or does not expect process \
             {} to connect to it; give every process the same --hostfile",
            local.process
        )),
        REFUSED_ADDRESS => Handshake::Refused(format!(
            "it refused this process because the connection does not come from an address \
             of this process's hostfile line ({}); give it an address the machine connects \
             from",
            local.addresses[local.process]
        )),
        REFUSED_PROOF => Handshake::Refused(
            "it refused this process's proof of the cluster secret: give every process the \
             same --cluster-secret-file"
                .into(),
        ),
        _ => Handshake::Failed("handshake: not a livepipe process of this version".into()),
    }
}

/// Checks the listener's proof of the secret (`theirs`: its tag, then,
/// from process 0, the masked routing key) and unmasks the key.
fn listener_proof(
    local: &Local,
    transcript: &Transcript,
    theirs: &[u8],
    peer: usize,
) -> Result<Option<RoutingKey>, Handshake> {
    let (tag, masked) = theirs.split_at(32);
    local
        .secret
        .mac(b"listener", transcript, masked)
        .verify_slice(tag)
        .map_err(|_| {
            Handshake::Refused(
                "it did not prove that it holds the cluster secret (it has another \
                 --cluster-secret-file, or it is not a process of this job); it was told \
                 nothing of this job"
                    .into(),
            )
        })?;
    Ok((peer == 0).then(|| {
        let masked = RoutingKey(masked.try_into().expect("16 bytes"));
        RoutingKey(local.secret.mask(transcript, &masked))
    }))
}

/// Answers a connection this process accepted: what it became.
fn answer(mut stream: TcpStream, from: SocketAddr, local: &Local) -> Event {
    match greet(&mut stream, from, local).and_then(|peer| {
        finish(&stream).map_err(handshake_error)?;
        Ok(peer)
    }) {
        Ok(peer) => Event::Joined { peer, from, stream },
        Err(Handshake::Mismatch(why)) => Event::Mismatch { from, why },
        Err(Handshake::Refused(why) | Handshake::Failed(why)) => Event::Ignored { from, why },
    }
}

/// The listener's side of the handshake (see [`ClusterSecret`]), then the
/// hellos: which process dialed this one. Nothing of the job is sent
/// before the other side proved it holds the secret.
fn greet(stream: &mut TcpStream, from: SocketAddr, local: &Local) -> Result<usize, Handshake> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    prepare(stream).map_err(handshake_error)?;
    let mut opening = [0u8; OPENING_BYTES];
    read_by(stream, &mut opening, deadline).map_err(handshake_error)?;
    let transcript = Transcript::from_opening(&opening)?;
    let claimed = transcript.dialer as usize;
    let refuse = |stream: &mut TcpStream, status: u8, why: String| {
        // Best effort: the dialer's log can then say why.
        let _ = write_by(stream, &[status], deadline);
        Err(Handshake::Refused(why))
    };
    if let Err((status, why)) = check_claim(local, &transcript, from) {
        return refuse(stream, status, why);
    }
    let who = describe(&local.addresses, claimed);
    let mut reply = [GO_ON; 33];
    reply[1..].copy_from_slice(&transcript.listener_nonce);
    write_by(stream, &reply, deadline).map_err(handshake_error)?;

    let mut proof = [0u8; 32];
    read_by(stream, &mut proof, deadline).map_err(handshake_error)?;
    if local
        .secret
        .mac(b"dialer", &transcript, &[])
        .verify_slice(&proof)
        .is_err()
    {
        return refuse(
            stream,
            REFUSED_PROOF,
            format!(
                "it claims to be {who}, but did not prove that it holds the cluster secret \
                 (a process with another --cluster-secret-file, or not a process of this job)"
            ),
        );
    }

    // Authenticated: prove the secret in turn, with the job's routing key.
    write_by(stream, &listener_reply(local, &transcript), deadline).map_err(handshake_error)?;

    let hello = read_hello(stream, deadline).map_err(handshake_error)?;
    // Answer before judging, so the other side can say what is wrong too.
    send_hello(stream, &local.hello, deadline).map_err(handshake_error)?;
    check(&local.hello, &hello)?;
    if hello.process != claimed {
        return Err(Handshake::Mismatch(format!(
            "it proved the secret as process {claimed} but says it is process {}",
            hello.process
        )));
    }
    Ok(claimed)
}

/// Whether the dialer may be who it claims: it meant this process, it is
/// a higher-numbered one, and it connects from its hostfile line. The
/// refusal's status byte and reason otherwise.
fn check_claim(
    local: &Local,
    transcript: &Transcript,
    from: SocketAddr,
) -> Result<(), (u8, String)> {
    let claimed = transcript.dialer as usize;
    if transcript.listener as usize != local.process {
        return Err((
            REFUSED_CLAIM,
            format!(
                "it meant to reach process {}, but this is process {} (another hostfile?)",
                transcript.listener, local.process
            ),
        ));
    }
    if claimed <= local.process || claimed >= local.addresses.len() {
        return Err((
            REFUSED_CLAIM,
            format!("it claims to be process {claimed}, which does not connect to this one"),
        ));
    }
    from_hostfile_address(&local.addresses[claimed], from.ip()).map_err(|why| {
        let who = describe(&local.addresses, claimed);
        (REFUSED_ADDRESS, format!("it claims to be {who}, but {why}"))
    })
}

/// The listener's proof of the secret, with the job's routing key masked
/// in from process 0.
fn listener_reply(local: &Local, transcript: &Transcript) -> Vec<u8> {
    let masked = if local.process == 0 {
        local.secret.mask(transcript, &local.routing_key).to_vec()
    } else {
        Vec::new()
    };
    let tag = local
        .secret
        .mac(b"listener", transcript, &masked)
        .finalize()
        .into_bytes();
    let mut reply = vec![GO_ON];
    reply.extend_from_slice(&tag);
    reply.extend_from_slice(&masked);
    reply
}

/// Whether a connection from `ip` may be the process at `address` (a
/// hostfile line): the line must resolve to that address.
fn from_hostfile_address(address: &str, ip: IpAddr) -> Result<(), String> {
    let ip = ip.to_canonical();
    let resolved: Vec<IpAddr> = address
        .to_socket_addrs()
        .map_err(|err| format!("its hostfile line {address} does not resolve: {err}"))?
        .map(|a| a.ip().to_canonical())
        .collect();
    if resolved.contains(&ip) {
        Ok(())
    } else {
        Err(format!(
            "it connects from {ip}, not from an address its hostfile line {address} resolves to"
        ))
    }
}

fn prepare(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)
}

/// The connection is timely's from here on, which blocks on reads.
fn finish(stream: &TcpStream) -> io::Result<()> {
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)
}

fn timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        format!(
            "took longer than {} s; dropped",
            HANDSHAKE_TIMEOUT.as_secs()
        ),
    )
}

/// Fills `buf` by `deadline`, however the bytes trickle in.
fn read_by(stream: &mut TcpStream, buf: &mut [u8], deadline: Instant) -> io::Result<()> {
    by_deadline(deadline, buf.len(), |left, filled| {
        stream.set_read_timeout(Some(left))?;
        moved(stream.read(&mut buf[filled..]), || {
            io::Error::new(io::ErrorKind::UnexpectedEof, "the connection closed")
        })
    })
}

/// Writes all of `bytes` by `deadline`.
fn write_by(stream: &mut TcpStream, bytes: &[u8], deadline: Instant) -> io::Result<()> {
    by_deadline(deadline, bytes.len(), |left, written| {
        stream.set_write_timeout(Some(left))?;
        moved(stream.write(&bytes[written..]), || {
            io::ErrorKind::WriteZero.into()
        })
    })
}

/// Moves `len` bytes in steps (`step(time left, bytes so far)` returns the
/// bytes it moved), or times out at `deadline`.
fn by_deadline(
    deadline: Instant,
    len: usize,
    mut step: impl FnMut(Duration, usize) -> io::Result<usize>,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        done += step(left, done)?;
    }
    Ok(())
}

/// What one read or write under a deadline moved: its bytes (0 when it
/// was interrupted: try again), or why the handshake cannot go on (`none`
/// when it moved nothing at all).
fn moved(result: io::Result<usize>, none: impl FnOnce() -> io::Error) -> io::Result<usize> {
    match result {
        Ok(0) => Err(none()),
        Ok(count) => Ok(count),
        Err(err) if err.kind() == io::ErrorKind::Interrupted => Ok(0),
        Err(err)
            if matches!(
                err.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            Err(timed_out())
        }
        Err(err) => Err(err),
    }
}

fn read_status(stream: &mut TcpStream, deadline: Instant) -> Result<u8, Handshake> {
    let mut status = [0u8];
    read_by(stream, &mut status, deadline).map_err(handshake_error)?;
    Ok(status[0])
}

fn send_hello(stream: &mut TcpStream, hello: &Hello, deadline: Instant) -> io::Result<()> {
    let body = serde_json::to_vec(hello)?;
    let mut message = Vec::with_capacity(12 + body.len());
    message.extend_from_slice(MAGIC);
    message.extend_from_slice(&(body.len() as u32).to_be_bytes());
    message.extend_from_slice(&body);
    write_by(stream, &message, deadline)
}

fn read_hello(stream: &mut TcpStream, deadline: Instant) -> io::Result<Hello> {
    let mut head = [0u8; 12];
    read_by(stream, &mut head, deadline)?;
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
    read_by(stream, &mut body, deadline)?;
    Ok(serde_json::from_slice(&body)?)
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
        .collect::<BTreeSet<_>>()
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
/// completing: nothing to do) or when it stopped (then this process heard
/// of it first and is stopping too, see `crate::stop`); anything else
/// would leave this process waiting for it forever.
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
                 without announcing a stop (a process stopped by a signal tells its peers \
                 first). Restart every process to resume from process 0's ledger",
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
        // Logged already when every line is JSON; otherwise also said plainly.
        if !crate::logs::json() {
            eprintln!("error: {text}");
        }
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

    const SECRET: &[u8] = b"the secret of this test's cluster";

    fn free_port(ip: &str) -> u16 {
        TcpListener::bind((ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    }

    fn spec(addresses: &[String], process: usize, secret: &[u8]) -> ClusterSpec {
        ClusterSpec {
            addresses: addresses.to_vec(),
            process,
            timeout: Duration::from_secs(30),
            secret: ClusterSecret::new(secret).unwrap(),
        }
    }

    /// Process 0 of `addresses` forming, on a thread.
    fn process_0(
        addresses: &[String],
        key: [u8; 16],
    ) -> std::thread::JoinHandle<Result<Connected, String>> {
        let zero = spec(addresses, 0, SECRET);
        std::thread::spawn(move || {
            connect_all(&zero, &hello(0, "2"), RoutingKey(key)).map_err(|e| e.to_string())
        })
    }

    /// The real process 1 connects, gets process 0's routing `key`, and
    /// process 0 has it as its peer.
    fn process_1_joins(
        addresses: &[String],
        zero: std::thread::JoinHandle<Result<Connected, String>>,
        key: [u8; 16],
    ) {
        let one = connect_all(
            &spec(addresses, 1, SECRET),
            &hello(1, "2"),
            RoutingKey::random(),
        )
        .map_err(|e| e.to_string())
        .unwrap();
        assert_eq!(one.routing_key.0, key);
        assert!(zero.join().unwrap().unwrap().sockets[1].is_some());
    }

    /// Dials process 0 as `local` until it answers (it may not listen
    /// yet); what the handshake came to.
    fn dial_until_answered(local: &Local) -> Result<Option<RoutingKey>, Handshake> {
        loop {
            match dial(local, 0, None) {
                Err(Handshake::Failed(why)) if why.contains("refused") => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                other => return other.map(|(_, key)| key),
            }
        }
    }

    fn impostor(addresses: &[String], secret: &[u8]) -> Local {
        Local {
            addresses: addresses.to_vec(),
            process: 1,
            secret: ClusterSecret::new(secret).unwrap(),
            hello: hello(1, "2"),
            routing_key: RoutingKey([0; 16]),
        }
    }

    fn refusal(result: Result<Option<RoutingKey>, Handshake>) -> String {
        match result {
            Err(Handshake::Refused(why)) => why,
            Err(Handshake::Failed(why) | Handshake::Mismatch(why)) => panic!("not refused: {why}"),
            Ok(_) => panic!("joined"),
        }
    }

    #[test]
    fn peers_find_each_other_in_any_order_and_share_process_0s_routing_key() {
        let addresses: Vec<String> = (0..2)
            .map(|_| format!("127.0.0.1:{}", free_port("127.0.0.1")))
            .collect();
        // The dialer starts first and retries until the listener is up.
        let one = spec(&addresses, 1, SECRET);
        let dialer = std::thread::spawn(move || {
            connect_all(&one, &hello(1, "2"), RoutingKey([1; 16])).map_err(|e| e.to_string())
        });
        std::thread::sleep(Duration::from_millis(500));
        let zero = process_0(&addresses, [7; 16]).join().unwrap().unwrap();
        let one = dialer.join().unwrap().unwrap();
        assert!(zero.sockets[1].is_some());
        assert!(one.sockets[0].is_some());
        assert_eq!(zero.routing_key.0, [7; 16]);
        assert_eq!(one.routing_key.0, [7; 16], "process 0's key, not its own");
    }

    #[test]
    fn an_absent_peer_is_named_after_the_timeout() {
        let port = free_port("127.0.0.1");
        let spec = ClusterSpec {
            // Process 0 never starts: nothing listens on its port.
            addresses: vec![format!("127.0.0.1:{port}"), "127.0.0.1:0".into()],
            process: 1,
            timeout: Duration::from_millis(500),
            secret: ClusterSecret::new(SECRET).unwrap(),
        };
        let err = connect_all(&spec, &hello(1, "1"), RoutingKey::random())
            .err()
            .expect("no process 0")
            .to_string();
        assert!(
            err.contains(&format!("process 0 (127.0.0.1:{port})")),
            "{err}"
        );
        assert!(err.contains("gave up"), "{err}");
    }

    #[test]
    fn a_secret_is_trimmed_long_enough_and_never_shown() {
        let err = ClusterSecret::new(b"  short-secret \n").unwrap_err();
        assert!(err.contains("12 bytes"), "{err}");
        assert!(!err.contains("short-secret"), "showed the secret: {err}");
        assert_eq!(
            ClusterSecret::new(b" 0123456789abcdef\n").unwrap(),
            ClusterSecret::new(b"0123456789abcdef").unwrap()
        );
        let shown = format!("{:?}", spec(&["a:1".into()], 0, SECRET));
        assert!(!shown.contains("secret of this"), "{shown}");

        let dir = tempfile::tempdir().unwrap();
        let hosts = dir.path().join("hosts");
        std::fs::write(&hosts, "127.0.0.1:7400\n127.0.0.1:7401\n").unwrap();
        let load =
            |secret: Option<&Path>| ClusterSpec::load(2, 0, &hosts, Duration::from_secs(1), secret);
        let none = load(None).unwrap_err();
        assert!(none.contains("--cluster-secret-file"), "{none}");
        assert!(none.contains("head -c 32 /dev/urandom | base64"), "{none}");
        let file = dir.path().join("secret");
        std::fs::write(&file, "hunter2\n").unwrap();
        let short = load(Some(&file)).unwrap_err();
        assert!(short.contains("fewer than 16"), "{short}");
        assert!(!short.contains("hunter2"), "{short}");
        std::fs::write(&file, SECRET).unwrap();
        assert_eq!(load(Some(&file)).unwrap().secret.0, SECRET);
    }

    #[test]
    fn a_dialer_without_the_secret_is_refused_and_process_0_waits_on() {
        let addresses: Vec<String> = (0..2)
            .map(|_| format!("127.0.0.1:{}", free_port("127.0.0.1")))
            .collect();
        let zero = process_0(&addresses, [3; 16]);
        let why = refusal(dial_until_answered(&impostor(
            &addresses,
            b"not the secret of this cluster",
        )));
        assert!(why.contains("proof of the cluster secret"), "{why}");
        // Also claiming another process, or to be process 0 itself.
        let mut other = impostor(&addresses, SECRET);
        other.process = 0;
        let why = refusal(dial_until_answered(&other));
        assert!(why.contains("does not expect process 0"), "{why}");
        // The real process 1 still joins.
        process_1_joins(&addresses, zero, [3; 16]);
    }

    #[test]
    fn a_peer_is_accepted_only_from_its_hostfile_address() {
        // Process 1 is at 127.0.0.2 (loopback too, on Linux): a dialer with
        // the secret but connecting from 127.0.0.1 is refused.
        let addresses = vec![
            format!("127.0.0.1:{}", free_port("127.0.0.1")),
            format!("127.0.0.2:{}", free_port("127.0.0.2")),
        ];
        let zero = process_0(&addresses, [5; 16]);
        let why = refusal(dial_until_answered(&impostor(&addresses, SECRET)));
        assert!(why.contains("does not come from an address"), "{why}");
        // The real one listens on 127.0.0.2 and so dials from there.
        process_1_joins(&addresses, zero, [5; 16]);
    }

    #[test]
    fn a_trickling_connection_is_cut_at_its_deadline() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        // A byte every 50 ms: each read gets something, the whole never.
        let trickler = std::thread::spawn(move || {
            let mut stream = TcpStream::connect(address).unwrap();
            while !stopped.load(Ordering::Relaxed) && stream.write_all(b"l").is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
        });
        let (mut stream, _) = listener.accept().unwrap();
        let mut opening = [0u8; OPENING_BYTES];
        let deadline = Instant::now() + Duration::from_millis(300);
        let err = read_by(&mut stream, &mut opening, deadline).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut, "{err}");
        stop.store(true, Ordering::Relaxed);
        drop(stream);
        trickler.join().unwrap();
    }

    #[test]
    fn a_listener_without_the_secret_gets_no_hello() {
        // It plays the listener's part with a made-up proof.
        let fake = TcpListener::bind("127.0.0.1:0").unwrap();
        let address = fake.local_addr().unwrap().to_string();
        let listener = std::thread::spawn(move || {
            let (mut stream, _) = fake.accept().unwrap();
            let mut opening = [0u8; OPENING_BYTES];
            stream.read_exact(&mut opening).unwrap();
            stream.write_all(&[GO_ON; 33]).unwrap();
            let mut proof = [0u8; 32];
            stream.read_exact(&mut proof).unwrap();
            stream.write_all(&[GO_ON; 49]).unwrap();
            let mut rest = Vec::new();
            let _ = stream.read_to_end(&mut rest);
            rest
        });
        let local = impostor(&[address, "127.0.0.1:0".into()], SECRET);
        let why = refusal(dial(&local, 0, None).map(|(_, key)| key));
        assert!(why.contains("did not prove"), "{why}");
        let rest = listener.join().unwrap();
        assert!(rest.is_empty(), "sent {} bytes after its proof", rest.len());
    }
}
