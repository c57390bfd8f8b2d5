//! Valid events as JSON bytes.
//!
//! Apart because this is the hot path of `livepipe gen` and of the
//! benchmarks' traffic: valid lines are written straight through serde_json's
//! compact formatter, with no intermediate value, in the wire order of
//! docs/contract.md. (Malformed lines are rare and built differently, as
//! editable field lists; see `malformed.rs`.)

use std::io;

use serde_json::ser::{CompactFormatter, Formatter};

use super::ads::{advertiser_of, campaign_of};
use super::Generator;

#[derive(Clone, Copy, Debug)]
pub(super) enum Body {
    Join,
    Leave,
    Heartbeat,
    Chat,
    Impression { imp: u64, ad: u64, price: u64 },
    Progress { imp: u64, watched: u64 },
}

impl Body {
    pub(super) fn name(self) -> &'static str {
        match self {
            Body::Join => "join",
            Body::Leave => "leave",
            Body::Heartbeat => "heartbeat",
            Body::Chat => "chat",
            Body::Impression { .. } => "impression",
            Body::Progress { .. } => "ad_progress",
        }
    }
}

impl Generator {
    /// Encodes a valid event with a fresh event id.
    pub(super) fn record(&mut self, ts: u64, stream: u32, viewer: u64, body: Body) -> Vec<u8> {
        let eid = self.next_event;
        self.next_event += 1;
        encode(eid, ts, stream, viewer, body)
    }
}

/// Builds one JSON object with serde_json's compact formatter. Keys and
/// values written with [`Obj::id`] must not need escaping (they are ASCII
/// letters, digits, `-` and `_`).
pub(super) struct Obj {
    buf: Vec<u8>,
    first: bool,
}

/// Writing into a `Vec<u8>` cannot fail.
pub(super) fn infallible(r: io::Result<()>) {
    debug_assert!(r.is_ok());
}

impl Obj {
    fn new() -> Self {
        let mut buf = Vec::with_capacity(224);
        infallible(CompactFormatter.begin_object(&mut buf));
        Obj { buf, first: true }
    }

    fn key(&mut self, key: &str) {
        let f = &mut CompactFormatter;
        infallible(f.begin_object_key(&mut self.buf, self.first));
        self.first = false;
        infallible(f.begin_string(&mut self.buf));
        infallible(f.write_string_fragment(&mut self.buf, key));
        infallible(f.end_string(&mut self.buf));
        infallible(f.end_object_key(&mut self.buf));
        infallible(f.begin_object_value(&mut self.buf));
    }

    fn text(&mut self, key: &str, value: &str) {
        self.key(key);
        let f = &mut CompactFormatter;
        infallible(f.begin_string(&mut self.buf));
        infallible(f.write_string_fragment(&mut self.buf, value));
        infallible(f.end_string(&mut self.buf));
        infallible(f.end_object_value(&mut self.buf));
    }

    /// A string value `"<prefix><n>"`.
    fn id(&mut self, key: &str, prefix: &str, n: u64) {
        self.key(key);
        let f = &mut CompactFormatter;
        infallible(f.begin_string(&mut self.buf));
        infallible(f.write_string_fragment(&mut self.buf, prefix));
        infallible(f.write_u64(&mut self.buf, n));
        infallible(f.end_string(&mut self.buf));
        infallible(f.end_object_value(&mut self.buf));
    }

    fn num(&mut self, key: &str, n: u64) {
        self.key(key);
        let f = &mut CompactFormatter;
        infallible(f.write_u64(&mut self.buf, n));
        infallible(f.end_object_value(&mut self.buf));
    }

    fn finish(mut self) -> Vec<u8> {
        infallible(CompactFormatter.end_object(&mut self.buf));
        self.buf
    }
}

/// One valid event, keys in wire order.
pub(super) fn encode(eid: u64, ts: u64, stream: u32, viewer: u64, body: Body) -> Vec<u8> {
    let mut o = Obj::new();
    o.text("type", body.name());
    o.id("event_id", "e-", eid);
    o.num("ts", ts);
    o.id("stream_id", "stream-", u64::from(stream) + 1);
    o.id("viewer_id", "v-", viewer);
    match body {
        Body::Impression { imp, ad, price } => {
            o.id("impression_id", "imp-", imp);
            o.id("ad_id", "ad-", ad + 1);
            o.id("campaign_id", "cmp-", campaign_of(ad) + 1);
            o.id("advertiser_id", "adv-", advertiser_of(ad) + 1);
            o.num("price_micros", price);
        }
        Body::Progress { imp, watched } => {
            o.id("impression_id", "imp-", imp);
            o.num("watched_ms", watched);
        }
        Body::Join | Body::Leave | Body::Heartbeat | Body::Chat => {}
    }
    o.finish()
}
