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
//! A worker whose input ended on its own (a file read to its end) closes
//! its agreement input without announcing anything, so a finished job
//! ends as before.

use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::vec::Input as _;
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};
use timely::worker::Worker;

use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// How often a parked worker looks at the stop flag.
pub const STOP_CHECK: Duration = Duration::from_millis(100);

/// One worker's end of the stop agreement (see the module docs).
pub struct StopAgreement {
    /// Open until this worker knows the job is stopping or its input ended.
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

    /// This worker knows the job is stopping or has ended on its own.
    fn close(&mut self) {
        self.input.take();
    }

    /// Every worker of every process has closed its input.
    fn agreed(&self) -> bool {
        self.probe.done()
    }
}

/// Steps until the job's dataflow `main` ends on its own (files) or the job
/// is stopped, locally (`stop`, set by a signal) or by any worker of the
/// cluster. On a stop, `main` is dropped, never let run to its end, and
/// only once every worker knows of the stop. `on_heard` is called with the
/// announcing worker's index when a stop is first learnt from another
/// worker rather than from `stop`. The timeout only bounds how late a stop
/// is noticed.
pub fn step_until_done(
    worker: &mut Worker,
    main: usize,
    agreement: &mut StopAgreement,
    stop: &AtomicBool,
    on_heard: impl Fn(usize),
) {
    loop {
        let running = worker.installed_dataflows().contains(&main);
        if agreement.agreed() {
            // Dropping the dataflow, unlike letting its sources end, never
            // empties a frontier: nothing pending is finalized.
            for dataflow in worker.installed_dataflows() {
                worker.drop_dataflow(dataflow);
            }
            return;
        }
        if stop.load(Ordering::Relaxed) {
            agreement.announce();
        } else if let Some(announcer) = agreement.heard.get() {
            // The flag makes this whole process stop as if signalled: the
            // other workers, the sink, and the peer watch, which must take
            // the announcer's connection closing for a stop.
            if !stop.swap(true, Ordering::Relaxed) {
                on_heard(announcer);
            }
            agreement.close();
        } else if !running {
            agreement.close();
        }
        worker.step_or_park(Some(STOP_CHECK));
    }
}
