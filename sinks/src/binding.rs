//! What a ledger is bound to: the billing rules and the input it bills.
//!
//! A billing job is restarted, re-pointed and re-configured by people in a
//! hurry. A ledger resumed under other rules would bill the rest of its
//! input by other rules than the start; resumed on another input, it would
//! skip records or judge them against the wrong history. So a new ledger
//! records its rules and its input, and every later run on it must bring
//! the same ones or be refused (exit 2) before anything under `--out`
//! changes. Changing rules or inputs means a new `--out`.
//!
//! Bound: the rules that decide what is billed (`--qualify-ms`,
//! `--qualify-window-ms`, `--allowed-lateness-ms`, `--billing-period-ms`)
//! and the input's kind, files (how many) or a Kafka topic (its name). The
//! rest of an input's identity is its content and offsets, which only the
//! sources can check: the ledger's resume positions carry each file's
//! prefix digest and each partition's offset, checked against the input
//! before the job starts. Settings that cannot change what is billed
//! (presence TTL, state retention, workers, HTTP address) stay free.

use livepipe_dataflow::config::PipelineConfig;
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use std::collections::BTreeMap;
use std::path::Path;

use crate::ledger::{Ledger, ResumePosition, LEDGER_FILE};

const BINDING_TABLE: &str =
    "CREATE TABLE IF NOT EXISTS binding (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID";

/// The rules and input a ledger belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Binding {
    /// Flag -> value of every rule that decides what is billed.
    pub rules: BTreeMap<String, String>,
    pub input: BoundInput,
}

/// The kind of input a ledger bills.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BoundInput {
    /// Files, one partition each, in command-line order. The paths are
    /// kept to name them in messages: a file's identity is its content.
    Files {
        paths: Vec<String>,
    },
    Kafka {
        topic: String,
    },
    /// The embedded demo's topic, which starts empty on every run.
    Demo,
}

impl Binding {
    pub fn new(config: &PipelineConfig, input: BoundInput) -> Self {
        let rules = [
            ("--qualify-ms", config.qualify_ms),
            ("--qualify-window-ms", config.qualify_window_ms),
            ("--allowed-lateness-ms", config.allowed_lateness_ms),
            ("--billing-period-ms", config.billing_period_ms),
        ]
        .into_iter()
        .map(|(flag, value)| (flag.to_string(), value.to_string()))
        .collect();
        Binding { rules, input }
    }

    /// What differs between `self` (the ledger's) and `now`, one line per
    /// difference naming both values; empty when they agree.
    pub fn differences(&self, now: &Binding) -> Vec<String> {
        let mut lines = Vec::new();
        let flags: std::collections::BTreeSet<&String> =
            self.rules.keys().chain(now.rules.keys()).collect();
        for flag in flags {
            let (there, here) = (self.rules.get(flag), now.rules.get(flag));
            if there != here {
                let show = |v: Option<&String>| v.map_or("unset".to_string(), |v| v.to_string());
                lines.push(format!(
                    "{flag}: {} in the ledger, {} now",
                    show(there),
                    show(here)
                ));
            }
        }
        match (&self.input, &now.input) {
            (BoundInput::Kafka { topic: there }, BoundInput::Kafka { topic: here }) => {
                if there != here {
                    lines.push(format!("--topic: `{there}` in the ledger, `{here}` now"));
                }
            }
            (BoundInput::Files { paths: there }, BoundInput::Files { paths: here }) => {
                if there.len() != here.len() {
                    lines.push(format!(
                        "--input: {} in the ledger ({}), {} now ({})",
                        count_files(there.len()),
                        there.join(" "),
                        count_files(here.len()),
                        here.join(" ")
                    ));
                }
            }
            (there, here) => lines.push(format!(
                "input: {} in the ledger, {} now",
                describe(there),
                describe(here)
            )),
        }
        lines
    }
}

fn count_files(n: usize) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

fn describe(input: &BoundInput) -> String {
    match input {
        BoundInput::Files { paths } => format!("--input {}", paths.join(" ")),
        BoundInput::Kafka { topic } => format!("Kafka topic `{topic}`"),
        BoundInput::Demo => "the embedded demo".into(),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The run does not match the ledger: the operator must change the
    /// command line or use a fresh `--out`.
    #[error("{0}")]
    Mismatch(String),
    #[error("billing ledger: {0}")]
    Ledger(#[from] rusqlite::Error),
}

/// Binds `out`'s ledger to `binding`: a new ledger (none yet, or one that
/// never recorded anything) is created bound to it; an existing one must
/// be bound to the same. Returns the ledger's resume positions, which the
/// caller checks against the input itself. Refusing changes nothing.
pub fn bind(out: &Path, binding: &Binding) -> Result<BTreeMap<u32, ResumePosition>, BindError> {
    let path = out.join(LEDGER_FILE);
    if path.exists() {
        let conn = Connection::open(&path)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        match read(&conn)? {
            Some(bound) => {
                let differences = bound.differences(binding);
                if !differences.is_empty() {
                    return Err(BindError::Mismatch(format!(
                        "--out {} belongs to another input or other billing rules; resuming it \
                         would bill wrong:\n  {}\nRun with the ledger's values, or use a fresh \
                         --out for this job (docs/operations.md: \"Changing rules, inputs and topics safely\")",
                        out.display(),
                        differences.join("\n  ")
                    )));
                }
                return Ok(Ledger { conn }.positions()?);
            }
            None if holds_anything(&conn)? => {
                return Err(BindError::Mismatch(format!(
                    "--out {}: its ledger was written by an earlier livepipe that did not \
                     record its input and rules, so resuming it cannot be checked; use a fresh \
                     --out",
                    out.display()
                )))
            }
            // Created, then stopped before it recorded anything: new.
            None => {}
        }
    }
    let mut ledger = Ledger::open(&path)?;
    let tx = ledger.conn.transaction()?;
    tx.execute(BINDING_TABLE, [])?;
    let input = serde_json::to_string(&binding.input).expect("plain data");
    let rules = serde_json::to_string(&binding.rules).expect("plain data");
    for (key, value) in [
        ("input", input.as_str()),
        ("rules", rules.as_str()),
        ("livepipe_version", env!("CARGO_PKG_VERSION")),
    ] {
        tx.execute(
            "INSERT OR REPLACE INTO binding (key, value) VALUES (?1, ?2)",
            [key, value],
        )?;
    }
    tx.commit()?;
    Ok(BTreeMap::new())
}

/// The input `out`'s ledger is bound to, if there is a ledger with a
/// binding; changes nothing.
pub fn bound_input(out: &Path) -> Result<Option<BoundInput>, BindError> {
    let path = out.join(LEDGER_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let conn = Connection::open(&path)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(read(&conn)?.map(|binding| binding.input))
}

/// The binding a ledger recorded, if it recorded one.
fn read(conn: &Connection) -> Result<Option<Binding>, BindError> {
    if !has_table(conn, "binding")? {
        return Ok(None);
    }
    let value = |key: &str| -> rusqlite::Result<Option<String>> {
        conn.query_row("SELECT value FROM binding WHERE key = ?1", [key], |row| {
            row.get(0)
        })
        .optional()
    };
    let (Some(input), Some(rules)) = (value("input")?, value("rules")?) else {
        return Ok(None);
    };
    let unreadable = |what: &str, err: serde_json::Error| {
        BindError::Mismatch(format!(
            "the ledger's recorded {what} cannot be read ({err}); it was not written by this \
             livepipe: use a fresh --out"
        ))
    };
    Ok(Some(Binding {
        rules: serde_json::from_str(&rules).map_err(|err| unreadable("rules", err))?,
        input: serde_json::from_str(&input).map_err(|err| unreadable("input", err))?,
    }))
}

fn has_table(conn: &Connection, name: &str) -> rusqlite::Result<bool> {
    conn.query_row(
        "SELECT COUNT(*) FROM sqlite_master WHERE type = 'table' AND name = ?1",
        [name],
        |row| row.get::<_, i64>(0),
    )
    .map(|n| n > 0)
}

/// Whether a ledger without a binding holds any outcome or position.
fn holds_anything(conn: &Connection) -> rusqlite::Result<bool> {
    for table in ["finalized", "positions", "files"] {
        if has_table(conn, table)? {
            let rows: i64 =
                conn.query_row(&format!("SELECT COUNT(*) FROM {table}"), [], |row| {
                    row.get(0)
                })?;
            if rows > 0 {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files(paths: &[&str]) -> BoundInput {
        BoundInput::Files {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        }
    }

    #[test]
    fn a_new_ledger_is_bound_and_the_same_job_resumes_it() {
        let dir = tempfile::tempdir().unwrap();
        let binding = Binding::new(&PipelineConfig::default(), files(&["a.jsonl"]));
        assert!(bind(dir.path(), &binding).unwrap().is_empty());
        assert!(bind(dir.path(), &binding).unwrap().is_empty());
        // Free settings do not count.
        let other = PipelineConfig {
            presence_ttl_ms: 1,
            state_retention_ms: 2,
            idle_timeout_ms: 3,
            ..PipelineConfig::default()
        };
        bind(dir.path(), &Binding::new(&other, files(&["moved/a.jsonl"]))).unwrap();
    }

    #[test]
    fn other_rules_or_inputs_are_refused_naming_both_values() {
        let dir = tempfile::tempdir().unwrap();
        let config = PipelineConfig::default();
        bind(dir.path(), &Binding::new(&config, files(&["a.jsonl"]))).unwrap();
        let stricter = PipelineConfig {
            qualify_ms: 3_000,
            ..config.clone()
        };
        let said = bind(dir.path(), &Binding::new(&stricter, files(&["a.jsonl"])))
            .unwrap_err()
            .to_string();
        assert!(
            said.contains("--qualify-ms: 2000 in the ledger, 3000 now"),
            "{said}"
        );
        assert!(said.contains("fresh --out"), "{said}");
        let said = bind(
            dir.path(),
            &Binding::new(&config, files(&["a.jsonl", "b.jsonl"])),
        )
        .unwrap_err()
        .to_string();
        assert!(said.contains("--input: 1 file in the ledger"), "{said}");
        let kafka = BoundInput::Kafka { topic: "t".into() };
        let said = bind(dir.path(), &Binding::new(&config, kafka))
            .unwrap_err()
            .to_string();
        assert!(said.contains("Kafka topic `t` now"), "{said}");
    }

    #[test]
    fn another_topic_is_refused() {
        let there = Binding::new(
            &PipelineConfig::default(),
            BoundInput::Kafka { topic: "a".into() },
        );
        let here = Binding::new(
            &PipelineConfig::default(),
            BoundInput::Kafka { topic: "b".into() },
        );
        assert_eq!(
            there.differences(&here),
            ["--topic: `a` in the ledger, `b` now"]
        );
    }
}
