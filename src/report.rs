//! `livepipe report`: reconciliation of an output directory from its
//! ledger alone (docs/contract.md, Command line; docs/operations.md,
//! Reconciliation).
//!
//! Billing asks what a campaign cost over some days, and what was expired,
//! late or duplicated, and needs to know the answer agrees with the files
//! it was invoiced from. The numbers come from the ledger, opened
//! read-only (a running job on the same `--out` is not disturbed and its
//! lock is not taken); the check compares them with what every completion
//! marker records. Exit 0 when they match, 1 naming the first period that
//! does not, 2 for a usage error.

use clap::{Args, ValueEnum};
use livepipe_sinks::report::{
    check_markers, read_markers, rejected_by_reason, Counts, GroupBy, LedgerReader, Mismatch,
    ReportError, Table,
};
use serde::Serialize;

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The output directory of a run (its ledger.sqlite and billing/).
    #[arg(
        long,
        env = "LIVEPIPE_OUT",
        default_value = "./out",
        value_name = "DIR"
    )]
    pub out: PathBuf,

    /// Only periods starting at or after this event time (RFC 3339, e.g.
    /// 2026-11-30T00:00:00Z, or epoch ms). A period is included when it lies
    /// wholly in [--from, --to).
    #[arg(long, env = "LIVEPIPE_FROM", value_name = "TIME", value_parser = parse_time)]
    pub from: Option<u64>,

    /// Only periods ending at or before this event time (exclusive end;
    /// RFC 3339 or epoch ms).
    #[arg(long, env = "LIVEPIPE_TO", value_name = "TIME", value_parser = parse_time)]
    pub to: Option<u64>,

    /// What each period's numbers are grouped by.
    #[arg(long, env = "LIVEPIPE_BY", value_enum, default_value = "campaign")]
    pub by: By,

    /// Output format (the match/mismatch line goes to stderr for csv and json).
    #[arg(long, env = "LIVEPIPE_FORMAT", value_enum, default_value = "table")]
    pub format: Format,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum By {
    Campaign,
    Advertiser,
    Stream,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

impl By {
    fn group(self) -> GroupBy {
        match self {
            By::Campaign => GroupBy::Campaign,
            By::Advertiser => GroupBy::Advertiser,
            By::Stream => GroupBy::Stream,
        }
    }

    fn name(self) -> &'static str {
        match self {
            By::Campaign => "campaign",
            By::Advertiser => "advertiser",
            By::Stream => "stream",
        }
    }
}

/// The late reasons, always shown (as 0 when none), so columns are stable.
const LATE_REASONS: [&str; 3] = ["window_closed", "impression_final", "already_final"];

/// What the command prints, whatever the format.
#[derive(Debug, Serialize)]
struct Report {
    by: &'static str,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
    period_ms: u64,
    periods: Vec<Line>,
    /// Over all listed periods, per key.
    totals: BTreeMap<String, Shown>,
    total: Shown,
    markers: Check,
    /// Rejected records per reason over the whole output directory (not in
    /// the ledger, not per period: see [`rejected_by_reason`]).
    rejected: Option<BTreeMap<String, u64>>,
    notes: Vec<String>,
}

#[derive(Debug, Serialize)]
struct Line {
    period_start_ms: u64,
    period_end_ms: u64,
    /// Covered by a written file: nothing in it changes any more.
    #[serde(rename = "final")]
    is_final: bool,
    key: String,
    #[serde(flatten)]
    counts: Shown,
}

/// [`Counts`] with the decimal amount and every late reason.
#[derive(Debug, Serialize)]
struct Shown {
    billed_rows: u64,
    billed_price_micros: u64,
    /// `billed_price_micros` in currency units, exactly (6 decimals).
    billed_amount: String,
    expired: u64,
    duplicates: u64,
    late: BTreeMap<String, u64>,
}

impl From<&Counts> for Shown {
    fn from(counts: &Counts) -> Self {
        let mut late: BTreeMap<String, u64> =
            LATE_REASONS.iter().map(|r| (r.to_string(), 0)).collect();
        late.extend(counts.late.iter().map(|(r, n)| (r.clone(), *n)));
        Shown {
            billed_rows: counts.billed_rows,
            billed_price_micros: counts.billed_price_micros,
            billed_amount: amount(counts.billed_price_micros),
            expired: counts.expired,
            duplicates: counts.duplicates,
            late,
        }
    }
}

#[derive(Debug, Serialize)]
struct Check {
    checked: usize,
    /// `match` or `mismatch`.
    result: &'static str,
    mismatches: Vec<Mismatch>,
}

/// Runs the command; the exit code is the check's verdict.
pub fn report(args: &ReportArgs) -> ExitCode {
    if let (Some(from), Some(to)) = (args.from, args.to) {
        if from >= to {
            eprintln!("error: --from ({from}) must be before --to ({to}): the range is [from, to)");
            return ExitCode::from(2);
        }
    }
    let report = match build(args) {
        Ok(report) => report,
        Err(err @ ReportError::NoLedger(_)) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(1);
        }
    };
    if let Err(err) = print(&report, args.format) {
        eprintln!("error: writing the report: {err}");
        return ExitCode::from(1);
    }
    if report.markers.mismatches.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

fn build(args: &ReportArgs) -> Result<Report, ReportError> {
    let ledger = LedgerReader::open(&args.out)?;
    let period_ms = ledger.period_ms()?;
    // Periods lying wholly in [from, to) are those starting in
    // [from rounded up, to rounded down) to whole periods.
    let from = args.from.map_or(0, |ms| ms.div_ceil(period_ms) * period_ms);
    let to = args.to.map_or(u64::MAX, |ms| ms - ms % period_ms);
    let table = ledger.table(args.by.group(), from, to)?;
    let files_end = ledger.files_end()?.unwrap_or(0);
    let markers = read_markers(&args.out)?;
    let (checked, mismatches) = check_markers(&ledger, &markers, from, to)?;
    let mut notes = vec![
        "rejected records are not in the ledger (they have no trusted event time or campaign): \
         `rejected` counts rejected.jsonl by reason, each record once, whatever --from/--to"
            .to_string(),
        "late records count in the period of their own ts, under the key of their impression \
         when the ledger holds it final, else under `*`"
            .to_string(),
    ];
    if !ledger.has_reconciliation() {
        notes.push(
            "this ledger was last written by an earlier livepipe: it records no duplicates and \
             no late records (shown as 0); a run with this version records them from then on"
                .to_string(),
        );
    }
    Ok(Report {
        by: args.by.name(),
        from_ms: args.from,
        to_ms: args.to,
        period_ms,
        totals: totals(&table),
        total: Shown::from(&table.values().fold(Counts::default(), |mut all, c| {
            all.add(c);
            all
        })),
        periods: lines(table, period_ms, files_end),
        markers: Check {
            checked,
            result: if mismatches.is_empty() {
                "match"
            } else {
                "mismatch"
            },
            mismatches,
        },
        rejected: rejected_by_reason(&args.out)?,
        notes,
    })
}

fn lines(table: Table, period_ms: u64, files_end: u64) -> Vec<Line> {
    table
        .into_iter()
        .map(|((start, key), counts)| Line {
            period_start_ms: start,
            period_end_ms: start + period_ms,
            is_final: start + period_ms <= files_end,
            key,
            counts: Shown::from(&counts),
        })
        .collect()
}

fn totals(table: &Table) -> BTreeMap<String, Shown> {
    let mut per_key: BTreeMap<&str, Counts> = BTreeMap::new();
    for ((_, key), counts) in table {
        per_key.entry(key).or_default().add(counts);
    }
    per_key
        .into_iter()
        .map(|(key, counts)| (key.to_string(), Shown::from(&counts)))
        .collect()
}

/// Micros as a decimal amount of currency units, exactly.
fn amount(micros: u64) -> String {
    format!("{}.{:06}", micros / 1_000_000, micros % 1_000_000)
}

/// The verdict, one line: what a script or a person looks for.
fn verdict(check: &Check) -> String {
    match check.mismatches.first() {
        None => format!(
            "markers: match ({} billing files checked: billed rows and money equal the ledger's)",
            check.checked
        ),
        Some(first) => {
            let file = first
                .file
                .as_deref()
                .map_or(String::new(), |f| format!(" ({f})"));
            format!(
                "markers: MISMATCH in period [{}, {}){file}: {} ({} mismatched in all)",
                first.period_start_ms,
                first.period_end_ms,
                first.what,
                check.mismatches.len()
            )
        }
    }
}

fn print(report: &Report, format: Format) -> std::io::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match format {
        Format::Json => {
            serde_json::to_writer_pretty(&mut out, report)?;
            writeln!(out)?;
            eprintln!("{}", verdict(&report.markers));
        }
        Format::Csv => {
            write_csv(&mut out, report)?;
            eprintln!("{}", verdict(&report.markers));
        }
        Format::Table => {
            write_table(&mut out, report)?;
            writeln!(out, "{}", verdict(&report.markers))?;
        }
    }
    out.flush()
}

fn columns(by: &str) -> Vec<String> {
    let mut names: Vec<String> = ["period_start_ms", "period_end_ms", "final", by]
        .iter()
        .chain(&[
            "billed_rows",
            "billed_price_micros",
            "billed_amount",
            "expired",
            "duplicates",
        ])
        .map(|s| s.to_string())
        .collect();
    names.extend(LATE_REASONS.iter().map(|r| format!("late_{r}")));
    names
}

fn cells(line: &Line) -> Vec<String> {
    let period = [
        line.period_start_ms.to_string(),
        line.period_end_ms.to_string(),
        line.is_final.to_string(),
        line.key.clone(),
    ];
    period
        .into_iter()
        .chain(count_cells(&line.counts))
        .collect()
}

fn count_cells(c: &Shown) -> Vec<String> {
    let mut cells = vec![
        c.billed_rows.to_string(),
        c.billed_price_micros.to_string(),
        c.billed_amount.clone(),
        c.expired.to_string(),
        c.duplicates.to_string(),
    ];
    cells.extend(LATE_REASONS.iter().map(|r| c.late[*r].to_string()));
    cells
}

fn write_csv(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let mut writer = csv::WriterBuilder::new()
        .terminator(csv::Terminator::Any(b'\n'))
        .from_writer(out);
    writer.write_record(columns(report.by))?;
    for line in &report.periods {
        writer.write_record(cells(line))?;
    }
    writer.flush()
}

fn write_table(out: &mut impl Write, report: &Report) -> std::io::Result<()> {
    let header = columns(report.by);
    let mut rows: Vec<Vec<String>> = report.periods.iter().map(cells).collect();
    let total = ["total", "", "", ""].map(String::from);
    let total = total
        .into_iter()
        .chain(count_cells(&report.total))
        .collect();
    rows.push(total);
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].len())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(&rows) {
        let padded: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        writeln!(out, "{}", padded.join("  ").trim_end())?;
    }
    if let Some(rejected) = &report.rejected {
        let total: u64 = rejected.values().sum();
        let reasons: Vec<String> = rejected.iter().map(|(r, n)| format!("{r} {n}")).collect();
        writeln!(
            out,
            "rejected (whole run): {total} ({})",
            reasons.join(", ")
        )?;
    }
    for note in &report.notes {
        writeln!(out, "note: {note}")?;
    }
    Ok(())
}

/// `--from`/`--to`: epoch milliseconds, or an RFC 3339 time.
pub fn parse_time(text: &str) -> Result<u64, String> {
    if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("`{text}`: epoch milliseconds out of range"));
    }
    parse_rfc3339(text).ok_or_else(|| {
        format!(
            "`{text}` is neither epoch milliseconds nor an RFC 3339 time like \
             2026-11-30T00:00:00Z or 2026-11-30T09:00:00+01:00"
        )
    })
}

/// `YYYY-MM-DDTHH:MM:SS[.fff...](Z|±HH:MM)` to epoch ms (sub-millisecond
/// digits dropped); `None` if malformed, out of range or before 1970.
fn parse_rfc3339(text: &str) -> Option<u64> {
    let b = text.as_bytes();
    let num = |from: usize, to: usize| -> Option<i64> {
        let part = text.get(from..to)?;
        part.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| part.parse().ok())?
    };
    let separators = [(4, b'-'), (7, b'-'), (13, b':'), (16, b':')];
    if b.len() < 20
        || !separators.iter().all(|&(i, c)| b[i] == c)
        || !matches!(b[10], b'T' | b't' | b' ')
    {
        return None;
    }
    let (year, month, day) = (num(0, 4)?, num(5, 7)?, num(8, 10)?);
    let (hour, minute, second) = (num(11, 13)?, num(14, 16)?, num(17, 19)?);
    if !(1..=12).contains(&month)
        || day < 1
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    let (millis, zone) = fraction(&text[19..])?;
    let offset_s = zone_offset_s(zone)?;
    let seconds =
        days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second - offset_s;
    u64::try_from(seconds * 1_000 + millis).ok()
}

/// Splits an optional `.fff...` off the front: (milliseconds, the rest).
fn fraction(text: &str) -> Option<(i64, &str)> {
    let Some(digits) = text.strip_prefix('.') else {
        return Some((0, text));
    };
    let n = digits.bytes().take_while(u8::is_ascii_digit).count();
    if n == 0 {
        return None;
    }
    let millis = digits.bytes().chain(std::iter::repeat(b'0')).take(3);
    let millis = millis.fold(0, |ms, c| ms * 10 + i64::from(c - b'0'));
    Some((millis, &digits[n..]))
}

/// `Z` or `±HH:MM` in seconds east of UTC.
fn zone_offset_s(zone: &str) -> Option<i64> {
    if zone.eq_ignore_ascii_case("z") {
        return Some(0);
    }
    let b = zone.as_bytes();
    if b.len() != 6 || b[3] != b':' {
        return None;
    }
    let sign = match b[0] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let digits = |part: &str| {
        (part.len() == 2 && part.bytes().all(|c| c.is_ascii_digit()))
            .then(|| part.parse::<i64>().ok())?
    };
    let (hours, minutes) = (digits(&zone[1..3])?, digits(&zone[4..6])?);
    (hours <= 23 && minutes <= 59).then_some(sign * (hours * 3_600 + minutes * 60))
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * ((month + 9) % 12) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_rfc3339_or_epoch_ms() {
        assert_eq!(parse_time("1764460800000"), Ok(1_764_460_800_000));
        assert_eq!(parse_time("2025-11-30T00:00:00Z"), Ok(1_764_460_800_000));
        assert_eq!(parse_time("1970-01-01T00:00:00.0015Z"), Ok(1));
        assert_eq!(
            parse_time("2025-11-30T01:00:00+01:00"),
            Ok(1_764_460_800_000)
        );
        assert_eq!(parse_time("2024-02-29T00:00:00z"), Ok(1_709_164_800_000));
        for bad in [
            "",
            "2025-02-29T00:00:00Z",
            "2025-11-30",
            "2025-11-30T00:00:00",
            "2025-11-30T24:00:00Z",
            "1969-12-31T23:59:59Z",
            "yesterday",
            "-5",
        ] {
            assert!(parse_time(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn amounts_are_exact_decimals() {
        assert_eq!(amount(0), "0.000000");
        assert_eq!(amount(1_234_567), "1.234567");
        assert_eq!(amount(1_000_000_000_000), "1000000.000000");
    }
}
