//! Stopping every worker of the job at the same logical point, in one
//! process or across a cluster.
//!
//! A stop must never empty a frontier: a dataflow whose sources end would
//! finalize impressions that are still pending. So a stopped worker drops
//! its dataflow instead, and a dropped dataflow tells no other worker
//! anything. Alone, that is enough. In a cluster it is not: the processes
//! that were not signalled would wait for the stopped one's progress
//! forever and, once its connections close, take it for a crash.
//!
//! So every worker also runs a tiny dataflow of its own, the *stop
//! agreement*: an input of worker indices, broadcast to every worker. A
//! worker that sees the process's stop flag (set by SIGINT/SIGTERM) sends
//! its index and closes its input; a worker that hears an index sets its
//! own process's stop flag and closes its input too. The agreement's
//! frontier empties only once every worker of every process has closed its
//! input, that is, once every worker knows of the stop: only then does any
//! worker drop the job's dataflow. That ordering is what keeps the shutdown
//! clean: no process closes its connections before every peer has marked
//! itself as stopping, so a peer's connection closing afterwards is a stop,
//! not a fault (see `cluster::watch_peers` and the network panic hook),
//! and timely's network threads of every process end with timely's own
//! shutdown message. A peer that dies without announcing a stop is still
//! a lost peer.
//!
//! A job that ends on its own (files read to their end) ends through the
//! agreement too, in two steps, because a worker that has closed its input
//! can no longer announce anything. A worker whose dataflow has ended, and
//! whose process's billing sink has committed all it was handed
//! ([`OutputsDone`]), advances its input from [`WORKING`] to [`FINISHED`]
//! and keeps it open; once every worker's has (the agreement's frontier is
//! past `WORKING`), each closes it. Until then a stop that reaches any
//! process still reaches every other one, the sink included: a SIGTERM to
//! process 1 while process 0 still writes period files stops both, and
//! both exit as stopped ones. The processes of a file cluster therefore
//! end together, when process 0's outputs are complete.

use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::vec::Input as _;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::Thread;
use std::time::Duration;

/// How often a parked worker looks at the stop flag.
pub const STOP_CHECK: Duration = Duration::from_millis(100);

/// The agreement's time while a worker's part of the job is under way.
const WORKING: u64 = 0;
/// The agreement's time once a worker's part is done (see the module docs).
const FINISHED: u64 = 1;

/// One worker's end of the stop agreement (see the module docs).
pub struct StopAgreement {
    /// Open until this worker knows the job is stopping or every worker's
    /// part is done.
    input: Option<InputHandleVec<u64, usize>>,
    probe: ProbeHandle<u64>,
    /// The first worker index heard announcing a stop.
    heard: Rc<Cell<Option<usize>>>,
    /// This worker's index.
    index: usize,
}

impl StopAgreement {
    /// Installs the agreement's dataflow. Every worker must call this at
    /// the same point of its dataflow construction (timely matches
    /// dataflows across workers by the order they are built in).
    pub fn install(worker: &mut Worker) -> StopAgreement {
        let heard = Rc::new(Cell::new(None));
        let into = heard.clone();
        let (input, probe) = worker.dataflow::<u64, _, _>(|scope| {
            let (input, announcements) = scope.new_input::<usize>();
            let (probe, _) = announcements
                .broadcast()
                .inspect(move |announcer: &usize| {
                    if into.get().is_none() {
                        into.set(Some(*announcer));
                    }
                })
                .probe();
            (input, probe)
        });
        StopAgreement {
            input: Some(input),
            probe,
            heard,
            index: worker.index(),
        }
    }

    /// Tells every worker that this one was told to stop, once.
    fn announce(&mut self) {
        if let Some(mut input) = self.input.take() {
            input.send(self.index);
            // Dropped: closed, and what was sent is flushed on the next step.
        }
    }

    /// This worker's part of a job that ends on its own is done; it can
    /// still announce a stop. True the first time.
    fn finish(&mut self) -> bool {
        match &mut self.input {
            Some(input) if input.time() < &FINISHED => {
                input.advance_to(FINISHED);
                true
            }
            _ => false,
        }
    }

    /// Every worker's part is done: the job has ended on its own.
    fn all_finished(&self) -> bool {
        !self.probe.less_equal(&WORKING)
    }

    /// This worker knows the job is stopping or has ended.
    fn close(&mut self) {
        self.input.take();
    }

    /// Every worker of every process has closed its input.
    fn agreed(&self) -> bool {
        self.probe.done()
    }
}

/// Whether this process's outputs are complete: set when its billing sink
/// thread ends (at once in a process without one). Setting it wakes the
/// workers waiting for it, so a finished run ends without a parked
/// worker's timeout.
#[derive(Clone, Default)]
pub struct OutputsDone {
    inner: Arc<OutputsDoneInner>,
}

#[derive(Default)]
struct OutputsDoneInner {
    done: AtomicBool,
    /// The worker threads to wake when `done` is set.
    waiting: Mutex<Vec<Thread>>,
}

impl OutputsDone {
    /// For a process that writes no billing output.
    pub fn already() -> Self {
        let done = OutputsDone::default();
        done.set();
        done
    }

    /// The outputs are complete (or abandoned on a stop).
    pub fn set(&self) {
        self.inner.done.store(true, Ordering::Release);
        let waiting = self
            .inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for thread in waiting.iter() {
            thread.unpark();
        }
    }

    fn is_set(&self) -> bool {
        self.inner.done.load(Ordering::Acquire)
    }

    /// Wakes the calling thread when set.
    fn wake_me(&self) {
        let mut waiting = self
            .inner
            .waiting
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        waiting.push(std::thread::current());
    }
}

/// Steps until the job's dataflow `main` ends on its own (files) and
/// `outputs` are complete, or the job is stopped, locally (`stop`, set by
/// a signal) or by any worker of the cluster. On a stop, `main` is dropped,
/// never let run to its end, and only once every worker knows of the stop.
/// `on_heard` is called with the announcing worker's index when a stop is
/// first learnt from another worker rather than from `stop`; `on_finished`
/// when this worker's part is done and it waits for the others'. The
/// timeout only bounds how late a stop is noticed.
pub fn step_until_done(
    worker: &mut Worker,
    main: usize,
    agreement: &mut StopAgreement,
    stop: &AtomicBool,
    outputs: &OutputsDone,
    on_heard: impl Fn(usize),
    on_finished: impl Fn(),
) {
    outputs.wake_me();
    loop {
        if agreement.agreed() {
            // Dropping the dataflow, unlike letting its sources end, never
            // empties a frontier: nothing pending is finalized.
            for dataflow in worker.installed_dataflows() {
                worker.drop_dataflow(dataflow);
            }
            return;
        }
        if agreement.input.is_some() {
            if stop.load(Ordering::Relaxed) {
                agreement.announce();
            } else if let Some(announcer) = agreement.heard.get() {
                // The flag makes this whole process stop as if signalled:
                // the other workers, the sink, and the peer watch, which
                // must take the announcer's connection closing for a stop.
                if !stop.swap(true, Ordering::Relaxed) {
                    on_heard(announcer);
                }
                agreement.close();
            } else if agreement.all_finished() {
                agreement.close();
            } else if !worker.installed_dataflows().contains(&main)
                && outputs.is_set()
                && agreement.finish()
            {
                on_finished();
            }
        }
        worker.step_or_park(Some(STOP_CHECK));
    }
}
