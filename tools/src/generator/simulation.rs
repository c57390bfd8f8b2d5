//! The simulated audience: streams, viewers and what they do.
//!
//! Kept apart from the ads, the planted faults and the arrival order because
//! this is the part that makes the traffic look like a livestream platform's,
//! and the one to read first.
//!
//! * **Streams.** [`GenConfig::streams`] channels (`stream-1`, `stream-2`, ...)
//!   with Zipf-like popularity: a new viewer picks stream `i` (1-based) with
//!   weight `1/i`, so the top stream holds roughly a quarter to a third of
//!   the audience.
//! * **Viewers.** Viewers arrive as a Poisson process, `join` a stream, send a
//!   `heartbeat` every ~10 s (±1 s jitter) and `leave` when their session ends
//!   (sessions are a mix of 20 s–3 min, 3–30 min and 30–120 min). About 15 %
//!   never send `leave` and simply stop heartbeating. The capture starts
//!   mid-broadcast: the audience present at `start_ts` is announced by
//!   heartbeats only (no `join`), with remaining session lengths drawn as in
//!   a steady state.
//! * **Chat.** Viewers are lurkers (never chat), occasional chatters or chatty
//!   ones whose messages come in bursts. Each stream has "hype moments" during
//!   which chat gaps shrink four-fold and a slice of the audience chats at once.
//! * **Ads.** Every stream runs an ad break every 2–6 minutes, in which each
//!   present viewer gets a pod of one or two `impression`s (clients fetch
//!   them within 20 s); every viewer also gets mid-rolls of their own every
//!   few minutes, and 40 % of joins a pre-roll. Ads, campaigns and
//!   advertisers come from small pools; prices are 500..=50 000 micros.
//!   Each impression is followed by cumulative `ad_progress` updates at
//!   +1 s, +2 s, +5 s, +10 s, ... up to the ad's length. Most qualify
//!   (reach 2000 ms watched) within seconds; some qualify slowly, after 1–4
//!   minutes of pause; a few only get there after the 5-minute window; and
//!   [`GenConfig::never_qualify_rate`]
//!   of them stop below 2000 ms. (The ads themselves are in `ads.rs`.)
//! * **Rate.** The arrival rate is steered to keep the configured records
//!   per second (`pacing.rs`).
//!
//! [`GenConfig::streams`]: super::GenConfig::streams
//! [`GenConfig::never_qualify_rate`]: super::GenConfig::never_qualify_rate

use rand::Rng;

use super::encoding::Body;
use super::{Generator, F_IMPRESSION};

pub(super) const HEARTBEAT_MS: u64 = 10_000;
/// A viewer's own mid-rolls: every MIN + Exp(MEAN) ms.
pub(super) const PERSONAL_AD_MIN_MS: u64 = 60_000;
pub(super) const PERSONAL_AD_MEAN_MS: f64 = 240_000.0;
/// Streams' ad breaks: every MIN..=MAX ms.
pub(super) const AD_BREAK_MIN_MS: u64 = 120_000;
pub(super) const AD_BREAK_MAX_MS: u64 = 360_000;

/// Session length classes: (probability, min ms, max ms).
pub(super) const SESSIONS: [(f64, u64, u64); 3] = [
    (0.35, 20_000, 180_000),
    (0.45, 180_000, 1_800_000),
    (0.20, 1_800_000, 7_200_000),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Style {
    Lurker,
    Occasional,
    Chatty,
}

pub(super) struct Viewer {
    id: u64,
    end: u64,
    stream: u32,
    epoch: u32,
    pos: u32,
    alive: bool,
    silent: bool,
    style: Style,
}

pub(super) struct Stream {
    members: Vec<u32>,
    hype_until: u64,
}

impl Stream {
    pub(super) fn new() -> Self {
        Stream {
            members: Vec::new(),
            hype_until: 0,
        }
    }
}

/// Cumulative popularity of `n_streams` streams: the one at index `i` has
/// weight `1/(i + 1)`.
pub(super) fn zipf_cdf(n_streams: usize) -> Vec<f64> {
    let mut zipf_cdf = Vec::with_capacity(n_streams);
    let mut acc = 0.0;
    for i in 0..n_streams {
        acc += 1.0 / (i + 1) as f64;
        zipf_cdf.push(acc);
    }
    for c in &mut zipf_cdf {
        *c /= acc;
    }
    zipf_cdf
}

/// The mean session length (ms) over the classes of [`SESSIONS`].
pub(super) fn mean_session_ms() -> f64 {
    SESSIONS
        .iter()
        .map(|&(p, lo, hi)| p * (lo + hi) as f64 / 2.0)
        .sum()
}

#[derive(Clone, Copy, Debug)]
pub(super) enum Action {
    /// Once per second of event time: adjust the audience target.
    Tick,
    /// A new viewer joins.
    Arrival,
    Heartbeat {
        slot: u32,
        epoch: u32,
    },
    /// The viewer's session ends (leave, or silence).
    End {
        slot: u32,
        epoch: u32,
    },
    Chat {
        slot: u32,
        epoch: u32,
        repeat: bool,
    },
    /// An ad is shown to the viewer; `repeat`: the viewer's own ad timer
    /// (rather than a pre-roll or a stream's ad break).
    Ad {
        slot: u32,
        epoch: u32,
        repeat: bool,
    },
    Progress {
        stream: u32,
        viewer: u64,
        imp: u64,
        watched: u64,
    },
    AdBreak {
        stream: u32,
    },
    Hype {
        stream: u32,
    },
    /// A planted second impression record for an existing impression id.
    DupImpression {
        stream: u32,
        viewer: u64,
        imp: u64,
        ad: u64,
        price: u64,
    },
}

impl Generator {
    /// Processes the earliest scheduled action.
    pub(super) fn step(&mut self) {
        let (ts, action) = self.sched.pop().expect("a tick is always scheduled");
        debug_assert!(ts >= self.now);
        self.now = ts;
        match action {
            Action::Tick => self.tick(),
            Action::Arrival => self.arrival(),
            Action::Heartbeat { slot, epoch } => self.heartbeat(slot, epoch),
            Action::End { slot, epoch } => self.end(slot, epoch),
            Action::Chat {
                slot,
                epoch,
                repeat,
            } => self.chat(slot, epoch, repeat),
            Action::Ad {
                slot,
                epoch,
                repeat,
            } => {
                if self.live(slot, epoch) {
                    let v = &self.viewers[slot as usize];
                    let (stream, viewer) = (v.stream, v.id);
                    self.impression(stream, viewer);
                    if repeat {
                        let next = ts + PERSONAL_AD_MIN_MS + self.exp_ms(PERSONAL_AD_MEAN_MS);
                        self.at(next, action);
                    }
                }
            }
            Action::Progress {
                stream,
                viewer,
                imp,
                watched,
            } => self.emit(ts, stream, viewer, Body::Progress { imp, watched }),
            Action::AdBreak { stream } => self.ad_break(stream),
            Action::Hype { stream } => self.hype(stream),
            Action::DupImpression {
                stream,
                viewer,
                imp,
                ad,
                price,
            } => self.emit(ts, stream, viewer, Body::Impression { imp, ad, price }),
        }
        self.fire_due_plants();
    }

    /// The audience present at `start_ts`, plus the per-stream processes.
    pub(super) fn populate(&mut self) {
        let start = self.now;
        let initial = (self.target_rate / self.per_viewer).round().max(1.0) as u64;
        for i in 0..initial {
            let stream = self.pick_stream();
            let remaining = self.residual_session();
            // The very first record is a heartbeat at exactly start_ts.
            let first_hb = if i == 0 {
                start
            } else {
                start + self.rng.random_range(0..HEARTBEAT_MS)
            };
            self.add_viewer(stream, start + remaining, first_hb, true);
        }
        for stream in 0..self.streams.len() as u32 {
            let first_break = start + self.rng.random_range(0..=AD_BREAK_MAX_MS);
            self.at(first_break, Action::AdBreak { stream });
            let first_hype = start + self.exp_ms(150_000.0);
            self.at(first_hype, Action::Hype { stream });
        }
        self.at(start + 1000, Action::Tick);
        let gap = self.arrival_gap();
        self.at(start + gap, Action::Arrival);
    }

    pub(super) fn arrival(&mut self) {
        let now = self.now;
        let stream = self.pick_stream();
        let session = self.session_length();
        let first_hb = now
            + self
                .rng
                .random_range(HEARTBEAT_MS - 2000..=HEARTBEAT_MS + 2000);
        let slot = self.add_viewer(stream, now + session, first_hb, false);
        let (viewer, epoch) = {
            let v = &self.viewers[slot as usize];
            (v.id, v.epoch)
        };
        self.emit(now, stream, viewer, Body::Join);
        if self.rng.random_bool(0.4) {
            let pre_roll = now + self.rng.random_range(500..=3000);
            self.at(
                pre_roll,
                Action::Ad {
                    slot,
                    epoch,
                    repeat: false,
                },
            );
        }
        let gap = self.arrival_gap();
        self.at(now + gap, Action::Arrival);
    }

    pub(super) fn add_viewer(
        &mut self,
        stream: u32,
        end: u64,
        first_hb: u64,
        initial: bool,
    ) -> u32 {
        let id = self.next_viewer;
        self.next_viewer += 1;
        let style = match self.rng.random_range(0..100) {
            0..40 => Style::Lurker,
            40..75 => Style::Occasional,
            _ => Style::Chatty,
        };
        let silent = self.rng.random_bool(0.15);
        let pos = self.streams[stream as usize].members.len() as u32;
        let viewer = Viewer {
            id,
            end,
            stream,
            epoch: 0,
            pos,
            alive: true,
            silent,
            style,
        };
        let slot = match self.free.pop() {
            Some(slot) => {
                let v = &mut self.viewers[slot as usize];
                let epoch = v.epoch;
                *v = Viewer { epoch, ..viewer };
                slot
            }
            None => {
                self.viewers.push(viewer);
                (self.viewers.len() - 1) as u32
            }
        };
        self.streams[stream as usize].members.push(slot);
        self.alive += 1;
        let epoch = self.viewers[slot as usize].epoch;
        if first_hb < end {
            self.at(first_hb, Action::Heartbeat { slot, epoch });
        } else {
            self.at(end, Action::End { slot, epoch });
        }
        self.schedule_chat(slot, epoch, style, stream, end);
        // The viewer's own mid-rolls (phase uniform for the initial audience).
        let first_ad = if initial {
            self.rng
                .random_range(0..PERSONAL_AD_MIN_MS + PERSONAL_AD_MEAN_MS as u64)
        } else {
            PERSONAL_AD_MIN_MS + self.exp_ms(PERSONAL_AD_MEAN_MS)
        };
        if self.now + first_ad < end {
            self.at(
                self.now + first_ad,
                Action::Ad {
                    slot,
                    epoch,
                    repeat: true,
                },
            );
        }
        slot
    }

    pub(super) fn live(&self, slot: u32, epoch: u32) -> bool {
        let v = &self.viewers[slot as usize];
        v.alive && v.epoch == epoch && self.now < v.end
    }

    pub(super) fn heartbeat(&mut self, slot: u32, epoch: u32) {
        if !self.live(slot, epoch) {
            return;
        }
        let (stream, viewer, end) = {
            let v = &self.viewers[slot as usize];
            (v.stream, v.id, v.end)
        };
        self.emit(self.now, stream, viewer, Body::Heartbeat);
        let next = self.now
            + self
                .rng
                .random_range(HEARTBEAT_MS - 1000..=HEARTBEAT_MS + 1000);
        if next < end {
            self.at(next, Action::Heartbeat { slot, epoch });
        } else {
            self.at(end, Action::End { slot, epoch });
        }
    }

    pub(super) fn end(&mut self, slot: u32, epoch: u32) {
        let v = &self.viewers[slot as usize];
        if !v.alive || v.epoch != epoch {
            return;
        }
        let (stream, viewer, silent, pos) = (v.stream, v.id, v.silent, v.pos as usize);
        if !silent {
            self.emit(self.now, stream, viewer, Body::Leave);
        }
        let v = &mut self.viewers[slot as usize];
        v.alive = false;
        v.epoch = v.epoch.wrapping_add(1);
        let members = &mut self.streams[stream as usize].members;
        members.swap_remove(pos);
        if let Some(&moved) = members.get(pos) {
            self.viewers[moved as usize].pos = pos as u32;
        }
        self.free.push(slot);
        self.alive -= 1;
    }

    pub(super) fn chat(&mut self, slot: u32, epoch: u32, repeat: bool) {
        if !self.live(slot, epoch) {
            return;
        }
        let (stream, viewer, end, style) = {
            let v = &self.viewers[slot as usize];
            (v.stream, v.id, v.end, v.style)
        };
        self.emit(self.now, stream, viewer, Body::Chat);
        if repeat {
            self.schedule_chat(slot, epoch, style, stream, end);
        }
    }

    /// Schedules this viewer's next chat message, if its style chats and the
    /// session lasts that long.
    pub(super) fn schedule_chat(
        &mut self,
        slot: u32,
        epoch: u32,
        style: Style,
        stream: u32,
        end: u64,
    ) {
        if let Some(gap) = self.chat_gap(style, stream) {
            if self.now + gap < end {
                let repeat = true;
                self.at(
                    self.now + gap,
                    Action::Chat {
                        slot,
                        epoch,
                        repeat,
                    },
                );
            }
        }
    }

    pub(super) fn chat_gap(&mut self, style: Style, stream: u32) -> Option<u64> {
        let gap = match style {
            Style::Lurker => return None,
            Style::Occasional => self.exp_ms(30_000.0),
            Style::Chatty => {
                if self.rng.random_bool(0.3) {
                    self.rng.random_range(800..=4000)
                } else {
                    self.exp_ms(8_000.0)
                }
            }
        };
        let hype = self.now < self.streams[stream as usize].hype_until;
        Some(if hype { gap / 4 } else { gap }.max(200))
    }

    pub(super) fn ad_break(&mut self, stream: u32) {
        let now = self.now;
        let members = self.streams[stream as usize].members.clone();
        for slot in members {
            let epoch = self.viewers[slot as usize].epoch;
            let pod = if self.rng.random_bool(0.35) { 2 } else { 1 };
            // Clients fetch their ads at slightly different times.
            let mut t = now + self.rng.random_range(0..=20_000);
            for _ in 0..pod {
                let ad = Action::Ad {
                    slot,
                    epoch,
                    repeat: false,
                };
                self.at(t, ad);
                t += self.rng.random_range(15_000..=31_000);
            }
        }
        let next = now + self.rng.random_range(AD_BREAK_MIN_MS..=AD_BREAK_MAX_MS);
        self.at(next, Action::AdBreak { stream });
    }

    pub(super) fn hype(&mut self, stream: u32) {
        let now = self.now;
        let until = now + self.rng.random_range(10_000..=45_000);
        self.streams[stream as usize].hype_until = until;
        let n = self.streams[stream as usize].members.len();
        for _ in 0..(n / 8).min(400) {
            let slot = self.streams[stream as usize].members[self.rng.random_range(0..n)];
            let epoch = self.viewers[slot as usize].epoch;
            let t = now + self.rng.random_range(0..=10_000);
            self.at(
                t,
                Action::Chat {
                    slot,
                    epoch,
                    repeat: false,
                },
            );
        }
        let next = until + self.exp_ms(150_000.0);
        self.at(next, Action::Hype { stream });
    }

    /// A (stream, viewer) currently watching, or a fresh viewer id.
    pub(super) fn random_present(&mut self) -> (u32, u64) {
        let stream = self.pick_stream();
        let members = &self.streams[stream as usize].members;
        if members.is_empty() {
            let id = self.next_viewer;
            self.next_viewer += 1;
            (stream, id)
        } else {
            let slot = members[self.rng.random_range(0..members.len())];
            (stream, self.viewers[slot as usize].id)
        }
    }

    /// Creates a valid on-time event and queues it.
    pub(super) fn emit(&mut self, ts: u64, stream: u32, viewer: u64, body: Body) {
        let flags = if matches!(body, Body::Impression { .. }) {
            F_IMPRESSION
        } else {
            0
        };
        let key = self.key(ts);
        let bytes = self.record(ts, stream, viewer, body);
        self.push_valid(ts, key, bytes, flags);
    }

    // ----- sampling -----------------------------------------------------

    pub(super) fn pick_stream(&mut self) -> u32 {
        let u: f64 = self.rng.random();
        let i = self.zipf_cdf.partition_point(|&c| c < u);
        i.min(self.zipf_cdf.len() - 1) as u32
    }

    pub(super) fn session_length(&mut self) -> u64 {
        let mut u: f64 = self.rng.random();
        for &(p, lo, hi) in &SESSIONS {
            if u < p {
                return self.rng.random_range(lo..=hi);
            }
            u -= p;
        }
        let (_, lo, hi) = SESSIONS[SESSIONS.len() - 1];
        self.rng.random_range(lo..=hi)
    }

    /// Remaining session of a viewer already present (length-biased class,
    /// uniform position within the session).
    pub(super) fn residual_session(&mut self) -> u64 {
        let weight = |&(p, lo, hi): &(f64, u64, u64)| p * (lo + hi) as f64;
        let total: f64 = SESSIONS.iter().map(weight).sum();
        let mut u = self.rng.random::<f64>() * total;
        let mut class = SESSIONS[SESSIONS.len() - 1];
        for s in &SESSIONS {
            if u < weight(s) {
                class = *s;
                break;
            }
            u -= weight(s);
        }
        let length = self.rng.random_range(class.1..=class.2);
        (length as f64 * self.rng.random::<f64>()).max(1000.0) as u64
    }

    /// Exponentially distributed duration (ms) with the given mean.
    pub(super) fn exp_ms(&mut self, mean: f64) -> u64 {
        let u: f64 = self.rng.random();
        (-(1.0 - u).ln() * mean) as u64
    }
}
