//! An independent reference for docs/contract.md, Billing rules, written to
//! be obviously right rather than fast: it replays one partition record by
//! record, exactly as the contract words it (watermark before each record,
//! pending until the watermark passes `ts + window`, late once final), with
//! plain maps. It shares nothing with the dataflow but the event parser,
//! whose strictness is tested on its own.

use livepipe_dataflow::event::{Event, EventKind};
use livepipe_dataflow::parse::parse_event;

use std::collections::{BTreeMap, BTreeSet, HashMap};

#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub qualify_ms: u64,
    pub window: u64,
    pub lateness: u64,
    pub period: u64,
}

impl Rules {
    /// The contract's defaults, which `livepipe run` uses without rule flags.
    pub const DEFAULTS: Rules = Rules {
        qualify_ms: 2_000,
        window: 300_000,
        lateness: 5_000,
        period: 60_000,
    };
}

#[derive(Clone, Debug)]
struct Pending {
    canonical: Event,
    progress_ts: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// File name -> exact bytes.
    pub files: BTreeMap<String, Vec<u8>>,
    /// The header-only file (one of `files`) of the run after the last
    /// billable period, if there is one: only the end of a finite input
    /// writes it (a live topic has no end, and a later billable period would
    /// extend the run).
    pub open_run: Option<String>,
    /// Ids that expired.
    pub expired: BTreeSet<String>,
    /// Line numbers (1-based) of rejected lines.
    pub rejected_lines: BTreeSet<u64>,
    /// (line, reason) of impressions and qualifying progress that came too
    /// late to count.
    pub late: BTreeSet<(u64, String)>,
}

fn impression_id(event: &Event) -> Option<&str> {
    match &event.kind {
        EventKind::Impression(i) => Some(&i.impression_id),
        EventKind::AdProgress(p) => Some(&p.impression_id),
        _ => None,
    }
}

/// Billing of one input file (one partition), per docs/contract.md,
/// Billing rules.
pub fn expected(lines: &[&[u8]], rules: Rules) -> Expected {
    let now_ms = crate::now_ms();
    let mut max_ts: Option<u64> = None;
    let mut pending: HashMap<String, Pending> = HashMap::new();
    // Progress seen for ids with no impression yet.
    let mut orphan_progress: HashMap<String, Vec<u64>> = HashMap::new();
    let mut finals: BTreeMap<String, (Event, Option<u64>)> = BTreeMap::new();
    let mut rejected_lines = BTreeSet::new();
    let mut late = BTreeSet::new();

    let finalize = |pending: &mut HashMap<String, Pending>,
                    finals: &mut BTreeMap<String, (Event, Option<u64>)>,
                    watermark: Option<u64>| {
        let due: Vec<String> = pending
            .iter()
            .filter(|(_, p)| watermark.is_none_or(|w| w > p.canonical.ts + rules.window))
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let p = pending.remove(&id).unwrap();
            let start = p.canonical.ts;
            let qualified = p
                .progress_ts
                .iter()
                .copied()
                .filter(|&ts| ts >= start && ts <= start + rules.window)
                .min();
            finals.insert(id, (p.canonical, qualified));
        }
    };

    for (index, line) in lines.iter().enumerate() {
        // Event time is never in the future: more than 10 minutes ahead of
        // the wall clock is rejected (`ts_ahead_of_clock`), from any source.
        let event = match parse_event(line) {
            Ok(event) if event.ts <= now_ms + 10 * 60 * 1000 => event,
            _ => {
                rejected_lines.insert(index as u64 + 1);
                continue;
            }
        };
        let watermark = max_ts.map_or(0, |m| m.saturating_sub(rules.lateness));
        if let Some(id) = impression_id(&event).map(str::to_string) {
            let line = index as u64 + 1;
            let counts = match &event.kind {
                EventKind::Impression(_) => true,
                EventKind::AdProgress(p) => p.watched_ms >= rules.qualify_ms,
                _ => false,
            };
            let window_closed = matches!(event.kind, EventKind::Impression(_))
                && watermark > event.ts + rules.window;
            if window_closed {
                late.insert((line, "window_closed".to_string()));
            } else if counts && finals.contains_key(&id) {
                late.insert((line, "impression_final".to_string()));
            }
            if !finals.contains_key(&id) {
                match &event.kind {
                    EventKind::Impression(_) if watermark <= event.ts + rules.window => {
                        let mut progress = orphan_progress.remove(&id).unwrap_or_default();
                        match pending.get_mut(&id) {
                            Some(p) => {
                                let better = (event.ts, &event.event_id)
                                    < (p.canonical.ts, &p.canonical.event_id);
                                if better {
                                    p.canonical = event.clone();
                                }
                                p.progress_ts.append(&mut progress);
                            }
                            None => {
                                pending.insert(
                                    id,
                                    Pending {
                                        canonical: event.clone(),
                                        progress_ts: progress,
                                    },
                                );
                            }
                        }
                    }
                    EventKind::AdProgress(p) if p.watched_ms >= rules.qualify_ms => {
                        match pending.get_mut(&id) {
                            Some(p) => p.progress_ts.push(event.ts),
                            None => orphan_progress.entry(id).or_default().push(event.ts),
                        }
                    }
                    _ => {}
                }
            }
        }
        max_ts = Some(max_ts.map_or(event.ts, |m| m.max(event.ts)));
        let watermark = max_ts.map(|m| m.saturating_sub(rules.lateness));
        finalize(&mut pending, &mut finals, watermark);
    }
    finalize(&mut pending, &mut finals, None);

    let mut periods: BTreeMap<u64, Vec<(&String, &Event, u64)>> = BTreeMap::new();
    let mut expired = BTreeSet::new();
    for (id, (event, qualified)) in &finals {
        let period = event.ts - event.ts % rules.period;
        let rows = periods.entry(period).or_default();
        match qualified {
            Some(q) => rows.push((id, event, *q)),
            None => {
                expired.insert(id.clone());
            }
        }
    }
    // Coverage: from the first period holding a finalized impression to
    // the last, a file per period with billed rows, and one header-only file
    // for each gap between them (each maximal run of periods without any).
    let header = "impression_id,ad_id,campaign_id,advertiser_id,stream_id,viewer_id,impression_ts,qualified_ts,price_micros\n";
    let mut files = BTreeMap::new();
    let mut open_run = None;
    if let (Some(&first), Some(&last)) = (periods.keys().next(), periods.keys().last()) {
        let mut covered_to = first;
        for (&period, rows) in periods.iter().filter(|(_, rows)| !rows.is_empty()) {
            if covered_to < period {
                files.insert(
                    format!("billable-{covered_to}-{period}.csv"),
                    header.as_bytes().to_vec(),
                );
            }
            let mut csv = String::from(header);
            let mut rows = rows.clone();
            rows.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()));
            for (id, event, qualified) in rows {
                let EventKind::Impression(imp) = &event.kind else {
                    unreachable!()
                };
                let fields = [
                    id.clone(),
                    imp.ad_id.to_string(),
                    imp.campaign_id.to_string(),
                    imp.advertiser_id.to_string(),
                    event.stream_id.to_string(),
                    event.viewer_id.to_string(),
                    event.ts.to_string(),
                    qualified.to_string(),
                    imp.price_micros.to_string(),
                ];
                let quoted: Vec<String> = fields.iter().map(|f| quote(f)).collect();
                csv.push_str(&quoted.join(","));
                csv.push('\n');
            }
            files.insert(
                format!("billable-{period}-{}.csv", period + rules.period),
                csv.into_bytes(),
            );
            covered_to = period + rules.period;
        }
        let end = last + rules.period;
        if covered_to < end {
            let name = format!("billable-{covered_to}-{end}.csv");
            files.insert(name.clone(), header.as_bytes().to_vec());
            open_run = Some(name);
        }
    }
    Expected {
        files,
        open_run,
        expired,
        rejected_lines,
        late,
    }
}

fn quote(field: &str) -> String {
    if field.contains([',', '"', '\r', '\n']) {
        format!("\"{}\"", field.replace('"', "\"\""))
    } else {
        field.to_string()
    }
}

/// The last live snapshot of every stream not retired once a file has been
/// read (docs/contract.md, Live path), as (viewers, chat_per_min) at `now`
/// = the highest `ts`.
///
/// Retired: a stream with no viewer and no chat for longer than the TTL. A
/// viewer counts for a TTL after its presence, a chat for a minute, and a
/// leave matters for a TTL (a later-arriving presence older than it must
/// meet it); so a stream stays while one of its live events has
/// `ts + 2 ttl >= now` or one of its chats has `ts + 60 s + ttl >= now`.
pub fn expected_live(lines: &[&[u8]], presence_ttl: u64) -> (u64, BTreeMap<String, (u64, u64)>) {
    let now_ms = crate::now_ms();
    let events: Vec<Event> = lines
        .iter()
        .filter_map(|l| parse_event(l).ok())
        .filter(|e| e.ts <= now_ms + 10 * 60 * 1000)
        .collect();
    let now = events.iter().map(|e| e.ts).max().unwrap_or(0);
    // Per (stream, viewer): latest presence, latest leave.
    let mut viewers: BTreeMap<(&str, &str), (u64, u64)> = BTreeMap::new();
    let mut streams: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut kept: BTreeSet<&str> = BTreeSet::new();
    for event in &events {
        let presence = matches!(
            event.kind,
            EventKind::Join | EventKind::Heartbeat | EventKind::Chat
        );
        let leave = matches!(event.kind, EventKind::Leave);
        if !(presence || leave) {
            continue;
        }
        streams.entry(event.stream_id.to_string()).or_default();
        let entry = viewers
            .entry((&event.stream_id, &event.viewer_id))
            .or_default();
        if presence {
            entry.0 = entry.0.max(event.ts);
        } else {
            entry.1 = entry.1.max(event.ts);
        }
        if matches!(event.kind, EventKind::Chat) && event.ts + 60_000 > now {
            streams.get_mut(event.stream_id.as_str()).unwrap().1 += 1;
        }
        let chat = matches!(event.kind, EventKind::Chat);
        if event.ts + 2 * presence_ttl >= now || (chat && event.ts + 60_000 + presence_ttl >= now) {
            kept.insert(event.stream_id.as_str());
        }
    }
    for ((stream, _), (presence, leave)) in viewers {
        if presence + presence_ttl > now && leave < presence {
            streams.get_mut(stream).unwrap().0 += 1;
        }
    }
    streams.retain(|stream, _| kept.contains(stream.as_str()));
    (now, streams)
}
