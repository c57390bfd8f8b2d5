//! A strict parser of the OpenMetrics text format that `/metrics` serves.
//!
//! No Prometheus or OpenMetrics parser crate is in the offline registry
//! the build uses, so this one is written to the OpenMetrics 1.0 text
//! grammar and is stricter than a scraper, so that a test fails on what a
//! lenient Prometheus would let through:
//!
//! * every line is `# HELP`, `# TYPE`, `# UNIT` or a sample, the last one
//!   `# EOF`; names, label names and label values (with their escapes)
//!   follow the grammar, and values are floats, `+Inf`, `-Inf` or `NaN`;
//! * every family has a `# TYPE` before its samples, its samples are
//!   contiguous, and no family or sample (name and labels) appears twice;
//! * a sample's name is its family's plus a suffix its type allows
//!   (`_total` for counters, `_bucket`/`_sum`/`_count` for histograms,
//!   `_info` for info), and a family with a `# UNIT` ends in `_<unit>`;
//! * counters are not negative; a histogram's buckets have `le`, grow with
//!   it, end at `+Inf`, and `_count` equals the `+Inf` bucket.

use std::collections::{BTreeMap, BTreeSet};

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
    Info,
    Summary,
    Unknown,
}

impl Kind {
    fn parse(word: &str) -> Result<Kind, String> {
        Ok(match word {
            "counter" => Kind::Counter,
            "gauge" => Kind::Gauge,
            "histogram" => Kind::Histogram,
            "info" => Kind::Info,
            "summary" => Kind::Summary,
            "unknown" => Kind::Unknown,
            other => return Err(format!("unknown type `{other}`")),
        })
    }

    /// The suffixes a sample of this type may add to its family's name.
    fn suffixes(self) -> &'static [&'static str] {
        match self {
            Kind::Counter => &["_total", "_created"],
            Kind::Gauge | Kind::Unknown => &[""],
            Kind::Histogram => &["_bucket", "_sum", "_count", "_created"],
            Kind::Info => &["_info"],
            Kind::Summary => &["", "_sum", "_count", "_created"],
        }
    }
}

/// One sample line.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// One metric family: its metadata and samples.
#[derive(Clone, Debug, PartialEq)]
pub struct Family {
    pub kind: Kind,
    pub help: Option<String>,
    pub unit: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed exposition, by family name.
#[derive(Clone, Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

impl Exposition {
    /// The family `name`, failing the test if there is none.
    pub fn family(&self, name: &str) -> &Family {
        self.families
            .get(name)
            .unwrap_or_else(|| panic!("no family {name} in {:?}", self.families.keys()))
    }

    /// The value of the sample `name` whose labels include `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.families
            .values()
            .flat_map(|f| &f.samples)
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

/// Parses `text` strictly (see the module doc), or says where and why not.
pub fn parse(text: &str) -> Result<Exposition, String> {
    let body = text
        .strip_suffix("# EOF\n")
        .ok_or("the exposition does not end with `# EOF` and a newline")?;
    let mut parser = Parser::default();
    for (n, line) in body.split_terminator('\n').enumerate() {
        parser
            .line(line)
            .map_err(|why| format!("line {}: {why}: {line:?}", n + 1))?;
    }
    parser.finish()?;
    Ok(parser.exposition)
}

#[derive(Default)]
struct Parser {
    exposition: Exposition,
    /// The family whose lines come now.
    current: Option<String>,
    /// Families already closed (another began after them).
    closed: BTreeSet<String>,
    /// Sample names with their labels, to refuse repeats.
    seen: BTreeSet<(String, Vec<(String, String)>)>,
}

impl Parser {
    fn line(&mut self, line: &str) -> Result<(), String> {
        if let Some(rest) = line.strip_prefix("# ") {
            let (keyword, rest) = rest.split_once(' ').ok_or("a comment without a keyword")?;
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            check_metric_name(name)?;
            self.enter(name)?;
            let family = self.exposition.families.get_mut(name).expect("entered");
            return match keyword {
                "TYPE" if family.samples.is_empty() => {
                    family.kind = Kind::parse(value)?;
                    Ok(())
                }
                "HELP" => set_once(&mut family.help, value, "HELP"),
                "UNIT" => {
                    if !name.ends_with(&format!("_{value}")) || value.is_empty() {
                        return Err(format!(
                            "a family with unit `{value}` must end in `_{value}`"
                        ));
                    }
                    set_once(&mut family.unit, value, "UNIT")
                }
                _ => Err(format!("`# {keyword}` is not allowed here")),
            };
        }
        if line.starts_with('#') || line.is_empty() {
            return Err("not a metadata line, sample or `# EOF`".into());
        }
        self.sample(line)
    }

    /// Makes `name` the current family, refusing one seen and closed.
    fn enter(&mut self, name: &str) -> Result<(), String> {
        if self.current.as_deref() == Some(name) {
            return Ok(());
        }
        if self.closed.contains(name) || self.exposition.families.contains_key(name) {
            return Err(format!("family {name} is not contiguous"));
        }
        if let Some(previous) = self.current.replace(name.to_string()) {
            self.closed.insert(previous);
        }
        self.exposition.families.insert(
            name.to_string(),
            Family {
                kind: Kind::Unknown,
                help: None,
                unit: None,
                samples: Vec::new(),
            },
        );
        Ok(())
    }

    fn sample(&mut self, line: &str) -> Result<(), String> {
        let sample = parse_sample(line)?;
        let family_name = self.current.clone().ok_or("a sample before any `# TYPE`")?;
        let family = self
            .exposition
            .families
            .get_mut(&family_name)
            .expect("current");
        let suffix = sample
            .name
            .strip_prefix(family_name.as_str())
            .ok_or_else(|| format!("sample {} outside its family {family_name}", sample.name))?;
        if !family.kind.suffixes().contains(&suffix) {
            return Err(format!(
                "a {:?} has no sample suffix `{suffix}`",
                family.kind
            ));
        }
        if family.kind == Kind::Counter && (sample.value.is_nan() || sample.value < 0.0) {
            return Err("a counter below zero or NaN".into());
        }
        let key = (
            sample.name.clone(),
            sample.labels.clone().into_iter().collect(),
        );
        if !self.seen.insert(key) {
            return Err("the same sample twice".into());
        }
        family.samples.push(sample);
        Ok(())
    }

    fn finish(&self) -> Result<(), String> {
        for (name, family) in &self.exposition.families {
            if family.kind == Kind::Unknown {
                return Err(format!("family {name} has no `# TYPE`"));
            }
            if family.kind == Kind::Gauge {
                let reserved = ["_total", "_created", "_count", "_sum", "_bucket", "_info"];
                if reserved.iter().any(|r| name.ends_with(r)) {
                    return Err(format!("gauge {name} ends in a reserved suffix"));
                }
            }
            if family.kind == Kind::Histogram {
                check_histogram(name, family)?;
            }
        }
        Ok(())
    }
}

fn set_once(slot: &mut Option<String>, value: &str, what: &str) -> Result<(), String> {
    if slot.replace(value.to_string()).is_some() {
        return Err(format!("a second `# {what}`"));
    }
    Ok(())
}

fn check_metric_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == ':');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
        Ok(())
    } else {
        Err(format!("`{name}` is not a metric name"))
    }
}

fn check_label_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && !name.starts_with("__") {
        Ok(())
    } else {
        Err(format!("`{name}` is not a label name"))
    }
}

/// `name{labels} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ']).ok_or("a sample without a value")?;
    let name = &line[..name_end];
    check_metric_name(name)?;
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, after) = parse_labels(after)?;
        labels = parsed;
        rest = after;
    }
    let rest = rest.strip_prefix(' ').ok_or("no space before the value")?;
    let mut words = rest.split(' ');
    let value = parse_value(words.next().unwrap_or_default())?;
    if let Some(timestamp) = words.next() {
        parse_value(timestamp).map_err(|_| "a bad timestamp".to_string())?;
    }
    if words.next().is_some() {
        return Err("more than a value and a timestamp".into());
    }
    Ok(Sample {
        name: name.to_string(),
        labels,
        value,
    })
}

/// The labels after `{`, up to and with `}`; returns them and the rest.
fn parse_labels(mut text: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    if let Some(rest) = text.strip_prefix('}') {
        return Ok((labels, rest));
    }
    loop {
        let (name, rest) = text.split_once("=\"").ok_or("a label without =\"")?;
        check_label_name(name)?;
        let (value, rest) = parse_label_value(rest)?;
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        if let Some(rest) = rest.strip_prefix('}') {
            return Ok((labels, rest));
        }
        text = rest.strip_prefix(',').ok_or("labels not separated by ,")?;
    }
}

/// A label value after its opening quote: the unescaped value and what
/// follows its closing quote.
fn parse_label_value(text: &str) -> Result<(String, &str), String> {
    let mut value = String::new();
    let mut chars = text.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((value, &text[i + 1..])),
            '\\' => match chars.next() {
                Some((_, '\\')) => value.push('\\'),
                Some((_, '"')) => value.push('"'),
                Some((_, 'n')) => value.push('\n'),
                _ => return Err("a bad escape in a label value".into()),
            },
            '\n' => return Err("a newline in a label value".into()),
            c => value.push(c),
        }
    }
    Err("an unterminated label value".into())
}

fn parse_value(word: &str) -> Result<f64, String> {
    match word {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        // Rust's parser takes "inf", "infinity" and "nan" too: not here.
        _ if word
            .chars()
            .any(|c| c.is_ascii_alphabetic() && c != 'e' && c != 'E') =>
        {
            Err(format!("`{word}` is not a number"))
        }
        _ => word
            .parse()
            .map_err(|_| format!("`{word}` is not a number")),
    }
}

/// A sample's labels (without `le`), as a key.
type LabelSet = Vec<(String, String)>;

/// Buckets with `le`, growing, ending at `+Inf` equal to `_count`, per
/// label set.
fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut by_labels: BTreeMap<LabelSet, Vec<(f64, f64)>> = BTreeMap::new();
    let mut counts = BTreeMap::new();
    for sample in &family.samples {
        let mut labels = sample.labels.clone();
        if sample.name.ends_with("_bucket") {
            let le = labels
                .remove("le")
                .ok_or_else(|| format!("{name}: a bucket without le"))?;
            let le = parse_value(&le)?;
            by_labels
                .entry(labels.into_iter().collect())
                .or_default()
                .push((le, sample.value));
        } else if sample.name.ends_with("_count") {
            counts.insert(labels.into_iter().collect::<Vec<_>>(), sample.value);
        }
    }
    if by_labels.is_empty() {
        return Err(format!("{name}: a histogram without buckets"));
    }
    for (labels, buckets) in by_labels {
        let ordered = buckets
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 <= w[1].1);
        let (last_le, last) = *buckets.last().expect("not empty");
        if !ordered || last_le != f64::INFINITY {
            return Err(format!("{name}: buckets not growing to +Inf: {buckets:?}"));
        }
        if counts.get(&labels) != Some(&last) {
            return Err(format!("{name}: _count is not the +Inf bucket"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "# HELP a_seconds Time.\n# TYPE a_seconds histogram\n\
        # UNIT a_seconds seconds\na_seconds_sum 1.5\na_seconds_count 2\n\
        a_seconds_bucket{le=\"1.0\"} 1\na_seconds_bucket{le=\"+Inf\"} 2\n\
        # TYPE b counter\nb_total{x=\"q\\\"\\\\\\n\"} 3\n# TYPE c gauge\nc -1e3\n# EOF\n";

    #[test]
    fn a_good_exposition_parses() {
        let parsed = parse(GOOD).unwrap();
        assert_eq!(parsed.family("a_seconds").kind, Kind::Histogram);
        assert_eq!(parsed.family("a_seconds").unit.as_deref(), Some("seconds"));
        assert_eq!(parsed.value("b_total", &[("x", "q\"\\\n")]), Some(3.0));
        assert_eq!(parsed.value("c", &[]), Some(-1000.0));
    }

    #[test]
    fn what_a_lenient_scraper_would_take_is_refused() {
        for bad in [
            GOOD.replace("# EOF\n", ""),
            GOOD.replace("c -1e3", "c inf"),
            GOOD.replace("b_total{", "b{"),
            GOOD.replace("# UNIT a_seconds seconds", "# UNIT a_seconds bytes"),
            GOOD.replace("a_seconds_count 2", "a_seconds_count 3"),
            GOOD.replace("{le=\"+Inf\"} 2", "{le=\"+Inf\"} 0"),
            GOOD.replace("b_total{x=\"q", "b_total{x=\"\\q"),
            GOOD.replace("# TYPE c gauge\nc -1e3\n", "# TYPE c gauge\nc 1\nc 2\n"),
            GOOD.replace("# TYPE c gauge\nc -1e3\n", "# TYPE c gauge\nc_total 1\n"),
            GOOD.replace("# TYPE b counter\n", ""),
            GOOD.replace("b_total{x=\"q\\\"\\\\\\n\"} 3", "b_total -3"),
            format!(
                "{}# TYPE b counter\nb_total 1\n# EOF\n",
                GOOD.replace("# EOF\n", "")
            ),
        ] {
            assert!(parse(&bad).is_err(), "took {bad}");
        }
    }
}
