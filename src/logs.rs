//! Logs on stderr (docs/operations.md, Logs): which lines is `RUST_LOG`'s
//! business, how they look is `--log-format`'s.
//!
//! * `text`: one line per event for people; ANSI colour only when stderr is
//!   a terminal and `NO_COLOR` is not set (https://no-color.org), so that a
//!   log file or journald never holds escape codes.
//! * `json`: one JSON object per line (`timestamp`, `level`, `message`, the
//!   event's fields, `target`), for log collectors. The few messages the
//!   binary writes to stderr outside the log (the demo's banner, `gen`'s
//!   summary, the final error) are log events then too, so that every line
//!   parses. Usage errors found while parsing the command line come before
//!   logging starts and stay plain text.

use crate::cli::LogFormat;
use std::io::IsTerminal;
use std::sync::OnceLock;

/// The format chosen by [`init`].
static FORMAT: OnceLock<LogFormat> = OnceLock::new();

/// What is logged without `RUST_LOG`: info, except warp's server, which
/// logs every connection a client drops as an error.
const DEFAULT_FILTER: &str = "info,warp::server=off";

/// Installs the global subscriber: stderr, filtered by `RUST_LOG`.
pub fn init(format: LogFormat) {
    let _ = FORMAT.set(format);
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_FILTER));
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => builder
            .with_ansi(colour(std::env::var_os("NO_COLOR")))
            .init(),
        // The message and fields at the top level, not under "fields":
        // what collectors index without configuration.
        LogFormat::Json => builder.json().flatten_event(true).with_ansi(false).init(),
    }
}

/// Whether text logs are coloured: on a terminal, unless `NO_COLOR` is set
/// to anything but the empty string.
fn colour(no_color: Option<std::ffi::OsString>) -> bool {
    no_color.is_none_or(|value| value.is_empty()) && std::io::stderr().is_terminal()
}

/// Whether log lines are JSON objects (`--log-format json`).
pub fn json() -> bool {
    FORMAT.get() == Some(&LogFormat::Json)
}

/// A message for the person at the terminal (a banner, a summary): a plain
/// stderr line, or an INFO event when every line must be JSON.
pub fn say(text: &str) {
    if json() {
        tracing::info!("{text}");
    } else {
        eprintln!("{text}");
    }
}

/// The reason the process exits with an error: `error: TEXT` on stderr, or
/// an ERROR event when every line must be JSON.
pub fn exit_error(text: &str) {
    if json() {
        tracing::error!("{text}");
    } else {
        eprintln!("error: {text}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_color_set_to_anything_turns_colour_off() {
        // Off whatever stderr is; with it unset or empty, the terminal decides.
        assert!(!colour(Some("1".into())));
        assert!(!colour(Some("false".into())));
        let terminal = std::io::stderr().is_terminal();
        assert_eq!(colour(None), terminal);
        assert_eq!(colour(Some("".into())), terminal);
    }
}
