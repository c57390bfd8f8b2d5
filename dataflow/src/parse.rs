//! The wire parser: raw bytes of one record -> a validated [`Event`], or the
//! one [`Rejection`] that explains why not.
//!
//! A record is one JSON object (a Kafka message value, or one line of a
//! `.jsonl` file without its `\n`). The contract is docs/contract.md,
//! Events in; this module is its only implementation, so everything
//! downstream may trust an [`Event`].
//!
//! # Why it is written this way
//!
//! **Strict.** Billing must be exactly-once, and two components that read
//! the same bytes differently (one keeps the first of two `price_micros`
//! keys, another the last; one maps a lone surrogate to U+FFFD, another
//! rejects it) are a silent double-charge or a lost impression. So anything
//! ambiguous is rejected, with a stable reason code ([`Rejection::code`]):
//!
//! * invalid UTF-8 (checked before any JSON parsing), invalid JSON
//!   (including trailing bytes and blank records), **lone surrogates** in
//!   `\u` escapes and **duplicate keys**, anywhere in the document, also in
//!   nested values of fields the record's type does not use;
//! * integers must be JSON integer literals: `2000.0`, `2e3` and `"2000"` are
//!   `wrong_type`; a negative integer or one past the field's range is
//!   `out_of_range`;
//! * string lengths are counted in UTF-8 bytes *after* JSON unescaping.
//!
//! Fields the record's `type` does not use are ignored whatever their value
//! (they are still walked, for the document-wide checks above). When several
//! things are wrong, only the first is reported, in the order: size, UTF-8,
//! the JSON pass (syntax / duplicate key / not an object, whichever comes
//! first in the text), `type`, then the used fields in [`Field`] order.
//!
//! **Fast.** This is the hot path of ingest. Records as producers write
//! them (a flat object of known keys, strings without escapes, small
//! non-negative integers) are captured by a scanner made for exactly that
//! (the `flat` module), which gives up on anything else. Everything else
//! gets one pass of `serde_json` over the borrowed `&str` with hand-written
//! visitors: known keys land in a fixed array of slots holding borrowed
//! strings (`Cow`, owned only when the string had escapes), duplicate known
//! keys are caught with a bitmask and unknown keys with a small list of
//! names (a hash set only once an object has many keys). There is no
//! `serde_json::Value` and no per-record map; the only allocations on the
//! happy path are an impression's box and any text of the resulting
//! [`Event`] longer than a [`Text`] keeps inline (23 bytes).
//! `serde::de::IgnoredAny` is deliberately not used for ignored values: it
//! does not validate `\u` surrogates nor see duplicate keys, so ignored
//! values go through a validating visitor instead.
//!
//! **Robust.** It never panics; memory is O(input) (records over
//! [`MAX_RECORD_BYTES`] are refused before parsing); nesting is bounded by
//! `serde_json`'s recursion limit of 128 (deeper is `not_json`).
//!
//! # Decisions on points the contract leaves open
//!
//! * An integer literal too large for `u64` (or too negative for `i64`),
//!   which `serde_json` hands over as an `f64`, is `out_of_range`, not
//!   `wrong_type`: on that (cold) path the field's literal is re-read from the
//!   text to tell `18446744073709551616` (an integer) from `1.8e19` (not).
//! * `-0` is a JSON integer literal whose value is 0, so it is accepted where
//!   0 is in range (`price_micros`, `watched_ms`); `-0.0` is `wrong_type`.
//! * Number literals whose magnitude overflows `f64` (`1e400`, or an integer
//!   with more than ~308 digits) are refused by `serde_json` wherever they
//!   appear, so such a record is `not_json` (RFC 8259 §6 lets parsers limit
//!   the range of numbers).
//! * The `type` value must match one of the six names exactly (case
//!   sensitive); any other string is `unknown_type`. A byte-order mark is
//!   not JSON whitespace, so a record starting with one is `not_json`.
//! * A record of exactly [`MAX_RECORD_BYTES`] bytes is parsed; one byte more
//!   is `too_large`.

use std::borrow::Cow;
use std::cell::Cell;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};

use crate::event::{AdProgress, Event, EventKind, Impression, Text};

mod flat;

/// Records longer than this many bytes are rejected as `too_large` without
/// being parsed.
pub const MAX_RECORD_BYTES: usize = 1 << 20;

// The limits below are public so that whatever writes records (the traffic
// generator's planted malformed lines) steps over exactly these bounds.

/// Longest allowed string field, in UTF-8 bytes after unescaping.
pub const MAX_STR_BYTES: usize = 128;
/// `ts` must be below 2^53 (exactly representable as a double).
pub const TS_MAX: u64 = (1 << 53) - 1;
/// Largest allowed `price_micros` (a million currency units).
pub const PRICE_MICROS_MAX: u64 = 1_000_000_000_000;
/// Largest allowed `watched_ms` (a day).
pub const WATCHED_MS_MAX: u64 = 86_400_000;

/// A field of the wire format, in the order in which fields are validated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Field {
    Type,
    EventId,
    Ts,
    StreamId,
    ViewerId,
    ImpressionId,
    AdId,
    CampaignId,
    AdvertiserId,
    PriceMicros,
    WatchedMs,
}

/// Number of [`Field`] variants (slots captured per record).
const FIELD_COUNT: usize = 11;

impl Field {
    /// Every field, in validation order.
    pub const ALL: [Field; FIELD_COUNT] = [
        Field::Type,
        Field::EventId,
        Field::Ts,
        Field::StreamId,
        Field::ViewerId,
        Field::ImpressionId,
        Field::AdId,
        Field::CampaignId,
        Field::AdvertiserId,
        Field::PriceMicros,
        Field::WatchedMs,
    ];

    /// The field's key on the wire (`event_id`, `price_micros`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Field::Type => "type",
            Field::EventId => "event_id",
            Field::Ts => "ts",
            Field::StreamId => "stream_id",
            Field::ViewerId => "viewer_id",
            Field::ImpressionId => "impression_id",
            Field::AdId => "ad_id",
            Field::CampaignId => "campaign_id",
            Field::AdvertiserId => "advertiser_id",
            Field::PriceMicros => "price_micros",
            Field::WatchedMs => "watched_ms",
        }
    }

    /// The field a (unescaped) key names, if any.
    #[inline]
    fn from_key(key: &str) -> Option<Field> {
        Some(match key {
            "type" => Field::Type,
            "event_id" => Field::EventId,
            "ts" => Field::Ts,
            "stream_id" => Field::StreamId,
            "viewer_id" => Field::ViewerId,
            "impression_id" => Field::ImpressionId,
            "ad_id" => Field::AdId,
            "campaign_id" => Field::CampaignId,
            "advertiser_id" => Field::AdvertiserId,
            "price_micros" => Field::PriceMicros,
            "watched_ms" => Field::WatchedMs,
            _ => return None,
        })
    }
}

/// Why a record was rejected. Only the first problem found is reported (see
/// the module docs for the order).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// Longer than [`MAX_RECORD_BYTES`].
    TooLarge,
    /// Not valid UTF-8.
    BadUtf8,
    /// Not one valid JSON value (syntax, trailing bytes, empty record, lone
    /// surrogate escape, nesting deeper than 128, number overflowing `f64`).
    NotJson,
    /// Valid JSON, but not an object.
    NotObject,
    /// The same key twice in one object, at any depth.
    DuplicateKey,
    /// `type` is a string but not one of the known event types.
    UnknownType,
    /// A field the record's type uses is absent.
    MissingField(Field),
    /// A used field has the wrong JSON type (including `null`, and
    /// non-integer numbers for integer fields).
    WrongType(Field),
    /// A used integer field is negative or beyond its range.
    OutOfRange(Field),
    /// A used string field is longer than 128 bytes (after unescaping).
    TooLong(Field),
    /// A used string field is the empty string.
    Empty(Field),
    /// Read (from Kafka or a file) with a `ts` more than
    /// [`MAX_AHEAD_OF_CLOCK_MS`] ahead of the wall clock: a broken player
    /// clock must not drag the watermark forward (docs/contract.md, Events
    /// in).
    AheadOfClock,
}

/// How far ahead of the wall clock a live record's `ts` may be.
pub const MAX_AHEAD_OF_CLOCK_MS: u64 = 10 * 60 * 1000;

/// The wall-clock check of live sources: `Err(AheadOfClock)` when `ts` is
/// more than [`MAX_AHEAD_OF_CLOCK_MS`] past `now_ms`.
pub fn check_clock(ts: u64, now_ms: u64) -> Result<(), Rejection> {
    if ts > now_ms.saturating_add(MAX_AHEAD_OF_CLOCK_MS) {
        Err(Rejection::AheadOfClock)
    } else {
        Ok(())
    }
}

impl Rejection {
    /// The stable reason code: `too_large`, `bad_utf8`, `not_json`,
    /// `not_object`, `duplicate_key`, `unknown_type`, or
    /// `missing_field:<f>`, `wrong_type:<f>`, `out_of_range:<f>`,
    /// `too_long:<f>`, `empty:<f>` with `<f>` the field's wire name, and
    /// `ts_ahead_of_clock` (live sources only).
    pub fn code(&self) -> String {
        self.to_string()
    }

    /// The field the rejection is about, if it is about one.
    pub fn field(&self) -> Option<Field> {
        match *self {
            Rejection::MissingField(f)
            | Rejection::WrongType(f)
            | Rejection::OutOfRange(f)
            | Rejection::TooLong(f)
            | Rejection::Empty(f) => Some(f),
            _ => None,
        }
    }
}

impl fmt::Display for Rejection {
    /// Writes [`Rejection::code`].
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (kind, field) = match *self {
            Rejection::TooLarge => ("too_large", None),
            Rejection::BadUtf8 => ("bad_utf8", None),
            Rejection::NotJson => ("not_json", None),
            Rejection::NotObject => ("not_object", None),
            Rejection::DuplicateKey => ("duplicate_key", None),
            Rejection::UnknownType => ("unknown_type", None),
            Rejection::MissingField(x) => ("missing_field", Some(x)),
            Rejection::WrongType(x) => ("wrong_type", Some(x)),
            Rejection::OutOfRange(x) => ("out_of_range", Some(x)),
            Rejection::TooLong(x) => ("too_long", Some(x)),
            Rejection::Empty(x) => ("empty", Some(x)),
            Rejection::AheadOfClock => ("ts_ahead_of_clock", None),
        };
        f.write_str(kind)?;
        if let Some(x) = field {
            f.write_str(":")?;
            f.write_str(x.name())?;
        }
        Ok(())
    }
}

impl std::error::Error for Rejection {}

/// Parses and validates one record (without its trailing `\n`).
pub fn parse_event(raw: &[u8]) -> Result<Event, Rejection> {
    parse_text(record_text(raw)?)
}

/// The record as text: within the size bound, and UTF-8.
fn record_text(raw: &[u8]) -> Result<&str, Rejection> {
    within_size(raw.len())?;
    std::str::from_utf8(raw).map_err(|_| Rejection::BadUtf8)
}

/// The size bound, checked before anything else.
fn within_size(bytes: usize) -> Result<(), Rejection> {
    if bytes > MAX_RECORD_BYTES {
        return Err(Rejection::TooLarge);
    }
    Ok(())
}

/// [`parse_event`] for a record already known to be UTF-8: a reader that
/// validates a whole buffer of records at once (long runs validate several
/// times faster than short ones) skips the check per record.
pub fn parse_event_str(text: &str) -> Result<Event, Rejection> {
    within_size(text.len())?;
    parse_text(text)
}

/// [`parse_event`] with the general pass alone, the flat scanner skipped:
/// what the fuzz target compares the two against.
#[doc(hidden)]
pub fn parse_event_general(raw: &[u8]) -> Result<Event, Rejection> {
    let text = record_text(raw)?;
    let mut slots = Slots::missing();
    json_pass(text, &mut slots)?;
    build(text, &mut slots)
}

fn parse_text(text: &str) -> Result<Event, Rejection> {
    let mut slots = Slots::missing();
    if !flat::scan(text, &mut slots) {
        slots = Slots::missing();
        json_pass(text, &mut slots)?;
    }
    build(text, &mut slots)
}

// ---------------------------------------------------------------------------
// The JSON pass: one serde_json walk that validates the whole document and
// captures the top-level values of known keys.

/// A top-level value of a known key, as captured by the JSON pass.
#[derive(Debug, Default, PartialEq)]
enum Slot<'de> {
    /// The key did not occur.
    #[default]
    Missing,
    /// A string (borrowed from the input unless it had escapes).
    Str(Cow<'de, str>),
    /// A non-negative integer literal that fits in `u64`.
    Uint(u64),
    /// A negative integer literal that fits in `i64`.
    Negative,
    /// Any other number: a fraction or exponent, an integer literal too large
    /// for `u64`/`i64`, or `-0`. Which one is decided from the text, only if
    /// the field is used.
    Float,
    /// `null`, `true`/`false`, an array or an object (already validated).
    Other,
}

/// One slot per [`Field`], indexed by `Field as usize`.
#[derive(Debug, PartialEq)]
struct Slots<'de>([Slot<'de>; FIELD_COUNT]);

impl<'de> Slots<'de> {
    #[inline]
    fn missing() -> Self {
        // Built in place: from an array literal the compiler built the
        // 264 bytes aside and copied them over, for every record.
        Slots(std::array::from_fn(|_| Slot::Missing))
    }

    #[inline]
    fn take(&mut self, field: Field) -> Slot<'de> {
        std::mem::take(&mut self.0[field as usize])
    }
}

/// What the top-level JSON value turned out to be. An object's fields are
/// captured into the caller's [`Slots`] in place: they are a few hundred
/// bytes, and moving them out of every parse costs more than the parse of a
/// short field.
enum Top {
    Object,
    NotObject,
}

/// Runs the JSON pass, mapping serde_json's errors to rejections.
fn json_pass<'de>(text: &'de str, slots: &mut Slots<'de>) -> Result<(), Rejection> {
    // Set by a visitor just before it fails the parse on a duplicate key, so
    // that error can be told apart from syntax errors without matching on
    // error messages.
    let duplicate = Cell::new(false);
    let mut de = serde_json::Deserializer::from_str(text);
    let top = TopSeed {
        dup: &duplicate,
        slots,
    }
    .deserialize(&mut de)
    .and_then(|top| de.end().map(|()| top));
    match top {
        Ok(Top::Object) => Ok(()),
        Ok(Top::NotObject) => Err(Rejection::NotObject),
        Err(_) if duplicate.get() => Err(Rejection::DuplicateKey),
        Err(_) => Err(Rejection::NotJson),
    }
}

/// Records that a duplicate key was seen and returns the error that stops
/// the parse.
#[cold]
fn duplicate_key<E: de::Error>(flag: &Cell<bool>) -> E {
    flag.set(true);
    E::custom("duplicate key")
}

/// Object keys seen so far in one object: a linear scan while there are few,
/// a hash set beyond that (so a record with many keys stays O(n)).
enum KeySet<'de> {
    Small(Vec<Cow<'de, str>>),
    Large(HashSet<Cow<'de, str>>),
}

const SMALL_KEY_SET: usize = 16;

impl<'de> KeySet<'de> {
    #[inline]
    fn new() -> Self {
        KeySet::Small(Vec::new())
    }

    /// Adds `key`; false if it was already there.
    fn insert(&mut self, key: Cow<'de, str>) -> bool {
        match self {
            KeySet::Small(keys) => {
                if keys.contains(&key) {
                    return false;
                }
                if keys.len() < SMALL_KEY_SET {
                    keys.push(key);
                } else {
                    let mut set: HashSet<Cow<'de, str>> = keys.drain(..).collect();
                    set.insert(key);
                    *self = KeySet::Large(set);
                }
                true
            }
            KeySet::Large(set) => set.insert(key),
        }
    }
}

/// Deserializes an object key, borrowing it when it has no escapes.
struct KeySeed;

impl<'de> DeserializeSeed<'de> for KeySeed {
    type Value = Cow<'de, str>;

    #[inline]
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for KeySeed {
    type Value = Cow<'de, str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string key")
    }

    #[inline]
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    #[inline]
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    #[inline]
    fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Walks any JSON value, discarding it but checking what `IgnoredAny` does
/// not: strings (hence `\u` surrogates) are decoded by serde_json, and keys of
/// every nested object are checked for duplicates.
#[derive(Clone, Copy)]
struct Walk<'a> {
    dup: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    #[inline]
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        walk_seq(seq, self.dup)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        walk_map(map, self.dup)
    }
}

fn walk_seq<'de, A: SeqAccess<'de>>(mut seq: A, dup: &Cell<bool>) -> Result<(), A::Error> {
    while seq.next_element_seed(Walk { dup })?.is_some() {}
    Ok(())
}

fn walk_map<'de, A: MapAccess<'de>>(mut map: A, dup: &Cell<bool>) -> Result<(), A::Error> {
    let mut keys = KeySet::new();
    while let Some(key) = map.next_key_seed(KeySeed)? {
        if !keys.insert(key) {
            return Err(duplicate_key(dup));
        }
        map.next_value_seed(Walk { dup })?;
    }
    Ok(())
}

/// Captures the value of a known top-level key into a [`Slot`].
#[derive(Clone, Copy)]
struct SlotSeed<'a> {
    dup: &'a Cell<bool>,
}

impl<'de> DeserializeSeed<'de> for SlotSeed<'_> {
    type Value = Slot<'de>;

    #[inline]
    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Slot<'de>, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for SlotSeed<'_> {
    type Value = Slot<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Slot<'de>, E> {
        Ok(Slot::Other)
    }

    #[inline]
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Slot<'de>, E> {
        // serde_json only produces i64 for negative literals; be safe anyway.
        Ok(match u64::try_from(v) {
            Ok(u) => Slot::Uint(u),
            Err(_) => Slot::Negative,
        })
    }

    #[inline]
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Slot<'de>, E> {
        Ok(Slot::Uint(v))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Slot<'de>, E> {
        Ok(Slot::Float)
    }

    #[inline]
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Borrowed(v)))
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Owned(v.to_owned())))
    }

    fn visit_string<E: de::Error>(self, v: String) -> Result<Slot<'de>, E> {
        Ok(Slot::Str(Cow::Owned(v)))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Slot<'de>, E> {
        Ok(Slot::Other)
    }

    fn visit_none<E: de::Error>(self) -> Result<Slot<'de>, E> {
        Ok(Slot::Other)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Slot<'de>, A::Error> {
        walk_seq(seq, self.dup).map(|()| Slot::Other)
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Slot<'de>, A::Error> {
        walk_map(map, self.dup).map(|()| Slot::Other)
    }
}

/// The top-level value: captures known keys of an object; anything else is
/// still walked to the end (so invalid JSON wins over `not_object`).
struct TopSeed<'a, 'de> {
    dup: &'a Cell<bool>,
    slots: &'a mut Slots<'de>,
}

impl<'de> DeserializeSeed<'de> for TopSeed<'_, 'de> {
    type Value = Top;

    fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Top, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for TopSeed<'_, 'de> {
    type Value = Top;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Top, A::Error> {
        let slots = self.slots;
        let mut seen_known: u16 = 0;
        let mut seen_unknown = KeySet::new();
        while let Some(key) = map.next_key_seed(KeySeed)? {
            match Field::from_key(&key) {
                Some(field) => {
                    let bit = 1u16 << (field as u32);
                    if seen_known & bit != 0 {
                        return Err(duplicate_key(self.dup));
                    }
                    seen_known |= bit;
                    slots.0[field as usize] = map.next_value_seed(SlotSeed { dup: self.dup })?;
                }
                None => {
                    if !seen_unknown.insert(key) {
                        return Err(duplicate_key(self.dup));
                    }
                    map.next_value_seed(Walk { dup: self.dup })?;
                }
            }
        }
        Ok(Top::Object)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Top, A::Error> {
        walk_seq(seq, self.dup).map(|()| Top::NotObject)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Top, E> {
        Ok(Top::NotObject)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Top, E> {
        Ok(Top::NotObject)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Top, E> {
        Ok(Top::NotObject)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Top, E> {
        Ok(Top::NotObject)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Top, E> {
        Ok(Top::NotObject)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Top, E> {
        Ok(Top::NotObject)
    }

    fn visit_none<E: de::Error>(self) -> Result<Top, E> {
        Ok(Top::NotObject)
    }
}

// ---------------------------------------------------------------------------
// Validation of the captured slots, by type.

#[derive(Clone, Copy)]
enum Type {
    Join,
    Leave,
    Heartbeat,
    Chat,
    Impression,
    AdProgress,
}

fn build(text: &str, slots: &mut Slots<'_>) -> Result<Event, Rejection> {
    let ty = match slots.take(Field::Type) {
        Slot::Missing => return Err(Rejection::MissingField(Field::Type)),
        Slot::Str(s) => match &*s {
            "join" => Type::Join,
            "leave" => Type::Leave,
            "heartbeat" => Type::Heartbeat,
            "chat" => Type::Chat,
            "impression" => Type::Impression,
            "ad_progress" => Type::AdProgress,
            _ => return Err(Rejection::UnknownType),
        },
        _ => return Err(Rejection::WrongType(Field::Type)),
    };
    let event_id = string(slots, Field::EventId)?;
    let ts = integer(text, slots, Field::Ts, 1, TS_MAX)?;
    let stream_id = string(slots, Field::StreamId)?;
    let viewer_id = string(slots, Field::ViewerId)?;
    let kind = match ty {
        Type::Join => EventKind::Join,
        Type::Leave => EventKind::Leave,
        Type::Heartbeat => EventKind::Heartbeat,
        Type::Chat => EventKind::Chat,
        Type::Impression => {
            let impression_id = string(slots, Field::ImpressionId)?;
            let ad_id = string(slots, Field::AdId)?;
            let campaign_id = string(slots, Field::CampaignId)?;
            let advertiser_id = string(slots, Field::AdvertiserId)?;
            let price_micros = integer(text, slots, Field::PriceMicros, 0, PRICE_MICROS_MAX)?;
            EventKind::Impression(Box::new(Impression {
                impression_id,
                ad_id,
                campaign_id,
                advertiser_id,
                price_micros,
            }))
        }
        Type::AdProgress => {
            let impression_id = string(slots, Field::ImpressionId)?;
            let watched_ms = integer(text, slots, Field::WatchedMs, 0, WATCHED_MS_MAX)?;
            EventKind::AdProgress(AdProgress {
                impression_id,
                watched_ms,
            })
        }
    };
    Ok(Event {
        ts,
        event_id,
        stream_id,
        viewer_id,
        kind,
    })
}

/// The longest text a [`Text`] keeps inline (no allocation). Built with
/// `new_inline`, a fixed-size copy: `Text::new` calls `memcpy` for every
/// field, which was a tenth of the parser's time.
const INLINE_TEXT_BYTES: usize = 23;

/// A used string field: 1..=128 bytes after unescaping.
#[inline]
fn string(slots: &mut Slots<'_>, field: Field) -> Result<Text, Rejection> {
    match slots.take(field) {
        Slot::Missing => Err(Rejection::MissingField(field)),
        Slot::Str(s) if s.is_empty() => Err(Rejection::Empty(field)),
        Slot::Str(s) if s.len() > MAX_STR_BYTES => Err(Rejection::TooLong(field)),
        Slot::Str(s) if s.len() <= INLINE_TEXT_BYTES => Ok(Text::new_inline(&s)),
        Slot::Str(s) => Ok(Text::new(s)),
        _ => Err(Rejection::WrongType(field)),
    }
}

/// A used integer field, within `min..=max`.
#[inline]
fn integer(
    text: &str,
    slots: &mut Slots<'_>,
    field: Field,
    min: u64,
    max: u64,
) -> Result<u64, Rejection> {
    let value = match slots.take(field) {
        Slot::Missing => return Err(Rejection::MissingField(field)),
        Slot::Uint(v) => v,
        Slot::Negative => return Err(Rejection::OutOfRange(field)),
        Slot::Float => match top_level_literal(text, field).map(classify_number) {
            Some(NumberLiteral::NegativeZero) => 0,
            Some(NumberLiteral::HugeInteger) => return Err(Rejection::OutOfRange(field)),
            Some(NumberLiteral::NotInteger) | None => return Err(Rejection::WrongType(field)),
        },
        Slot::Str(_) | Slot::Other => return Err(Rejection::WrongType(field)),
    };
    if (min..=max).contains(&value) {
        Ok(value)
    } else {
        Err(Rejection::OutOfRange(field))
    }
}

/// What a number literal that serde_json reported as `f64` really is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NumberLiteral {
    /// `-0`: an integer literal with value 0.
    NegativeZero,
    /// An integer literal outside `i64::MIN..=u64::MAX`.
    HugeInteger,
    /// Has a fraction or an exponent.
    NotInteger,
}

fn classify_number(literal: &str) -> NumberLiteral {
    let (negative, digits) = match literal.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, literal),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        NumberLiteral::NotInteger
    } else if negative && digits.bytes().all(|b| b == b'0') {
        NumberLiteral::NegativeZero
    } else {
        NumberLiteral::HugeInteger
    }
}

// ---------------------------------------------------------------------------
// Cold path: find the raw text of a top-level value. Only used after the JSON
// pass succeeded (so the text is one valid object without duplicate keys),
// and only when a used integer field held a number serde_json turned into an
// `f64`. Bounds are checked everywhere anyway: it returns `None` rather than
// panic on anything unexpected.

/// The raw literal of the top-level scalar value of `field`, if present.
fn top_level_literal(text: &str, field: Field) -> Option<&str> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i += 1;
    loop {
        i = skip_ws(b, i);
        if b.get(i) != Some(&b'"') {
            return None; // `}`: not found
        }
        let key_start = i;
        i = skip_string(b, i)?;
        let raw_key = text.get(key_start..i)?;
        let inner = raw_key.get(1..raw_key.len() - 1)?;
        let is_target = if inner.contains('\\') {
            serde_json::from_str::<String>(raw_key).ok()? == field.name()
        } else {
            inner == field.name()
        };
        i = skip_ws(b, i);
        if b.get(i) != Some(&b':') {
            return None;
        }
        i = skip_ws(b, i + 1);
        let value_start = i;
        i = skip_value(b, i)?;
        if is_target {
            return text.get(value_start..i);
        }
        i = skip_ws(b, i);
        if b.get(i) != Some(&b',') {
            return None;
        }
        i += 1;
    }
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// `b[i]` is an opening quote; returns the index just past the closing one.
fn skip_string(b: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    loop {
        match b.get(j)? {
            b'"' => return Some(j + 1),
            b'\\' => j += 2,
            _ => j += 1,
        }
    }
}

/// Returns the index just past the value starting at `b[i]`.
fn skip_value(b: &[u8], i: usize) -> Option<usize> {
    match b.get(i)? {
        b'"' => skip_string(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            loop {
                match b.get(j)? {
                    b'"' => {
                        j = skip_string(b, j)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth = depth.checked_sub(1)?;
                        if depth == 0 {
                            return Some(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
        }
        _ => {
            let mut j = i;
            while let Some(&c) = b.get(j) {
                if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                    break;
                }
                j += 1;
            }
            Some(j)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const JOIN: &str =
        r#"{"type":"join","event_id":"e1","ts":1700000000000,"stream_id":"s1","viewer_id":"v1"}"#;
    const IMPRESSION: &str = r#"{"type":"impression","event_id":"e1","ts":1700000000000,"stream_id":"s1","viewer_id":"v1","impression_id":"i1","ad_id":"a1","campaign_id":"c1","advertiser_id":"adv1","price_micros":2500}"#;
    const AD_PROGRESS: &str = r#"{"type":"ad_progress","event_id":"e1","ts":1700000000000,"stream_id":"s1","viewer_id":"v1","impression_id":"i1","watched_ms":2000}"#;

    fn parse(s: &str) -> Result<Event, Rejection> {
        parse_event(s.as_bytes())
    }

    fn code(s: &str) -> String {
        match parse(s) {
            Ok(e) => format!("ok {e:?}"),
            Err(r) => r.code(),
        }
    }

    /// A record of `base`'s type with `field` set to the raw JSON `value`
    /// (or removed, if `value` is `None`), keeping the other keys in order.
    fn with(base: &str, field: &str, value: Option<&str>) -> String {
        let v: serde_json::Map<String, serde_json::Value> = serde_json::from_str(base).unwrap();
        let mut parts = Vec::new();
        let mut replaced = false;
        for (k, val) in &v {
            if k == field {
                replaced = true;
                if let Some(raw) = value {
                    parts.push(format!("{}:{raw}", serde_json::to_string(k).unwrap()));
                }
            } else {
                parts.push(format!("{}:{}", serde_json::to_string(k).unwrap(), val));
            }
        }
        if !replaced {
            if let Some(raw) = value {
                parts.push(format!("{}:{raw}", serde_json::to_string(field).unwrap()));
            }
        }
        format!("{{{}}}", parts.join(","))
    }

    fn base_event(kind: EventKind) -> Event {
        Event {
            ts: 1_700_000_000_000,
            event_id: "e1".into(),
            stream_id: "s1".into(),
            viewer_id: "v1".into(),
            kind,
        }
    }

    #[test]
    fn live_records_may_be_at_most_ten_minutes_ahead_of_the_clock() {
        let now = 1_800_000_000_000;
        assert_eq!(check_clock(now + MAX_AHEAD_OF_CLOCK_MS, now), Ok(()));
        assert_eq!(check_clock(1, now), Ok(()));
        assert_eq!(
            check_clock(now + MAX_AHEAD_OF_CLOCK_MS + 1, now),
            Err(Rejection::AheadOfClock)
        );
    }

    #[test]
    fn codes_are_stable() {
        let cases = [
            (Rejection::TooLarge, "too_large"),
            (Rejection::BadUtf8, "bad_utf8"),
            (Rejection::NotJson, "not_json"),
            (Rejection::NotObject, "not_object"),
            (Rejection::DuplicateKey, "duplicate_key"),
            (Rejection::UnknownType, "unknown_type"),
            (Rejection::MissingField(Field::Ts), "missing_field:ts"),
            (Rejection::WrongType(Field::Ts), "wrong_type:ts"),
            (Rejection::OutOfRange(Field::Ts), "out_of_range:ts"),
            (Rejection::TooLong(Field::StreamId), "too_long:stream_id"),
            (Rejection::Empty(Field::StreamId), "empty:stream_id"),
            (Rejection::AheadOfClock, "ts_ahead_of_clock"),
            (Rejection::MissingField(Field::Type), "missing_field:type"),
            (
                Rejection::OutOfRange(Field::PriceMicros),
                "out_of_range:price_micros",
            ),
            (
                Rejection::WrongType(Field::WatchedMs),
                "wrong_type:watched_ms",
            ),
        ];
        for (r, c) in cases {
            assert_eq!(r.code(), c);
            assert_eq!(r.to_string(), c);
        }
        let names: Vec<_> = Field::ALL.iter().map(|f| f.name()).collect();
        assert_eq!(
            names,
            [
                "type",
                "event_id",
                "ts",
                "stream_id",
                "viewer_id",
                "impression_id",
                "ad_id",
                "campaign_id",
                "advertiser_id",
                "price_micros",
                "watched_ms"
            ]
        );
        for f in Field::ALL {
            assert_eq!(Field::from_key(f.name()), Some(f));
            assert_eq!(f as usize, Field::ALL.iter().position(|&g| g == f).unwrap());
        }
        assert_eq!(Rejection::Empty(Field::AdId).field(), Some(Field::AdId));
        assert_eq!(Rejection::NotJson.field(), None);
        let e: Box<dyn std::error::Error> = Box::new(Rejection::UnknownType);
        assert_eq!(e.to_string(), "unknown_type");
    }

    #[test]
    fn every_type_minimal_record() {
        for (name, kind) in [
            ("join", EventKind::Join),
            ("leave", EventKind::Leave),
            ("heartbeat", EventKind::Heartbeat),
            ("chat", EventKind::Chat),
        ] {
            let rec = with(JOIN, "type", Some(&format!("\"{name}\"")));
            assert_eq!(parse(&rec), Ok(base_event(kind)), "{rec}");
        }
        assert_eq!(
            parse(IMPRESSION),
            Ok(base_event(EventKind::Impression(Box::new(Impression {
                impression_id: "i1".into(),
                ad_id: "a1".into(),
                campaign_id: "c1".into(),
                advertiser_id: "adv1".into(),
                price_micros: 2500,
            }))))
        );
        assert_eq!(
            parse(AD_PROGRESS),
            Ok(base_event(EventKind::AdProgress(AdProgress {
                impression_id: "i1".into(),
                watched_ms: 2000,
            })))
        );
    }

    #[test]
    fn whitespace_and_key_order_do_not_matter() {
        let rec = " \t{ \"viewer_id\" : \"v1\" ,\n\"stream_id\":\"s1\",\"ts\":1700000000000,\r\n\"event_id\":\"e1\", \"type\":\"join\" } \n";
        assert_eq!(parse(rec), Ok(base_event(EventKind::Join)));
    }

    #[test]
    fn type_errors() {
        assert_eq!(code(&with(JOIN, "type", None)), "missing_field:type");
        assert_eq!(code(&with(JOIN, "type", Some("null"))), "wrong_type:type");
        assert_eq!(code(&with(JOIN, "type", Some("1"))), "wrong_type:type");
        assert_eq!(
            code(&with(JOIN, "type", Some("[\"join\"]"))),
            "wrong_type:type"
        );
        assert_eq!(code(&with(JOIN, "type", Some("\"Join\""))), "unknown_type");
        assert_eq!(code(&with(JOIN, "type", Some("\"\""))), "unknown_type");
        assert_eq!(code(&with(JOIN, "type", Some("\"join \""))), "unknown_type");
        assert_eq!(
            code(&with(JOIN, "type", Some("\"purchase\""))),
            "unknown_type"
        );
        // `type` is checked before every other field.
        assert_eq!(code(r#"{"type":"nope"}"#), "unknown_type");
        assert_eq!(code(r#"{"ts":"x"}"#), "missing_field:type");
        // Escaped value is unescaped before matching.
        assert!(parse(&with(JOIN, "type", Some(r#""j\u006fin""#))).is_ok());
    }

    #[test]
    fn key_with_escapes_is_the_same_key() {
        let rec = JOIN.replace("\"type\"", r#""t\u0079pe""#);
        assert_eq!(parse(&rec), Ok(base_event(EventKind::Join)));
        let rec = JOIN.replace("\"event_id\"", r#""event\u005fid""#);
        assert_eq!(parse(&rec), Ok(base_event(EventKind::Join)));
        // ...and so collides with its plain spelling.
        let rec = JOIN.replace("{", r#"{"t\u0079pe":"join","#);
        assert_eq!(code(&rec), "duplicate_key");
    }

    #[test]
    fn unused_fields_are_ignored_whatever_their_value() {
        let rec = with(JOIN, "watched_ms", Some("\"x\""));
        assert!(parse(&rec).is_ok());
        let rec = with(
            &with(JOIN, "type", Some("\"heartbeat\"")),
            "price_micros",
            Some("-1"),
        );
        assert!(parse(&rec).is_ok());
        let rec = with(JOIN, "impression_id", Some("\"\""));
        assert!(parse(&rec).is_ok());
        let rec = with(JOIN, "ad_id", Some(&format!("\"{}\"", "x".repeat(500))));
        assert!(parse(&rec).is_ok());
        let rec = with(AD_PROGRESS, "price_micros", Some("null"));
        assert!(parse(&rec).is_ok());
        let rec = with(
            AD_PROGRESS,
            "campaign_id",
            Some("{\"a\":[1,2,{\"b\":null}]}"),
        );
        assert!(parse(&rec).is_ok());
        let rec = with(IMPRESSION, "watched_ms", Some("1e999999999999"));
        // Exception: numbers overflowing f64 are refused by serde_json.
        assert_eq!(code(&rec), "not_json");
        let rec = with(IMPRESSION, "watched_ms", Some("2.5"));
        assert!(parse(&rec).is_ok());
        // Unknown keys of any shape.
        let rec = with(
            JOIN,
            "extra",
            Some("{\"nested\":[[],{},\"\\ud83d\\ude00\",true,-0.5e-3]}"),
        );
        assert!(parse(&rec).is_ok());
    }

    #[test]
    fn missing_fields() {
        for f in ["event_id", "ts", "stream_id", "viewer_id"] {
            assert_eq!(code(&with(JOIN, f, None)), format!("missing_field:{f}"));
        }
        for f in [
            "impression_id",
            "ad_id",
            "campaign_id",
            "advertiser_id",
            "price_micros",
        ] {
            assert_eq!(
                code(&with(IMPRESSION, f, None)),
                format!("missing_field:{f}")
            );
        }
        for f in ["impression_id", "watched_ms"] {
            assert_eq!(
                code(&with(AD_PROGRESS, f, None)),
                format!("missing_field:{f}")
            );
        }
        assert_eq!(code("{}"), "missing_field:type");
    }

    #[test]
    fn ts_bounds() {
        let ts = |v: &str| code(&with(JOIN, "ts", Some(v)));
        assert_eq!(ts("0"), "out_of_range:ts");
        assert_eq!(ts("-0"), "out_of_range:ts");
        assert_eq!(ts("-1"), "out_of_range:ts");
        assert_eq!(ts("9007199254740992"), "out_of_range:ts"); // 2^53
        assert_eq!(ts("18446744073709551615"), "out_of_range:ts"); // u64::MAX
        assert_eq!(ts("18446744073709551616"), "out_of_range:ts"); // u64::MAX + 1
        assert_eq!(ts("-9223372036854775809"), "out_of_range:ts"); // i64::MIN - 1
        assert_eq!(ts(&"9".repeat(300)), "out_of_range:ts");
        let ok = |v: u64| parse(&with(JOIN, "ts", Some(&v.to_string()))).map(|e| e.ts);
        assert_eq!(ok(1), Ok(1));
        assert_eq!(ok((1 << 53) - 1), Ok((1 << 53) - 1));
    }

    #[test]
    fn integers_must_be_integer_literals() {
        for f in ["ts", "price_micros"] {
            for v in [
                "2000.0", "2e3", "2E3", "2e+3", "\"2000\"", "null", "true", "[2000]", "{}", "-0.0",
                "1.8e19", "-2.5",
            ] {
                assert_eq!(
                    code(&with(IMPRESSION, f, Some(v))),
                    format!("wrong_type:{f}"),
                    "{f}={v}"
                );
            }
        }
        assert_eq!(
            code(&with(AD_PROGRESS, "watched_ms", Some("2e3"))),
            "wrong_type:watched_ms"
        );
        assert_eq!(
            code(&with(AD_PROGRESS, "watched_ms", Some("\"1\""))),
            "wrong_type:watched_ms"
        );
    }

    #[test]
    fn price_bounds() {
        let price = |v: &str| parse(&with(IMPRESSION, "price_micros", Some(v)));
        let got = |v: &str| match price(v) {
            Ok(Event {
                kind: EventKind::Impression(i),
                ..
            }) => Ok(i.price_micros),
            Ok(e) => panic!("{e:?}"),
            Err(r) => Err(r.code()),
        };
        assert_eq!(got("0"), Ok(0));
        assert_eq!(got("-0"), Ok(0));
        assert_eq!(got("1000000000000"), Ok(1_000_000_000_000));
        let oor = Err("out_of_range:price_micros".to_string());
        assert_eq!(got("1000000000001"), oor);
        assert_eq!(got("-1"), oor);
        assert_eq!(got("99999999999999999999"), oor);
        assert_eq!(got("-99999999999999999999"), oor);
    }

    #[test]
    fn watched_ms_bounds() {
        let got = |v: &str| match parse(&with(AD_PROGRESS, "watched_ms", Some(v))) {
            Ok(Event {
                kind: EventKind::AdProgress(p),
                ..
            }) => Ok(p.watched_ms),
            Ok(e) => panic!("{e:?}"),
            Err(r) => Err(r.code()),
        };
        assert_eq!(got("0"), Ok(0));
        assert_eq!(got("86400000"), Ok(86_400_000));
        assert_eq!(got("86400001"), Err("out_of_range:watched_ms".into()));
        assert_eq!(got("-5"), Err("out_of_range:watched_ms".into()));
    }

    #[test]
    fn the_longest_inline_text_is_one_smol_str_keeps_inline() {
        // `Text::new_inline` panics past its inline capacity: an upgrade
        // of smol_str that shrank it must fail here, not on input.
        let longest = "x".repeat(INLINE_TEXT_BYTES);
        assert!(!Text::new_inline(&longest).is_heap_allocated());
        assert!(Text::new("x".repeat(INLINE_TEXT_BYTES + 1)).is_heap_allocated());
    }

    #[test]
    fn string_lengths_after_unescaping() {
        let sid = |raw: String| code(&with(JOIN, "stream_id", Some(&raw)));
        // (the JSON string's contents, whether its value fits in 128 bytes)
        let cases = [
            ("a".repeat(128), true),
            ("a".repeat(129), false),
            // Multi-byte: 'é' is 2 bytes; 64 of them = 128 bytes (64 chars).
            ("é".repeat(64), true),
            (format!("{}é", "a".repeat(127)), false),
            // Escapes count once unescaped: `\u00e9` is 6 bytes of input, 2 of value.
            ("\\u00e9".repeat(64), true),
            (format!("{}\\u00e9", "a".repeat(127)), false),
            // `\n` is 2 bytes of input and 1 of value.
            ("\\n".repeat(128), true),
            ("\\n".repeat(129), false),
            // A surrogate pair is one 4-byte char.
            ("\\ud83d\\ude00".repeat(32), true),
            (format!("{}a", "\\ud83d\\ude00".repeat(32)), false),
        ];
        for (contents, fits) in cases {
            let got = sid(format!("\"{contents}\""));
            if fits {
                assert!(got.starts_with("ok"), "{contents}: {got}");
            } else {
                assert_eq!(got, "too_long:stream_id", "{contents}");
            }
        }
        let e = parse(&with(
            JOIN,
            "stream_id",
            Some(&format!("\"{}\"", "\\u00e9".repeat(64))),
        ))
        .unwrap();
        assert_eq!(e.stream_id, "é".repeat(64));
    }

    #[test]
    fn empty_and_wrongly_typed_strings() {
        for f in ["event_id", "stream_id", "viewer_id"] {
            assert_eq!(code(&with(JOIN, f, Some("\"\""))), format!("empty:{f}"));
            assert_eq!(
                code(&with(JOIN, f, Some("null"))),
                format!("wrong_type:{f}")
            );
            assert_eq!(code(&with(JOIN, f, Some("7"))), format!("wrong_type:{f}"));
            assert_eq!(
                code(&with(JOIN, f, Some("{\"a\":1}"))),
                format!("wrong_type:{f}")
            );
            let long = format!("\"{}\"", "x".repeat(129));
            assert_eq!(code(&with(JOIN, f, Some(&long))), format!("too_long:{f}"));
        }
        for f in ["impression_id", "ad_id", "campaign_id", "advertiser_id"] {
            assert_eq!(
                code(&with(IMPRESSION, f, Some("\"\""))),
                format!("empty:{f}")
            );
            assert_eq!(
                code(&with(IMPRESSION, f, Some("false"))),
                format!("wrong_type:{f}")
            );
        }
        assert_eq!(
            code(&with(AD_PROGRESS, "impression_id", Some("\"\""))),
            "empty:impression_id"
        );
        // A string of only whitespace is not empty.
        assert!(parse(&with(JOIN, "viewer_id", Some("\" \""))).is_ok());
    }

    #[test]
    fn field_check_order() {
        // Every field wrong at once: the first in the contract's field order
        // is reported.
        let all_bad = r#"{"watched_ms":-1,"price_micros":"x","advertiser_id":"","campaign_id":1,"ad_id":null,"impression_id":"","viewer_id":"","stream_id":"","ts":0,"event_id":"","type":"impression"}"#;
        assert_eq!(code(all_bad), "empty:event_id");
        let mut rec = all_bad.replace(r#""event_id":"""#, r#""event_id":"e""#);
        assert_eq!(code(&rec), "out_of_range:ts");
        rec = rec.replace(r#""ts":0"#, r#""ts":5"#);
        assert_eq!(code(&rec), "empty:stream_id");
        rec = rec.replace(r#""stream_id":"""#, r#""stream_id":"s""#);
        assert_eq!(code(&rec), "empty:viewer_id");
        rec = rec.replace(r#""viewer_id":"""#, r#""viewer_id":"v""#);
        assert_eq!(code(&rec), "empty:impression_id");
        rec = rec.replace(r#""impression_id":"""#, r#""impression_id":"i""#);
        assert_eq!(code(&rec), "wrong_type:ad_id");
        rec = rec.replace(r#""ad_id":null"#, r#""ad_id":"a""#);
        assert_eq!(code(&rec), "wrong_type:campaign_id");
        rec = rec.replace(r#""campaign_id":1"#, r#""campaign_id":"c""#);
        assert_eq!(code(&rec), "empty:advertiser_id");
        rec = rec.replace(r#""advertiser_id":"""#, r#""advertiser_id":"d""#);
        assert_eq!(code(&rec), "wrong_type:price_micros");
        rec = rec.replace(r#""price_micros":"x""#, r#""price_micros":1"#);
        assert!(parse(&rec).is_ok(), "watched_ms unused by impression");
        rec = rec.replace("\"impression\"", "\"ad_progress\"");
        assert_eq!(code(&rec), "out_of_range:watched_ms");
        // The JSON pass comes before `type`.
        assert_eq!(code(r#"{"type":"nope","a":1,"a":2}"#), "duplicate_key");
        assert_eq!(code(r#"{"type":"nope"} x"#), "not_json");
    }

    #[test]
    fn duplicate_keys_anywhere() {
        // Known key at top level.
        assert_eq!(code(&JOIN.replace("{", r#"{"ts":1,"#)), "duplicate_key");
        // Known key unused by the type.
        assert_eq!(
            code(&JOIN.replace("{", r#"{"watched_ms":1,"watched_ms":1,"#)),
            "duplicate_key"
        );
        // Unknown key at top level.
        assert_eq!(
            code(&JOIN.replace("{", r#"{"x":1,"x":"1","#)),
            "duplicate_key"
        );
        // Nested inside an unknown field.
        assert_eq!(
            code(&JOIN.replace("{", r#"{"x":{"a":1,"b":{"c":1,"c":2}},"#)),
            "duplicate_key"
        );
        assert_eq!(
            code(&JOIN.replace("{", r#"{"x":[{"a":1},{"a":1,"a":1}],"#)),
            "duplicate_key"
        );
        // Nested inside a known field's (wrongly typed, unused) value.
        assert_eq!(
            code(&JOIN.replace("{", r#"{"ad_id":{"k":1,"k":1},"#)),
            "duplicate_key"
        );
        // Duplicates spelled differently but equal once unescaped.
        assert_eq!(
            code(&JOIN.replace("{", r#"{"x":{"ab":1,"a\u0062":2},"#)),
            "duplicate_key"
        );
        // Same key in sibling objects is fine.
        assert!(parse(&JOIN.replace("{", r#"{"x":[{"a":1},{"a":1}],"y":{"a":{"a":1}},"#)).is_ok());
        // Many distinct keys (exercises the hash set) and then a duplicate.
        let keys: String = (0..100).map(|i| format!("\"k{i}\":{i},")).collect();
        assert!(parse(&JOIN.replace("{", &format!("{{{keys}"))).is_ok());
        assert!(
            parse(&JOIN.replace("{", &format!("{{\"x\":{{{}}},", keys.trim_end_matches(','))))
                .is_ok()
        );
        assert_eq!(
            code(&JOIN.replace("{", &format!("{{{keys}\"k7\":0,"))),
            "duplicate_key"
        );
        assert_eq!(
            code(&JOIN.replace("{", &format!("{{\"x\":{{{keys}\"k99\":0}},"))),
            "duplicate_key"
        );
        // Duplicates inside a top-level array are found by the JSON pass too.
        assert_eq!(code(r#"[{"a":1,"a":2}]"#), "duplicate_key");
    }

    #[test]
    fn surrogates() {
        // Lone surrogates anywhere: in ignored fields, nested, in keys.
        for bad in [
            r#""\ud800""#,
            r#""\udc00""#,
            r#""\ud800\u0041""#,
            r#""x\ud83d""#,
            r#"["\ude00"]"#,
            r#"{"a":"\ud800"}"#,
            r#"{"\ud800":1}"#,
        ] {
            assert_eq!(code(&with(JOIN, "extra", Some(bad))), "not_json", "{bad}");
            assert_eq!(
                code(&with(JOIN, "watched_ms", Some(bad))),
                "not_json",
                "{bad}"
            );
        }
        assert_eq!(code(&JOIN.replace("{", r#"{"\udfff":1,"#)), "not_json");
        assert_eq!(
            code(&with(JOIN, "stream_id", Some(r#""\ud800""#))),
            "not_json"
        );
        // A valid pair is fine, as a value and as a key.
        let rec = with(JOIN, "stream_id", Some(r#""\ud83d\ude00""#));
        assert_eq!(parse(&rec).unwrap().stream_id, "😀");
        assert!(parse(&with(
            JOIN,
            "extra",
            Some(r#"{"\ud83d\ude00":"\uD83D\uDE00"}"#)
        ))
        .is_ok());
    }

    #[test]
    fn not_json() {
        for bad in [
            "",
            " ",
            "\t\r ",
            "{",
            "}",
            "{\"type\":\"join\",}",
            "{'type':'join'}",
            "{\"a\":1}{\"b\":2}",
            "\u{feff}{}",
            "nul",
            "[1",
            "\"abc",
            "{\"a\":01}",
            "{\"a\":1.}",
            "{\"a\":NaN}",
            "{\"a\":\"\\x\"}",
            "{\"a\":\"tab\there\"}",
            "{\"a\":1e400}",
        ] {
            assert_eq!(code(bad), "not_json", "{bad:?}");
        }
        // Trailing garbage after a valid record.
        assert_eq!(code(&format!("{JOIN}x")), "not_json");
        assert_eq!(code(&format!("{JOIN},")), "not_json");
        assert_eq!(code(&format!("{JOIN}\n{JOIN}")), "not_json");
        // Trailing whitespace is fine.
        assert!(parse(&format!("{JOIN} \r\n\t")).is_ok());
    }

    #[test]
    fn not_object() {
        for v in [
            "[1]",
            "[]",
            "1",
            "-1.5",
            "\"join\"",
            "null",
            "true",
            " [ {} ] ",
            "[{\"type\":\"join\"}]",
        ] {
            assert_eq!(code(v), "not_object", "{v}");
        }
        // ...but only if it is valid JSON.
        assert_eq!(code("[1] x"), "not_json");
        assert_eq!(code("[\"\\ud800\"]"), "not_json");
    }

    #[test]
    fn bad_utf8_before_json() {
        assert_eq!(parse_event(b"\xff"), Err(Rejection::BadUtf8));
        assert_eq!(
            parse_event(b"{\"type\":\"join\xc3\"}"),
            Err(Rejection::BadUtf8)
        );
        // CESU-style encoded surrogate (invalid UTF-8).
        assert_eq!(
            parse_event(b"{\"a\":\"\xed\xa0\x80\"}"),
            Err(Rejection::BadUtf8)
        );
        let mut rec = JOIN.as_bytes().to_vec();
        rec.push(0x80);
        assert_eq!(parse_event(&rec), Err(Rejection::BadUtf8));
    }

    #[test]
    fn too_large() {
        let pad_to = |n: usize| {
            let mut rec = JOIN.to_string();
            rec.push_str(&" ".repeat(n - rec.len()));
            rec
        };
        assert!(parse(&pad_to(MAX_RECORD_BYTES)).is_ok());
        assert_eq!(
            parse(&pad_to(MAX_RECORD_BYTES + 1)),
            Err(Rejection::TooLarge)
        );
        // Checked before UTF-8 and JSON.
        assert_eq!(
            parse_event(&vec![0xff; MAX_RECORD_BYTES + 1]),
            Err(Rejection::TooLarge)
        );
    }

    #[test]
    fn deep_nesting_is_not_json() {
        assert_eq!(code(&"[".repeat(10_000)), "not_json");
        assert_eq!(
            code(&format!("{}{}", "[".repeat(10_000), "]".repeat(10_000))),
            "not_json"
        );
        let deep = format!(
            "{{\"x\":{}1{}}}",
            "{\"a\":".repeat(10_000),
            "}".repeat(10_000)
        );
        assert_eq!(code(&deep), "not_json");
        // Moderate nesting inside an ignored field is fine.
        let ok = JOIN.replace(
            "{",
            &format!("{{\"x\":{}{},", "[".repeat(100), "]".repeat(100)),
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn literal_scanner() {
        let text = r#" { "a" : "x\"}" , "t\u0078" : {"b":[1,"]"]}, "ts" : -12e3 , "price_micros":18446744073709551616}"#;
        assert_eq!(top_level_literal(text, Field::Ts), Some("-12e3"));
        assert_eq!(
            top_level_literal(text, Field::PriceMicros),
            Some("18446744073709551616")
        );
        assert_eq!(top_level_literal(text, Field::WatchedMs), None);
        assert_eq!(top_level_literal("[", Field::Ts), None);
        assert_eq!(top_level_literal("{\"ts\"", Field::Ts), None);
        assert_eq!(top_level_literal("{\"ts\":[[", Field::Ts), None);
        assert_eq!(classify_number("-0"), NumberLiteral::NegativeZero);
        assert_eq!(classify_number("-0.0"), NumberLiteral::NotInteger);
        assert_eq!(
            classify_number("123456789012345678901"),
            NumberLiteral::HugeInteger
        );
        assert_eq!(classify_number("-"), NumberLiteral::NotInteger);
        assert_eq!(classify_number("1e5"), NumberLiteral::NotInteger);
        // Escaped key for a used integer field on the float path.
        let rec = with(JOIN, "ts", None).replace("{", r#"{"t\u0073":1e3,"#);
        assert_eq!(code(&rec), "wrong_type:ts");
        let rec = with(JOIN, "ts", None).replace("{", r#"{"t\u0073":-0,"#);
        assert_eq!(code(&rec), "out_of_range:ts");
    }

    /// A JSON string literal for an arbitrary string.
    fn json_str(s: &str) -> String {
        serde_json::to_string(s).unwrap()
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_event(&raw);
        }

        #[test]
        fn jsonish_strings_never_panic(s in r#"[{}\[\]":,0-9a-z_\\ .eE+\-]{0,200}"#) {
            let _ = parse_event(s.as_bytes());
        }

        #[test]
        fn mutated_records_never_panic(
            base in prop_oneof![Just(JOIN), Just(IMPRESSION), Just(AD_PROGRESS)],
            cut in 0usize..300,
            insert in r#"[{}\[\]":,0-9\\u.eE\-]{0,8}"#,
        ) {
            let mut s = base.to_string();
            let at = cut.min(s.len());
            s.insert_str(at, &insert);
            let _ = parse_event(s.as_bytes());
            let _ = parse_event(&base.as_bytes()[..at]);
        }

        #[test]
        fn valid_records_round_trip(
            event_id in "\\PC{1,32}",
            stream_id in "[a-z0-9\"\\\\/\u{0}-\u{1f}é😀]{1,32}",
            viewer_id in "\\PC{1,32}",
            impression_id in "\\PC{1,32}",
            ts in 1u64..(1 << 53),
            price in 0u64..=1_000_000_000_000,
            watched in 0u64..=86_400_000,
            extra in "\\PC{0,16}",
            impression in any::<bool>(),
        ) {
            let head = format!(
                r#""event_id":{},"ts":{ts},"stream_id":{},"viewer_id":{},"impression_id":{},"x":{}"#,
                json_str(&event_id), json_str(&stream_id), json_str(&viewer_id),
                json_str(&impression_id), json_str(&extra),
            );
            let (rec, kind) = if impression {
                (
                    format!(r#"{{"type":"impression",{head},"ad_id":"a","campaign_id":"c","advertiser_id":"d","price_micros":{price}}}"#),
                    EventKind::Impression(Box::new(Impression {
                        impression_id: impression_id.as_str().into(),
                        ad_id: "a".into(),
                        campaign_id: "c".into(),
                        advertiser_id: "d".into(),
                        price_micros: price,
                    })),
                )
            } else {
                (
                    format!(r#"{{"type":"ad_progress",{head},"watched_ms":{watched}}}"#),
                    EventKind::AdProgress(AdProgress { impression_id: impression_id.as_str().into(), watched_ms: watched }),
                )
            };
            let expected = if [&event_id, &stream_id, &viewer_id, &impression_id].iter().any(|s| s.len() > 128) {
                None
            } else {
                Some(Event { ts, event_id: event_id.into(), stream_id: stream_id.into(), viewer_id: viewer_id.into(), kind })
            };
            let got = parse_event(rec.as_bytes());
            match expected {
                Some(e) => prop_assert_eq!(got, Ok(e)),
                None => prop_assert!(matches!(got, Err(Rejection::TooLong(_)))),
            }
        }
    }

    /// The flat scanner's verdict on `text` and the general pass's slots:
    /// where the scanner takes a record, the general pass must accept it
    /// and capture the same slots.
    fn check_flat_against_general(text: &str) -> Result<(), TestCaseError> {
        let mut fast = Slots::missing();
        if flat::scan(text, &mut fast) {
            let mut general = Slots::missing();
            prop_assert_eq!(json_pass(text, &mut general), Ok(()), "{:?}", text);
            prop_assert_eq!(fast, general, "{:?}", text);
        }
        Ok(())
    }

    /// Keys the scanner must take, refuse or leave to the general pass.
    const KEYS: &[&str] = &[
        r#""type""#,
        r#""event_id""#,
        r#""ts""#,
        r#""stream_id""#,
        r#""viewer_id""#,
        r#""impression_id""#,
        r#""price_micros""#,
        r#""watched_ms""#,
        r#""x""#,
        r#""t\u0079pe""#,
        r#""typ""#,
        r#""""#,
        r#"type"#,
        r#""ts"#,
    ];

    /// Values of every JSON form, valid or not.
    const VALUES: &[&str] = &[
        r#""join""#,
        r#""impression""#,
        r#""a""#,
        r#""""#,
        r#""é😀""#,
        r#""a\"b""#,
        r#""a\u0000""#,
        r#""\ud800""#,
        "\"a\u{1}b\"",
        "\"tab\there\"",
        r#""unterminated"#,
        "0",
        "00",
        "01",
        "7",
        "1700000000000",
        "-1",
        "-0",
        "1.5",
        "1e3",
        "2E3",
        "1.",
        "9999999999999999999",
        "10000000000000000000",
        "18446744073709551615",
        "18446744073709551616",
        "1x",
        "true",
        "false",
        "null",
        "nul",
        "{}",
        r#"{"a":1,"a":2}"#,
        "[1,[2]]",
        "[",
        "",
    ];

    /// Separators and whitespace, JSON's own and others.
    const GAPS: &[&str] = &["", " ", "\t", "\r\n", "\u{a0}", "\u{c}", ",", ":", "}"];

    /// Mostly what the scanner takes, so that it takes many whole records.
    fn gap() -> impl Strategy<Value = &'static str> {
        prop_oneof![6 => Just(""), 2 => Just(" "), 1 => proptest::sample::select(GAPS)]
    }

    fn key() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            4 => proptest::sample::select(&KEYS[..8]),
            1 => proptest::sample::select(KEYS),
        ]
    }

    fn value() -> impl Strategy<Value = &'static str> {
        prop_oneof![
            2 => proptest::sample::select(&VALUES[..5]),
            1 => proptest::sample::select(&VALUES[11..16]),
            1 => Just("9999999999999999999"),
            2 => proptest::sample::select(VALUES),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn the_flat_scanner_agrees_with_the_general_pass_on_built_objects(
            members in proptest::collection::vec(
                (key(), gap(), gap(), value(), gap()),
                0..8,
            ),
            open in gap(),
            close in prop_oneof![
                6 => Just("}"),
                1 => Just("} \r\n"),
                1 => proptest::sample::select(&[",}", "", "}}", "}x", "]"][..]),
            ],
        ) {
            let body: Vec<String> = members
                .iter()
                .map(|(k, g1, g2, v, g3)| format!("{g1}{k}{g2}:{v}{g3}"))
                .collect();
            let text = format!("{open}{{{}{close}", body.join(","));
            check_flat_against_general(&text)?;
        }

        #[test]
        fn the_flat_scanner_agrees_with_the_general_pass_on_mutated_records(
            base in prop_oneof![Just(JOIN), Just(IMPRESSION), Just(AD_PROGRESS)],
            at in 0usize..300,
            cut in 0usize..4,
            insert in r#"[{}\[\]":,0-9\\u.eE\- \t\n\x00-\x1fé]{0,6}"#,
        ) {
            let mut bytes = base.as_bytes().to_vec();
            let at = at.min(bytes.len());
            let end = (at + cut).min(bytes.len());
            bytes.splice(at..end, insert.bytes());
            if let Ok(text) = std::str::from_utf8(&bytes) {
                check_flat_against_general(text)?;
                // And the whole parse, with or without the fast path, agrees.
                prop_assert_eq!(parse_event(&bytes), parse_event_general(&bytes));
            }
        }
    }

    #[test]
    fn the_flat_scanner_takes_records_as_producers_write_them() {
        for record in [JOIN, IMPRESSION, AD_PROGRESS] {
            let mut slots = Slots::missing();
            assert!(flat::scan(record, &mut slots), "{record}");
            let padded = format!(" \t{}\r\n", record.replace(',', " ,\n ").replace(':', ": "));
            assert!(flat::scan(&padded, &mut Slots::missing()), "{padded}");
        }
        // What it leaves to the general pass.
        for record in [
            r#"{}"#,
            r#"{"type":"join","x":1}"#,
            r#"{"type":"jo\u0069n"}"#,
            r#"{"type":"join","type":"join"}"#,
            r#"{"ts":-0}"#,
            r#"{"ts":1.0}"#,
            r#"{"ts":01}"#,
            r#"{"ts":12345678901234567890}"#,
            r#"{"ts":null}"#,
            r#"{"ts":1,}"#,
            r#"{"ts":1} x"#,
        ] {
            assert!(!flat::scan(record, &mut Slots::missing()), "{record}");
        }
    }
}
