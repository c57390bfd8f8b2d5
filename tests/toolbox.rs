//! The binary in a data engineer's toolbox: logs without escape codes when
//! redirected and as JSON lines on request, flag values from `LIVEPIPE_*`
//! variables and a `--config` file (a flag beats a variable beats the
//! file), and the HTTP bearer token of `--http-token-file`.

use serde_json::Value;
use testkit::http::{get, get_with};
use testkit::{demo_args, gen_file, refused, wait_for, Job, Livepipe};

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

/// A small generated input in `dir`.
fn input(dir: &Path) -> PathBuf {
    let path = dir.join("events.jsonl");
    gen_file(&path, &["--events", "3000", "--seed", "5"]);
    path
}

/// `livepipe run --input INPUT ARGS` with `RUST_LOG=info`, its stderr (not
/// a terminal) captured; fails the test unless it exits 0.
fn run(input: &Path, args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut job = Livepipe::new()
        .log("info")
        .arg("run")
        .arg("--input")
        .arg(input)
        .args(args);
    for (key, value) in envs {
        job = job.env(key, value);
    }
    job.success()
}

/// Every stderr line as a JSON object; fails the test on a line that is
/// not one, or lacks `level` or `message`.
fn json_lines(output: &Output) -> Vec<serde_json::Map<String, Value>> {
    let stderr = String::from_utf8_lossy(&output.stderr);
    stderr
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line)
                .unwrap_or_else(|err| panic!("not JSON ({err}): {line}\n{stderr}"));
            let object = value.as_object().cloned().expect("a JSON object");
            assert!(object["level"].is_string(), "no level: {line}");
            assert!(object["message"].is_string(), "no message: {line}");
            object
        })
        .collect()
}

/// The `workers` field of the run's "reading files" event.
fn workers(output: &Output) -> u64 {
    json_lines(output)
        .iter()
        .find(|line| line["message"] == "reading files")
        .and_then(|line| line["workers"].as_u64())
        .expect("a `reading files` event with `workers`")
}

#[test]
fn redirected_logs_have_no_escape_codes() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let out = dir.path().join("out");
    let output = run(&input, &["--out", out.to_str().unwrap()], &[]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("INFO"), "logs at info: {stderr}");
    assert!(
        !stderr.contains("\x1b["),
        "escape codes in a file: {stderr}"
    );
}

#[test]
fn json_logs_are_one_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let out = dir.path().join("out");
    let output = run(
        &input,
        &["--out", out.to_str().unwrap(), "--log-format", "json"],
        &[],
    );
    let lines = json_lines(&output);
    assert!(
        lines.iter().any(|line| line["message"] == "run finished"),
        "{lines:?}"
    );
    // A failing run says why as JSON too.
    let failed = Livepipe::new()
        .log("info")
        .args(["--log-format", "json", "run", "--input"])
        .arg(dir.path().join("missing.jsonl"))
        .arg("--out")
        .arg(dir.path().join("out-missing"))
        .output();
    assert_ne!(failed.status.code(), Some(0));
    let lines = json_lines(&failed);
    assert!(
        lines.iter().any(|line| line["level"] == "ERROR"),
        "{lines:?}"
    );
}

#[test]
fn an_environment_variable_sets_a_flag() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let out = dir.path().join("from-env");
    let output = run(
        &input,
        &[],
        &[
            ("LIVEPIPE_WORKERS", "3"),
            ("LIVEPIPE_OUT", out.to_str().unwrap()),
            ("LIVEPIPE_LOG_FORMAT", "json"),
        ],
    );
    assert_eq!(workers(&output), 3);
    assert!(
        out.join("ledger.sqlite").is_file(),
        "--out from LIVEPIPE_OUT"
    );
}

#[test]
fn a_flag_beats_its_variable_which_beats_the_config_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let config = dir.path().join("livepipe.toml");
    let file_out = dir.path().join("from-file");
    std::fs::write(
        &config,
        format!(
            "workers = 2\nout = {:?}\nlog_format = \"json\"\n",
            file_out.to_str().unwrap()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // The file alone.
    let output = run(&input, &["--config", config], &[]);
    assert_eq!(workers(&output), 2);
    assert!(
        file_out.join("ledger.sqlite").is_file(),
        "--out from the file"
    );

    // A variable beats the file.
    let env_out = dir.path().join("from-env");
    let env = [
        ("LIVEPIPE_WORKERS", "3"),
        ("LIVEPIPE_OUT", env_out.to_str().unwrap()),
    ];
    let output = run(&input, &["--config", config], &env);
    assert_eq!(workers(&output), 3);
    assert!(env_out.join("ledger.sqlite").is_file());

    // A flag beats both.
    let flag_out = dir.path().join("from-flag");
    let output = run(
        &input,
        &[
            "--config",
            config,
            "--workers",
            "1",
            "--out",
            flag_out.to_str().unwrap(),
        ],
        &env,
    );
    assert_eq!(workers(&output), 1);
    assert!(flag_out.join("ledger.sqlite").is_file());
}

#[test]
fn a_refused_flag_from_the_environment_is_named_with_its_variable() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    let out = dir.path().join("out");
    // Kafka-only flags are refused with files, from wherever they come.
    let output = Livepipe::new()
        .env("LIVEPIPE_TOPIC", "events")
        .args(["run", "--input", input.to_str().unwrap(), "--out"])
        .arg(&out)
        .output();
    let said = refused(&output);
    assert!(said.contains("`--topic`"), "{said}");
    assert!(said.contains("--topic from LIVEPIPE_TOPIC"), "{said}");
    assert!(!out.exists(), "refused before touching --out");
}

#[test]
fn a_bad_config_file_exits_2_naming_the_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let input = input(dir.path());
    for (text, key) in [
        ("wrokers = 2\n", "wrokers"),
        ("workers = \"two\"\n", "workers"),
    ] {
        let config = dir.path().join("bad.toml");
        std::fs::write(&config, text).unwrap();
        let out = dir.path().join("out");
        let output = Livepipe::new()
            .args(["run", "--input", input.to_str().unwrap(), "--config"])
            .arg(&config)
            .arg("--out")
            .arg(&out)
            .output();
        let said = refused(&output);
        assert!(said.contains(config.to_str().unwrap()), "{said}");
        assert!(said.contains(&format!("`{key}`")), "{said}");
        assert!(!out.exists(), "refused before touching --out");
    }
}

#[test]
fn the_http_token_guards_every_route_but_healthz() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    // The trailing newline is not part of the token.
    std::fs::write(&token_file, "s3cret-t0ken\n").unwrap();
    let out = dir.path().join("out");
    let mut args = demo_args(&out);
    args.extend(["--http-token-file", token_file.to_str().unwrap()]);
    let mut job = Job::start(&args, &dir.path().join("job.log"));
    let base = job.addr();

    wait_for(&mut job, Duration::from_secs(120), "/healthz 200", || {
        get(&base, "/healthz").status == 200
    });
    let bearer = [("Authorization", "Bearer s3cret-t0ken")];
    for path in ["/", "/api/live?limit=1", "/metrics"] {
        let refused = get(&base, path);
        assert_eq!(refused.status, 401, "{path} without the token");
        assert_eq!(refused.header("www-authenticate"), Some("Bearer"), "{path}");
        assert!(
            refused.content_type.starts_with("application/json"),
            "{path}"
        );
        let wrong = get_with(&base, path, &[("Authorization", "Bearer s3cret-t0keN")]);
        assert_eq!(wrong.status, 401, "{path} with a wrong token");
        assert_eq!(get_with(&base, path, &bearer).status, 200, "{path}");
    }
    // EventSource cannot set headers: the query parameter does instead.
    let query = get(&base, "/api/live?limit=1&access_token=s3cret-t0ken");
    assert_eq!(query.status, 200);
    let log = job.log();
    job.stop();
    assert!(!log.contains("s3cret-t0ken"), "the token was logged: {log}");
}

#[test]
fn an_empty_token_file_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "\n").unwrap();
    let out = dir.path().join("out");
    let mut args = demo_args(&out);
    args.extend(["--http-token-file", token_file.to_str().unwrap()]);
    let said = refused(&Livepipe::new().args(&args).output());
    assert!(said.contains("--http-token-file"), "{said}");
    assert!(said.contains("empty"), "{said}");
}

/// What can be checked of the container image without building it (no
/// Docker daemon in CI): its default command is a valid `livepipe` command
/// line serving HTTP on all interfaces, the binary it copies is the one
/// Cargo builds, its user is the one deploy/k8s runs as, and .dockerignore
/// keeps every file the build needs.
#[test]
fn the_dockerfile_runs_the_binary_with_flags_it_has() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("Dockerfile")).unwrap();
    let instruction = |name: &str| -> Vec<String> {
        let line = dockerfile
            .lines()
            .find_map(|line| line.strip_prefix(&format!("{name} ")))
            .unwrap_or_else(|| panic!("no {name} in the Dockerfile"));
        serde_json::from_str(line).unwrap_or_else(|err| panic!("{name} not exec form: {err}"))
    };
    let entrypoint = instruction("ENTRYPOINT");
    assert_eq!(entrypoint, ["livepipe"]);
    let command = instruction("CMD");
    let args = entrypoint.iter().chain(&command);
    let cli = livepipe::settings::parse_from(args).unwrap_or_else(|err| panic!("CMD: {err:?}"));
    let livepipe::cli::Command::Run(run) = cli.command else {
        panic!("CMD is not `run`")
    };
    assert_eq!(run.source(), Ok(livepipe::cli::Source::Demo));
    assert_eq!(run.http, Some("0.0.0.0:8080".parse().unwrap()));
    assert!(dockerfile.contains("EXPOSE 8080"));
    assert!(dockerfile.contains("--bin livepipe"));
    assert!(dockerfile.contains("target/release/livepipe /usr/local/bin/livepipe"));
    assert!(dockerfile.contains("--uid 10001"));
    let k8s = std::fs::read_to_string(root.join("deploy/k8s/livepipe.yaml")).unwrap();
    assert!(k8s.contains("runAsUser: 10001"));

    let ignored = std::fs::read_to_string(root.join(".dockerignore")).unwrap();
    let ignored: Vec<&str> = ignored
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .collect();
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let members = manifest
        .lines()
        .find_map(|line| line.strip_prefix("members = "))
        .expect("workspace members");
    let members: Vec<String> = serde_json::from_str(members).unwrap();
    let needed = ["Cargo.toml", "Cargo.lock", "src", "benches", "examples"];
    for path in members.iter().map(String::as_str).chain(needed) {
        assert!(root.join(path).exists(), "{path} is not in the repository");
        assert!(
            !ignored
                .iter()
                .any(|rule| rule.trim_end_matches('/') == path),
            "{path} is in .dockerignore"
        );
    }
}
