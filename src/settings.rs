//! Where flag values come from: the command line, `LIVEPIPE_*` environment
//! variables, and a `--config` TOML file, in that order of precedence, then
//! the flags' defaults (docs/contract.md, Command line).
//!
//! clap handles the first two (every long flag has `env = "LIVEPIPE_..."`).
//! The file is folded in here by turning its keys into command-line flags:
//! the arguments are parsed once, then every file key whose flag was given
//! neither on the command line nor in the environment is appended as
//! `--key=value` and the whole is parsed again. A value from the file thus
//! goes through exactly the parser, checks and conflicts of the same flag
//! typed by hand, and the job cannot tell where a value came from (the
//! ledger's job fingerprint, `pipeline::job_shape`, sees the same value).

use crate::cli::Cli;
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{ArgAction, ArgMatches, CommandFactory, FromArgMatches};

use std::ffi::OsString;
use std::path::Path;

/// Why the arguments were not accepted.
#[derive(Debug)]
pub enum ParseFailure {
    /// clap's own answer: a usage error (exit 2), or `--help`/`--version`
    /// (exit 0); `clap::Error::exit` prints it and exits with its code.
    Clap(clap::Error),
    /// A problem with the `--config` file, naming the file and the key
    /// (a usage error: exit 2).
    Config(String),
}

impl From<clap::Error> for ParseFailure {
    fn from(err: clap::Error) -> Self {
        ParseFailure::Clap(err)
    }
}

/// A parsed command line, and which flags got their value from outside it.
#[derive(Debug)]
pub struct Parsed {
    pub cli: Cli,
    /// `--flag from LIVEPIPE_FLAG`, or `--flag from FILE`, for every flag
    /// the environment or the config file set: a usage error names the
    /// flag, and whoever reads it may not have typed it.
    pub origins: Vec<String>,
}

/// Parses `args` (the program name first), with values from the
/// environment and from `--config FILE` where the command line has none.
pub fn parse_from<I, T>(args: I) -> Result<Cli, ParseFailure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    parse_with_origins(args).map(|parsed| parsed.cli)
}

/// [`parse_from`], saying where the values not on the command line came
/// from.
pub fn parse_with_origins<I, T>(args: I) -> Result<Parsed, ParseFailure>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString>,
{
    let mut args: Vec<OsString> = args.into_iter().map(Into::into).collect();
    let mut command = Cli::command();
    command.build();
    let (matches, missing) = match command.clone().try_get_matches_from(&args) {
        Ok(matches) => (matches, None),
        // What is missing may be in the config file (`output` for `gen`):
        // read the rest as far as it goes; the final parse says if the
        // file does not have it either.
        Err(err) if err.kind() == ErrorKind::MissingRequiredArgument => {
            let lenient = command.clone().ignore_errors(true);
            (lenient.try_get_matches_from(&args)?, Some(err))
        }
        Err(err) => return Err(err.into()),
    };
    let Some((name, given)) = matches.subcommand() else {
        return Err(missing.expect("clap requires a subcommand").into());
    };
    let Some(path) = given.get_one::<std::path::PathBuf>("config").cloned() else {
        return match missing {
            Some(err) => Err(err.into()),
            None => parsed(&command, &matches, &[], Path::new("")),
        };
    };
    let subcommand = command
        .find_subcommand(name)
        .expect("the subcommand just parsed");
    let (extra, from_file) = file_args(&path, name, subcommand, given)?;
    if extra.is_empty() && missing.is_none() {
        return parsed(&command, &matches, &[], &path);
    }
    args.extend(extra);
    let matches = command.clone().try_get_matches_from(&args).map_err(|err| {
        ParseFailure::Config(format!(
            "{}: the values from this config file do not fit the rest: {}",
            path.display(),
            first_line(&err)
        ))
    })?;
    parsed(&command, &matches, &from_file, &path)
}

/// The [`Cli`] of the final `matches`, with the origins of the values the
/// environment or the file at `path` set (`from_file`: those flags' long
/// names).
fn parsed(
    command: &clap::Command,
    matches: &ArgMatches,
    from_file: &[String],
    path: &Path,
) -> Result<Parsed, ParseFailure> {
    let cli = Cli::from_arg_matches(matches)?;
    let mut origins = Vec::new();
    if let Some((name, given)) = matches.subcommand() {
        let subcommand = command.find_subcommand(name).expect("just parsed");
        for arg in subcommand.get_arguments() {
            let Some(long) = arg.get_long() else {
                continue;
            };
            let source = given.value_source(arg.get_id().as_str());
            match arg.get_env() {
                Some(env) if source == Some(ValueSource::EnvVariable) => {
                    origins.push(format!("--{long} from {}", env.to_string_lossy()));
                }
                _ if from_file.iter().any(|flag| flag == long) => {
                    origins.push(format!("--{long} from {}", path.display()));
                }
                _ => {}
            }
        }
    }
    Ok(Parsed { cli, origins })
}

/// The `--key=value` arguments the config file at `path` adds to
/// `livepipe NAME`: one per key (one per element of an array) whose flag
/// `given` has from neither the command line nor the environment; and the
/// long names of the flags they set.
fn file_args(
    path: &Path,
    name: &str,
    subcommand: &clap::Command,
    given: &ArgMatches,
) -> Result<(Vec<OsString>, Vec<String>), ParseFailure> {
    let table = read_table(path)?;
    let mut extra = Vec::new();
    let mut set = Vec::new();
    for (key, value) in &table {
        let arg = flag_for_key(path, name, subcommand, key)?;
        let from_user = matches!(
            given.value_source(arg.get_id().as_str()),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        );
        if from_user {
            continue;
        }
        let long = arg.get_long().expect("flags are found by their long name");
        let before = extra.len();
        for text in values(path, key, arg, value)? {
            check_value(path, key, arg, &text)?;
            extra.push(OsString::from(format!("--{long}={text}")));
        }
        if is_switch(arg) && value.as_bool() == Some(true) {
            extra.push(OsString::from(format!("--{long}")));
        }
        // A switch set to false (or an empty array) sets nothing.
        if extra.len() > before {
            set.push(long.to_string());
        }
    }
    Ok((extra, set))
}

/// The file as a TOML table, or a message naming the file.
fn read_table(path: &Path) -> Result<toml::Table, ParseFailure> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        ParseFailure::Config(format!("--config {}: cannot read: {err}", path.display()))
    })?;
    text.parse::<toml::Table>().map_err(|err| {
        // Where and what, but not toml's excerpt of the line: a file given
        // by mistake (Kafka properties, `sasl.password=...`) is not TOML,
        // and its lines must not reach a log.
        let place = err.span().map_or_else(String::new, |span| {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |at| at + 1) + 1;
            format!(" at line {line}, column {column}")
        });
        ParseFailure::Config(format!(
            "--config {}: not valid TOML{place}: {}; write `key = value` lines, strings \
             in quotes (`out = \"/data/out\"`)",
            path.display(),
            err.message().trim_end()
        ))
    })
}

/// The flag of `livepipe NAME` that a file key names: its long name, in
/// kebab-case (`allowed-lateness-ms`) or snake_case (`allowed_lateness_ms`).
fn flag_for_key<'c>(
    path: &Path,
    name: &str,
    subcommand: &'c clap::Command,
    key: &str,
) -> Result<&'c clap::Arg, ParseFailure> {
    let long = key.replace('_', "-");
    let settable = |arg: &&clap::Arg| {
        arg.get_long()
            .is_some_and(|l| l == long && !matches!(l, "config" | "help" | "version"))
    };
    if let Some(arg) = subcommand.get_arguments().find(settable) {
        return Ok(arg);
    }
    let keys: Vec<&str> = subcommand
        .get_arguments()
        .filter_map(|arg| arg.get_long())
        .filter(|l| !matches!(*l, "config" | "help" | "version"))
        .collect();
    let hint = if matches!(key, "X" | "x" | "kafka-property" | "kafka_property") {
        "; -X properties are command-line only: put them in a file named by \
         `kafka-config` (KEY=VALUE lines)"
            .to_string()
    } else {
        format!("; the keys of `livepipe {name}` are: {}", keys.join(", "))
    };
    Err(ParseFailure::Config(format!(
        "--config {}: unknown key `{key}`{hint}",
        path.display()
    )))
}

/// Whether `arg` is a switch (`--accept-data-loss`), set by `true`.
fn is_switch(arg: &clap::Arg) -> bool {
    matches!(arg.get_action(), ArgAction::SetTrue)
}

/// The file's value for `key` as the texts of command-line values: a
/// string, integer or float as one value, an array as one per element (only
/// for a flag that can be repeated); nothing for a switch (see
/// [`file_args`]).
fn values(
    path: &Path,
    key: &str,
    arg: &clap::Arg,
    value: &toml::Value,
) -> Result<Vec<String>, ParseFailure> {
    let bad =
        |what: &str| ParseFailure::Config(format!("--config {}: `{key}` {what}", path.display()));
    if is_switch(arg) {
        return match value {
            toml::Value::Boolean(_) => Ok(Vec::new()),
            _ => Err(bad("is a switch: give true or false")),
        };
    }
    let repeatable = matches!(arg.get_action(), ArgAction::Append);
    match value {
        toml::Value::Array(items) if repeatable => items
            .iter()
            .map(|item| scalar(item).ok_or_else(|| bad("takes an array of strings or numbers")))
            .collect(),
        toml::Value::Array(_) => Err(bad("takes one value, not an array")),
        other => scalar(other)
            .map(|text| vec![text])
            .ok_or_else(|| bad("takes a string or a number")),
    }
}

/// A string, integer or float as it would be typed on the command line.
fn scalar(value: &toml::Value) -> Option<String> {
    match value {
        toml::Value::String(text) => Some(text.clone()),
        toml::Value::Integer(n) => Some(n.to_string()),
        toml::Value::Float(x) => Some(x.to_string()),
        _ => None,
    }
}

/// Runs `text` through the flag's own value parser, so that a bad value
/// is reported as the file's (with the file and key), not as if typed.
fn check_value(path: &Path, key: &str, arg: &clap::Arg, text: &str) -> Result<(), ParseFailure> {
    // clap runs a value parser only inside a parse: parse the value alone,
    // with a flag that has the same name, parser and delimiter (a flag split
    // on commas, `http-allowed-hosts`, is checked per part) and none of the
    // real flag's relations to others, which the final parse checks.
    let long = arg.get_long().unwrap_or(key).to_string();
    let mut probe = clap::Arg::new("value")
        .long(long.clone())
        .value_parser(arg.get_value_parser().clone());
    if let Some(names) = arg.get_value_names() {
        probe = probe.value_names(names.iter().cloned());
    }
    if let Some(delimiter) = arg.get_value_delimiter() {
        probe = probe.value_delimiter(delimiter);
    }
    clap::Command::new("livepipe")
        .no_binary_name(true)
        .arg(probe)
        .try_get_matches_from([format!("--{long}={text}")])
        .map(drop)
        .map_err(|err| {
            ParseFailure::Config(format!(
                "--config {}: `{key}`: {}",
                path.display(),
                first_line(&err)
            ))
        })
}

/// The first line of clap's message, without its `error: ` prefix (the
/// caller prints its own) and without the usage that follows.
fn first_line(err: &clap::Error) -> String {
    let text = err.to_string();
    let line = text.lines().next().unwrap_or_default();
    line.strip_prefix("error: ").unwrap_or(line).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::Command;

    fn config(text: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        std::io::Write::write_all(&mut file, text.as_bytes()).expect("write");
        file
    }

    fn run_args(args: &[&str]) -> Result<crate::cli::RunArgs, ParseFailure> {
        let cli = parse_from(["livepipe", "run"].iter().chain(args))?;
        match cli.command {
            Command::Run(run) => Ok(run),
            _ => unreachable!("parsed `run`"),
        }
    }

    fn message(failure: ParseFailure) -> String {
        match failure {
            ParseFailure::Config(message) => message,
            ParseFailure::Clap(err) => panic!("not a config error: {err}"),
        }
    }

    #[test]
    fn every_long_flag_has_its_environment_variable() {
        let mut command = Cli::command();
        command.build();
        for subcommand in command.get_subcommands() {
            for arg in subcommand.get_arguments() {
                let Some(long) = arg.get_long().filter(|l| !matches!(*l, "help" | "version"))
                else {
                    continue;
                };
                let want = format!("LIVEPIPE_{}", long.replace('-', "_").to_uppercase());
                let got = arg.get_env().map(|e| e.to_string_lossy().into_owned());
                assert_eq!(got.as_deref(), Some(want.as_str()), "--{long}");
            }
        }
    }

    #[test]
    fn file_values_apply_where_no_flag_is_given() {
        let file = config("workers = 3\nout = \"/data/out\"\nallowed_lateness_ms = 7\n");
        let path = file.path().to_str().unwrap();
        let run = run_args(&["--config", path, "--input", "a.jsonl"]).unwrap();
        assert_eq!(run.workers, Some(3));
        assert_eq!(run.out, std::path::PathBuf::from("/data/out"));
        assert_eq!(run.rules.allowed_lateness_ms, 7);
        let run = run_args(&["--config", path, "--workers", "1"]).unwrap();
        assert_eq!(run.workers, Some(1), "the flag wins");
    }

    #[test]
    fn values_from_the_file_are_named_with_it() {
        let file = config("topic = \"t\"\n");
        let path = file.path().to_str().unwrap();
        let parsed =
            parse_with_origins(["livepipe", "run", "--config", path, "--input", "a"]).unwrap();
        assert_eq!(parsed.origins, [format!("--topic from {path}")]);
    }

    #[test]
    fn arrays_and_switches_become_flags() {
        let file = config(
            "input = [\"a.jsonl\", \"b.jsonl\"]\nhttp-allowed-hosts = \"localhost,x.example\"\n",
        );
        let run = run_args(&["--config", file.path().to_str().unwrap()]).unwrap();
        assert_eq!(run.input.len(), 2);
        assert_eq!(run.http_allowed_hosts, ["localhost", "x.example"]);
        let file = config("brokers = \"h:9092\"\naccept-data-loss = true\n");
        let run = run_args(&["--config", file.path().to_str().unwrap()]).unwrap();
        assert!(run.accept_data_loss);
    }

    #[test]
    fn a_required_flag_may_come_from_the_file() {
        let file = config("output = \"events.jsonl\"\nevents = 10\n");
        let cli =
            parse_from(["livepipe", "gen", "--config", file.path().to_str().unwrap()]).unwrap();
        let Command::Gen(gen) = cli.command else {
            unreachable!("parsed `gen`")
        };
        assert_eq!(gen.output, Some("events.jsonl".into()));
        assert_eq!(gen.events, Some(10));
        assert!(matches!(
            parse_from(["livepipe", "gen"]),
            Err(ParseFailure::Clap(_))
        ));
    }

    #[test]
    fn bad_keys_and_values_name_the_file_and_the_key() {
        for (text, says) in [
            ("wrokers = 2\n", "unknown key `wrokers`"),
            ("X = \"a=b\"\n", "kafka-config"),
            ("workers = \"many\"\n", "`workers`"),
            ("workers = 0\n", "`workers`"),
            ("accept-data-loss = 1\n", "true or false"),
            ("out = [\"a\"]\n", "not an array"),
            ("workers = \n", "not valid TOML at line 1"),
            ("sasl.password=hunter2\n", "not valid TOML at line 1"),
            ("config = \"other.toml\"\n", "unknown key `config`"),
        ] {
            let file = config(text);
            let path = file.path().to_str().unwrap();
            let said = message(run_args(&["--config", path]).expect_err(text));
            assert!(said.contains(path), "{text}: {said}");
            assert!(said.contains(says), "{text}: {said}");
            assert!(!said.contains("hunter2"), "a value shown: {said}");
        }
    }
}
