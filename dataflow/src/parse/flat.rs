//! The fast path of the JSON pass, for records as producers write them.
//!
//! Nearly every record is one flat object of known keys whose strings have
//! no escapes and whose numbers are small non-negative integers. This
//! scanner captures such a record's slots in one pass over its bytes, with
//! no visitor calls and no key set: about a third of the cost of the
//! general serde_json walk, which must be ready for escapes, nesting and
//! every form of number, and which was the largest single cost of a replay.
//!
//! It decides nothing on its own. The moment it meets anything else (an
//! escape, a control character, a nested value, `true`/`false`/`null`, a
//! number with a sign, fraction, exponent, leading zero or 20 digits, an
//! unknown or repeated key, an empty object, a syntax error) it gives up,
//! and the record goes through the general pass from its first byte. So
//! every rejection still comes from that one pass, and on what the scanner
//! does accept, its slots are exactly the ones the general pass captures
//! (the `the_flat_scanner_agrees_with_the_general_pass_*` property tests
//! in `parse.rs` check this on built, mutated and hostile records, and the
//! `parse_event` fuzz target on whole parses).

use std::borrow::Cow;

use super::{Field, Slot, Slots};

/// Integer literals of at most this many digits fit in `u64` whatever they
/// are (10^19 - 1 < 2^64); longer ones are left to the general pass, which
/// tells a huge integer from one that fits.
const MAX_FAST_DIGITS: usize = 19;

/// Captures the top-level fields of `text` into `slots` (all `Missing` on
/// entry) if it is a flat object the scanner handles; false otherwise, with
/// `slots` in an unspecified state.
#[inline]
pub(super) fn scan<'de>(text: &'de str, slots: &mut Slots<'de>) -> bool {
    scan_object(text, slots).is_some()
}

fn scan_object<'de>(text: &'de str, slots: &mut Slots<'de>) -> Option<()> {
    let b = text.as_bytes();
    let mut i = skip_ws(b, 0);
    expect(b, i, b'{')?;
    let mut seen: u16 = 0;
    i = skip_ws(b, i + 1);
    loop {
        expect(b, i, b'"')?;
        let (key, after_key) = string(text, i + 1)?;
        let field = Field::from_key(key)?;
        let bit = 1u16 << (field as u32);
        if seen & bit != 0 {
            return None;
        }
        seen |= bit;
        i = skip_ws(b, after_key);
        expect(b, i, b':')?;
        i = skip_ws(b, i + 1);
        let (slot, after_value) = match *b.get(i)? {
            b'"' => {
                let (value, end) = string(text, i + 1)?;
                (Slot::Str(Cow::Borrowed(value)), end)
            }
            b'0'..=b'9' => {
                let (value, end) = integer(b, i)?;
                (Slot::Uint(value), end)
            }
            _ => return None,
        };
        slots.0[field as usize] = slot;
        i = skip_ws(b, after_value);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            b'}' => break,
            _ => return None,
        }
    }
    (skip_ws(b, i + 1) == b.len()).then_some(())
}

#[inline]
fn expect(b: &[u8], i: usize, byte: u8) -> Option<()> {
    (b.get(i) == Some(&byte)).then_some(())
}

/// JSON whitespace, exactly: space, tab, line feed, carriage return.
#[inline]
fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while matches!(b.get(i), Some(b' ' | b'\t' | b'\n' | b'\r')) {
        i += 1;
    }
    i
}

/// The string whose first byte (after the opening quote) is at `start`,
/// and the index just past its closing quote; `None` at an escape or a
/// control character (or the end of the text). `text` is valid UTF-8 and
/// a quote is ASCII, so the slice is on character boundaries.
#[inline]
fn string(text: &str, start: usize) -> Option<(&str, usize)> {
    let b = text.as_bytes();
    let mut j = start;
    loop {
        match *b.get(j)? {
            b'"' => return Some((text.get(start..j)?, j + 1)),
            b'\\' | 0..=0x1f => return None,
            _ => j += 1,
        }
    }
}

/// The non-negative integer literal starting at `b[i]` (a digit), and the
/// index just past it. What follows is left to the caller's structural
/// check, so `1.5`, `1e3` and `1x` fall back there.
#[inline]
fn integer(b: &[u8], i: usize) -> Option<(u64, usize)> {
    let digits = b[i..].iter().take_while(|c| c.is_ascii_digit()).count();
    if digits > MAX_FAST_DIGITS || (digits > 1 && b[i] == b'0') {
        return None;
    }
    let value = b[i..i + digits]
        .iter()
        .fold(0u64, |n, &d| n * 10 + u64::from(d - b'0'));
    Some((value, i + digits))
}
