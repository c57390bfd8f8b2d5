//! Malformed lines: every way a record can fail the parser, one small
//! function per kind.
//!
//! Apart from the other planted faults because each kind mirrors one of the
//! parser's rejections, and the limits it steps over are the parser's own
//! constants (imported from `livepipe_dataflow::parse`, never copied).
//!
//! The kinds ([`MALS`]): not JSON, truncated JSON, `[1]` and other
//! non-objects, unknown `type`, missing fields, a float `ts` (`2e3`), a
//! string `ts`, a negative `ts`, a negative or too large `price_micros`, a
//! too large `watched_ms`, an id one byte over the parser's limit, an empty
//! id, a non-string id, duplicate keys, a blank line, invalid UTF-8 and a
//! lone surrogate (`\ud800`).
//!
//! A malformed line starts as a [`Draft`]: the fields of a valid event,
//! drawn the same way whatever the kind, which the kind then breaks.

use livepipe_dataflow::parse::{MAX_STR_BYTES, PRICE_MICROS_MAX, WATCHED_MS_MAX};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde_json::ser::{CompactFormatter, Formatter};

use super::ads::{advertiser_of, campaign_of};
use super::encoding::{infallible, Body};
use super::{Generator, F_MALFORMED};

/// A kind of malformed line.
#[derive(Clone, Copy, Debug)]
pub(super) struct Mal {
    /// The body the draft is built from (a [`Generator::some_body`] pick),
    /// for kinds that break a field only one body has; `None`: a random one.
    body: Option<u32>,
    /// Breaks the draft, drawing whatever else the kind needs.
    make: fn(&mut ChaCha8Rng, Draft) -> Vec<u8>,
}

const fn any_body(make: fn(&mut ChaCha8Rng, Draft) -> Vec<u8>) -> Mal {
    Mal { body: None, make }
}

/// Every kind, in a fixed order (random picks index into it).
pub(super) const MALS: [Mal; 19] = [
    any_body(not_json),
    any_body(truncated),
    any_body(array),
    any_body(not_object),
    any_body(unknown_type),
    any_body(missing_field),
    any_body(ts_float),
    any_body(ts_string),
    any_body(ts_negative),
    Mal {
        body: Some(2), // impression
        make: negative_price,
    },
    Mal {
        body: Some(2), // impression
        make: price_too_large,
    },
    Mal {
        body: Some(3), // ad_progress
        make: watched_too_large,
    },
    any_body(long_id),
    any_body(empty_id),
    any_body(id_not_string),
    any_body(duplicate_keys),
    any_body(blank),
    any_body(invalid_utf8),
    any_body(lone_surrogate),
];

/// A valid event's fields, for a kind to break.
pub(super) struct Draft {
    ts: u64,
    stream: u32,
    viewer: u64,
    fields: Vec<(&'static str, Val)>,
    /// The id field that the id kinds break.
    id_field: &'static str,
}

impl Draft {
    fn set(&mut self, name: &str, val: Val) {
        if let Some(f) = self.fields.iter_mut().find(|f| f.0 == name) {
            f.1 = val;
        }
    }

    /// The draft with field `name` set to `val`, as a line.
    fn with(mut self, name: &str, val: Val) -> Vec<u8> {
        self.set(name, val);
        self.render()
    }

    fn render(&self) -> Vec<u8> {
        render(&self.fields)
    }
}

impl Generator {
    pub(super) fn malformed(&mut self, kind: Mal) {
        let key = self.now + self.jitter();
        let draft = self.draft(kind);
        let bytes = (kind.make)(&mut self.rng, draft);
        self.push_raw(key, bytes, F_MALFORMED);
    }

    /// The valid event a malformed line of `kind` starts from. Every kind
    /// makes the same draws here, even those that ignore the draft.
    fn draft(&mut self, kind: Mal) -> Draft {
        let ts = self.now;
        let (stream, viewer) = self.random_present();
        let pick = match kind.body {
            Some(pick) => pick,
            None => self.rng.random_range(0..6),
        };
        let body = self.some_body(pick);
        let eid = self.next_event;
        self.next_event += 1;
        let fields = fields(eid, ts, stream, viewer, body);
        let id_field = ["event_id", "stream_id", "viewer_id"][self.rng.random_range(0..3)];
        Draft {
            ts,
            stream,
            viewer,
            fields,
            id_field,
        }
    }

    /// A body for a malformed line: 0 heartbeat, 1 chat, 2 impression,
    /// 3 ad_progress, 4 join, 5 leave.
    pub(super) fn some_body(&mut self, pick: u32) -> Body {
        match pick {
            0 => Body::Heartbeat,
            1 => Body::Chat,
            2 => {
                let imp = self.next_imp;
                self.next_imp += 1;
                let ad = self.pick_ad();
                let price = self.price(ad);
                Body::Impression { imp, ad, price }
            }
            3 => Body::Progress {
                imp: self.next_imp.saturating_sub(1).max(1),
                watched: self.rng.random_range(0..=30_000),
            },
            4 => Body::Join,
            _ => Body::Leave,
        }
    }
}

// ----- the kinds, in the order of MALS ----------------------------------

fn not_json(rng: &mut ChaCha8Rng, _: Draft) -> Vec<u8> {
    const GARBAGE: [&[u8]; 5] = [
        b"hello world",
        b"<html><head><title>502 Bad Gateway</title></head></html>",
        b"{type: heartbeat, ts: 1700000000000}",
        b"event=join stream=stream-1 viewer=v-1",
        b"{\"type\":\"chat\",\"event_id\":'e-1'}",
    ];
    GARBAGE[rng.random_range(0..GARBAGE.len())].to_vec()
}

fn truncated(rng: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let mut bytes = draft.render();
    let len = rng.random_range(1..bytes.len());
    bytes.truncate(len);
    bytes
}

fn array(_: &mut ChaCha8Rng, _: Draft) -> Vec<u8> {
    b"[1]".to_vec()
}

fn not_object(rng: &mut ChaCha8Rng, _: Draft) -> Vec<u8> {
    const NOT_OBJECTS: [&[u8]; 4] = [b"null", b"42", b"\"heartbeat\"", b"true"];
    NOT_OBJECTS[rng.random_range(0..NOT_OBJECTS.len())].to_vec()
}

fn unknown_type(rng: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    const TYPES: [&str; 7] = [
        "like",
        "follow",
        "gift",
        "subscribe",
        "JOIN",
        "Heartbeat",
        "",
    ];
    let t = TYPES[rng.random_range(0..TYPES.len())];
    draft.with("type", Val::S(t.to_string()))
}

fn missing_field(rng: &mut ChaCha8Rng, mut draft: Draft) -> Vec<u8> {
    let i = rng.random_range(0..draft.fields.len());
    draft.fields.remove(i);
    draft.render()
}

fn ts_float(rng: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let ts = draft.ts;
    let raw = match rng.random_range(0..3) {
        0 => "2e3".to_string(),
        1 => format!("{}.{:03}e3", ts / 1000, ts % 1000),
        _ => format!("{ts}.0"),
    };
    draft.with("ts", Val::Raw(raw.into_bytes()))
}

fn ts_string(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let ts = draft.ts.to_string();
    draft.with("ts", Val::S(ts))
}

fn ts_negative(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let ts = format!("-{}", draft.ts);
    draft.with("ts", Val::Raw(ts.into_bytes()))
}

fn negative_price(rng: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let p = rng.random_range(500..=50_000);
    draft.with("price_micros", Val::Raw(format!("-{p}").into_bytes()))
}

fn price_too_large(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    draft.with("price_micros", Val::N(PRICE_MICROS_MAX + 1))
}

fn watched_too_large(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    draft.with("watched_ms", Val::N(WATCHED_MS_MAX + 1))
}

/// An id one byte longer than the parser allows.
fn long_id(rng: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let field = draft.id_field;
    let mut id = format!("{}-", field.trim_end_matches("_id"));
    while id.len() <= MAX_STR_BYTES {
        id.push(char::from(b'a' + rng.random_range(0..26u8)));
    }
    draft.with(field, Val::S(id))
}

fn empty_id(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let field = draft.id_field;
    draft.with(field, Val::S(String::new()))
}

fn id_not_string(rng: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let val = if rng.random_bool(0.5) {
        Val::N(u64::from(draft.stream) + 1)
    } else {
        Val::Raw(b"null".to_vec())
    };
    let field = draft.id_field;
    draft.with(field, val)
}

fn duplicate_keys(rng: &mut ChaCha8Rng, mut draft: Draft) -> Vec<u8> {
    let (ts, viewer) = (draft.ts, draft.viewer);
    let fields = &mut draft.fields;
    match rng.random_range(0..3) {
        0 => fields.push(("ts", Val::N(ts + 1))),
        1 => fields.insert(1, ("type", Val::S("leave".to_string()))),
        _ => fields.push(("viewer_id", Val::S(format!("v-{}", viewer + 1)))),
    }
    draft.render()
}

fn blank(_: &mut ChaCha8Rng, _: Draft) -> Vec<u8> {
    Vec::new()
}

fn invalid_utf8(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    let mut raw = format!("\"v-{}", draft.viewer).into_bytes();
    raw.extend_from_slice(b"\xff\xfe\"");
    draft.with("viewer_id", Val::Raw(raw))
}

fn lone_surrogate(_: &mut ChaCha8Rng, draft: Draft) -> Vec<u8> {
    draft.with("viewer_id", Val::Raw(b"\"v-\\ud800\"".to_vec()))
}

/// A field value of a (possibly malformed) line.
pub(super) enum Val {
    S(String),
    N(u64),
    /// Written verbatim.
    Raw(Vec<u8>),
}

/// The fields of a valid event, for mutation into a malformed one.
pub(super) fn fields(
    eid: u64,
    ts: u64,
    stream: u32,
    viewer: u64,
    body: Body,
) -> Vec<(&'static str, Val)> {
    let mut f = vec![
        ("type", Val::S(body.name().to_string())),
        ("event_id", Val::S(format!("e-{eid}"))),
        ("ts", Val::N(ts)),
        (
            "stream_id",
            Val::S(format!("stream-{}", u64::from(stream) + 1)),
        ),
        ("viewer_id", Val::S(format!("v-{viewer}"))),
    ];
    match body {
        Body::Impression { imp, ad, price } => {
            f.push(("impression_id", Val::S(format!("imp-{imp}"))));
            f.push(("ad_id", Val::S(format!("ad-{}", ad + 1))));
            f.push((
                "campaign_id",
                Val::S(format!("cmp-{}", campaign_of(ad) + 1)),
            ));
            f.push((
                "advertiser_id",
                Val::S(format!("adv-{}", advertiser_of(ad) + 1)),
            ));
            f.push(("price_micros", Val::N(price)));
        }
        Body::Progress { imp, watched } => {
            f.push(("impression_id", Val::S(format!("imp-{imp}"))));
            f.push(("watched_ms", Val::N(watched)));
        }
        Body::Join | Body::Leave | Body::Heartbeat | Body::Chat => {}
    }
    f
}

pub(super) fn render(fields: &[(&'static str, Val)]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(256);
    let f = &mut CompactFormatter;
    infallible(f.begin_object(&mut buf));
    for (i, (key, val)) in fields.iter().enumerate() {
        infallible(f.begin_object_key(&mut buf, i == 0));
        serde_json::to_writer(&mut buf, key).expect("writing to a Vec");
        infallible(f.begin_object_value(&mut buf));
        match val {
            Val::S(s) => serde_json::to_writer(&mut buf, s).expect("writing to a Vec"),
            Val::N(n) => infallible(f.write_u64(&mut buf, *n)),
            Val::Raw(raw) => buf.extend_from_slice(raw),
        }
    }
    infallible(f.end_object(&mut buf));
    buf
}
