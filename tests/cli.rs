//! The `billsync` binary as an operator meets it: commands, output and documented exit codes
//! (0 delivered, 2 configuration, 3 locked, 4 undelivered, 5 sink stopped).

#[path = "common/world.rs"]
mod world;

use std::process::{Command, Output};

use billsync::simulators::lago::Behaviour;
use world::{World, LAGO_KEY, MS_KEY};

fn billsync(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_billsync"));
    // Summaries as text (a pipe would get one JSON line), logs as JSON (as in a CronJob).
    cmd.args(["--output", "text"])
        .args(args)
        .env_remove("BILLSYNC_CONFIG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("billsync runs")
}

/// A demo ledger in `dir` (the demo run, which must succeed) and settings naming it with one
/// JSONL sink, for the commands that read a ledger: the settings file's path.
fn demo_ledger_with_settings(dir: &std::path::Path) -> String {
    let d = dir.to_str().unwrap();
    let demo = billsync(&["demo", "--dir", d], &[]);
    assert_eq!(demo.status.code(), Some(0), "{:?}", text(&demo));
    let cfg = dir.join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger: {{ path: {d}/ledger.db }}\nsinks:\n  out:\n    kind: jsonl\n    directory: {d}/out\n"
        ),
    )
    .unwrap();
    cfg.to_str().unwrap().to_string()
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn demo_twice_on_one_ledger_sends_nothing_the_second_time() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let first = billsync(&["demo", "--dir", d], &[]);
    let (stdout, stderr) = text(&first);
    assert_eq!(first.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("sent 141"), "{stdout}");
    assert!(stdout.contains("held (unmapped) 1"), "{stdout}");
    // Totals per provider, customer and metric, for all four providers.
    for source in [
        "metalsoft_demo",
        "softlayer_demo",
        "sakura_demo",
        "jelastic_demo",
    ] {
        assert!(stdout.contains(source), "{source} missing: {stdout}");
    }
    assert!(stdout.contains("sub_acme_main"), "{stdout}");
    assert!(stdout.contains("sub_sakura_tenant"), "{stdout}");

    let second = billsync(&["demo", "--dir", d], &[]);
    let (stdout, _) = text(&second);
    assert_eq!(second.status.code(), Some(0));
    assert!(stdout.contains("sent 0 "), "{stdout}");
    assert!(
        stdout.contains("received 0 events in 0 requests"),
        "{stdout}"
    );
}

/// With `--output json` the demo's standard output is its summary as one JSON line (what `jq`
/// reads); its own sentences go to the log. They were printed beside the JSON, and `jq` failed.
#[test]
fn the_demo_s_json_output_is_only_json() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args(["--output", "json", "--log-format", "json", "demo", "--dir"])
        .arg(dir.path())
        .env_remove("BILLSYNC_CONFIG")
        .output()
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "{stdout}");
    let summary: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(summary["command"], "sync", "{summary}");
    assert!(
        stderr.contains("Lago simulator received 141 events"),
        "{stderr}"
    );
}

/// `status` shows how far every cursor with a time is behind, a SAKURA month cursor (`YYYY-MM`)
/// included (counted from the end of its month): a month held for missing lines shows as a lag
/// that keeps growing, as with a time cursor.
#[test]
fn status_shows_the_lag_of_a_sakura_month_cursor_as_of_a_time_cursor() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_ledger_with_settings(dir.path());
    let out = billsync(&["--config", &cfg, "status"], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    for source in ["metalsoft_demo user:1", "sakura_demo account:"] {
        let line = stdout
            .lines()
            .find(|l| l.trim_start().starts_with(source))
            .unwrap_or_else(|| panic!("no cursor of {source}: {stdout}"));
        assert!(line.contains(", lag "), "no lag on {line:?}: {stdout}");
    }
}

#[test]
fn a_mapping_typo_is_reported_with_file_line_and_column_and_exit_code_2() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("typo.yaml");
    std::fs::write(
        &file,
        "version: 1\nrules:\n  - name: instances\n    match: { resource_type: instance }\n    metirc: instance_hours\n    value: { quantity: { unit: hours } }\n",
    )
    .unwrap();
    let out = billsync(&["mappings", "validate", file.to_str().unwrap()], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("typo.yaml:5:5"), "{stderr}");
    assert!(stderr.contains("metirc"), "{stderr}");

    let ok = billsync(&["mappings", "validate", "mappings"], &[]);
    let (stdout, stderr) = text(&ok);
    assert_eq!(ok.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("mappings OK"), "{stdout}");
}

#[test]
fn configuration_errors_exit_with_code_2_and_name_the_problem() {
    let missing = billsync(&["--config", "/nonexistent/billsync.yaml", "sync"], &[]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(text(&missing).1.contains("/nonexistent/billsync.yaml"));

    let dir = tempfile::tempdir().unwrap();
    let cfg = world::write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        "mappings",
        "",
    );
    let out = billsync(
        &["--config", cfg.as_str(), "sync"],
        &[("TEST_LAGO_KEY", "x")],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("TEST_MS_KEY is not set"), "{stderr}");

    let no_reason = billsync(
        &["--config", cfg.as_str(), "replay", "--status", "unmapped"],
        &[],
    );
    assert_eq!(no_reason.status.code(), Some(2), "replay needs --reason");

    // An override with one underscore after the prefix would be ignored by the settings
    // reader (the file's ledger path used instead of the one meant): refused, naming the
    // spelling meant. A variable without `__` (a secret read through `env:`) is not one.
    let typo = billsync(
        &["--config", cfg.as_str(), "status"],
        &[
            ("BILLSYNC_LEDGER__PATH", "/data/ledger.db"),
            ("BILLSYNC_WEBHOOK_SECRET", "s"),
            ("BILLSYNC_LAGO__API_KEY", "k"),
        ],
    );
    let (_, stderr) = text(&typo);
    assert_eq!(typo.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("BILLSYNC_LEDGER__PATH") && stderr.contains("BILLSYNC__LEDGER__PATH"),
        "{stderr}"
    );
    // A secret variable whose name has a `__` but no settings section is not an override.
    let secret_named_so = billsync(
        &["--config", cfg.as_str(), "status"],
        &[("BILLSYNC_LAGO__API_KEY", "k")],
    );
    let (_, stderr) = text(&secret_named_so);
    assert!(
        !stderr.contains("looks like a settings override"),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn sync_status_and_replay_against_the_simulators_with_documented_exit_codes() {
    let world = World::start(Behaviour::Postgres).await;
    let dir = world.dir.path();
    let mappings = world::example_mappings_dir(dir);
    let cfg = world::write_config(
        dir,
        &world.metalsoft.url,
        &world.lago.url,
        mappings.to_str().unwrap(),
        "",
    );
    let cfg = cfg.as_str();
    let good = [("TEST_MS_KEY", MS_KEY), ("TEST_LAGO_KEY", LAGO_KEY)];
    let run = |args: Vec<&str>, env: Vec<(&str, &str)>| {
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        let env: Vec<(String, String)> = env
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let e: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            billsync(&a, &e)
        })
    };

    // A rotated Lago key: the sink stops, nothing is lost.
    let out = run(
        vec!["--config", cfg, "sync"],
        vec![
            ("TEST_MS_KEY", MS_KEY),
            ("TEST_LAGO_KEY", "k3y-NOT-VALID-9f8e"),
        ],
    )
    .await
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(5), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains("k3y-NOT-VALID-9f8e") && !stderr.contains("k3y-NOT-VALID-9f8e"),
        "the key is never printed"
    );

    // With the right key: delivered, one record held → exit 4.
    let out = run(vec!["--config", cfg, "sync"], good.to_vec())
        .await
        .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(4), "{stdout}\n{stderr}");
    assert!(stdout.contains("sent 71"), "{stdout}");
    assert!(
        !stderr.contains(MS_KEY) && !stderr.contains(LAGO_KEY),
        "no secret in the logs"
    );

    let out = run(vec!["--config", cfg, "status"], good.to_vec())
        .await
        .unwrap();
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    // Per status from the status index; per source on request (a pass over every record).
    assert!(stdout.contains("\n  unmapped: 1\n"), "{stdout}");
    assert!(stdout.contains("\n  sent: 71\n"), "{stdout}");
    assert!(!stdout.contains("metalsoft_test sent"), "{stdout}");
    let out = run(
        vec!["--config", cfg, "status", "--by-source"],
        good.to_vec(),
    )
    .await
    .unwrap();
    let (by_source, _) = text(&out);
    assert_eq!(out.status.code(), Some(0));
    assert!(by_source.contains("\n  sent: 71\n"), "{by_source}");
    assert!(
        by_source.contains("metalsoft_test unmapped: 1"),
        "{by_source}"
    );
    assert!(by_source.contains("metalsoft_test sent: 71"), "{by_source}");
    assert!(
        stdout.contains("reservation_installment"),
        "the held reason is shown: {stdout}"
    );

    // Fix the mapping, replay: everything delivered → exit 0.
    std::fs::write(
        mappings.join("reservations.yaml"),
        "version: 1\nrules:\n  - name: reservations\n    match: { resource_type: reservation_installment }\n    metric: reservation_cost\n    property: amount\n    value: { cost: {} }\n    round: { scale: 2, mode: half_up }\n",
    )
    .unwrap();
    let out = run(
        vec![
            "--config",
            cfg,
            "replay",
            "--status",
            "unmapped",
            "--reason",
            "reservation rule added",
        ],
        good.to_vec(),
    )
    .await
    .unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("sent 1 "), "{stdout}");
    assert_eq!(world.lago.events().len(), 72);
    assert!(world.lago.counts().values().all(|&n| n == 1));
}

/// `billsync bench` (the harness of BENCHMARKS.md) on a few thousand records: every stage runs
/// and the figures add up; `--days` pulls a longer period from fewer users (a backfill); a
/// no-op sync on the kept ledger pulls and sends nothing.
#[test]
fn the_bench_harness_runs_every_stage_and_a_backfill_takes_fewer_users() {
    let dir = tempfile::tempdir().unwrap();
    let week = dir.path().join("week");
    let backfill = dir.path().join("backfill");
    let number_after = |text: &str, label: &str| -> u64 {
        let at = text
            .find(label)
            .unwrap_or_else(|| panic!("no {label:?} in {text}"));
        text[at + label.len()..]
            .trim_start()
            .split(|c: char| !c.is_ascii_digit())
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no number after {label:?} in {text}"))
    };
    // `billsync bench --records 3000 …`, which must succeed: its standard output.
    let bench = |args: &[&str]| -> String {
        let out = billsync(&[&["bench", "--records", "3000"], args].concat(), &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}\n{stderr}");
        stdout
    };

    let stdout = bench(&["--ledger", week.to_str().unwrap()]);
    assert!(stdout.contains("× 7 daily windows"), "{stdout}");
    let week_users = number_after(&stdout, "billsync bench:");
    let pulled = number_after(&stdout, "records pulled");
    let sent = number_after(&stdout, ", sent");
    let ignored = number_after(&stdout, ", ignored");
    assert!((2000..=4500).contains(&pulled), "{stdout}");
    assert_eq!(number_after(&stdout, "staged new"), pulled, "{stdout}");
    // The shipped rules ignore reserved time and subnets and send the rest.
    assert_eq!(sent + ignored, pulled, "{stdout}");
    assert_eq!(number_after(&stdout, "lago:"), sent, "{stdout}");
    for stage in ["pull", "map", "stage", "push", "ack", "end to end"] {
        assert!(
            stdout.lines().any(|l| l.starts_with(stage)),
            "no {stage} line in {stdout}"
        );
    }
    assert!(stdout.contains("peak RSS (VmHWM)"), "{stdout}");
    assert!(stdout.contains("CPU time: billsync"), "{stdout}");

    // The backfill's figures as one JSON line, as a script collecting them reads them.
    let out = Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args([
            "--output",
            "json",
            "bench",
            "--records",
            "3000",
            "--days",
            "28",
        ])
        .args(["--stage-only", "--ledger", backfill.to_str().unwrap()])
        .env_remove("BILLSYNC_CONFIG")
        .output()
        .expect("billsync runs");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let report: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("not one JSON line ({e}): {stdout}"));
    assert_eq!(report["days"], 28, "{report}");
    let backfill_users = report["users"].as_u64().unwrap();
    assert!(
        backfill_users * 2 < week_users,
        "{backfill_users} users for 28 days, {week_users} for 7"
    );
    let run = &report["run"];
    let pulled = run["pulled"].as_u64().unwrap();
    assert!((2000..=4500).contains(&pulled), "{report}");
    assert_eq!(run["staged_new"], pulled, "{report}");
    assert_eq!(run["sent"], 0, "{report}");
    let stages: Vec<&str> = run["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(stages, ["pull", "map", "stage", "push", "ack"], "{report}");
    assert!(run["peak_rss_kb"].as_u64().unwrap() > 0, "{report}");

    let stdout = bench(&["--ledger", week.to_str().unwrap(), "--noop"]);
    assert!(
        stdout.contains("(pulled 0, sent 0, simulator requests 0)"),
        "{stdout}"
    );

    let out = billsync(&["bench", "--records", "3000", "--days", "0"], &[]);
    let (stdout, stderr) = text(&out);
    assert_ne!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stderr.contains("--days must be between 1 and 366"),
        "{stderr}"
    );
}

/// Bad command-line input exits 2 (README "Exit codes") with a message that says what is
/// wrong: `--config` naming a directory, an unknown `--provider`, a `--record` file that does
/// not exist.
#[test]
fn a_directory_as_config_an_unknown_provider_and_a_missing_record_file_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let out = billsync(&["--config", d, "sync"], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is a directory"), "{stderr}");
    assert!(!stderr.contains("not found"), "{stderr}");

    let cfg = world::write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        concat!(env!("CARGO_MANIFEST_DIR"), "/mappings"),
        "",
    );
    let keys = [("TEST_MS_KEY", "x"), ("TEST_LAGO_KEY", "y")];
    let out = billsync(
        &["--config", cfg.as_str(), "sync", "--provider", "nosuch"],
        &keys,
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("nosuch"), "{stderr}");

    let missing = dir.path().join("no-such-record.json");
    let out = billsync(
        &[
            "mappings",
            "explain",
            "--record",
            missing.to_str().unwrap(),
            "--mappings",
            concat!(env!("CARGO_MANIFEST_DIR"), "/mappings"),
        ],
        &[],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("no-such-record.json"), "{stderr}");
}

/// `billsync ledger set-cursor` moves one stored cursor back so the next sync reads that period
/// again (same content: nothing sent twice), keeps a line in the audit trail, and refuses a
/// stream that does not exist, a value of another form, and a forward move unless asked for.
#[tokio::test(flavor = "multi_thread")]
async fn set_cursor_rereads_a_period_and_refuses_typos_and_silent_skips() {
    let world = World::start(Behaviour::Postgres).await;
    let dir = world.dir.path();
    let mappings = world::example_mappings_dir(dir);
    let cfg = world::write_config(
        dir,
        &world.metalsoft.url,
        &world.lago.url,
        mappings.to_str().unwrap(),
        "",
    )
    .to_string();
    let good = [("TEST_MS_KEY", MS_KEY), ("TEST_LAGO_KEY", LAGO_KEY)];
    let run = |args: Vec<String>| {
        tokio::task::spawn_blocking(move || {
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            let out = billsync(&a, &good);
            let (stdout, stderr) = text(&out);
            (out.status.code(), stdout, stderr)
        })
    };
    let args = |extra: &[&str]| -> Vec<String> {
        ["--config", cfg.as_str()]
            .iter()
            .chain(extra)
            .map(|s| s.to_string())
            .collect()
    };
    let (code, stdout, stderr) = run(args(&["sync"])).await.unwrap();
    assert_eq!(code, Some(4), "{stdout}\n{stderr}");
    let sent = world.lago.events().len();
    let (_, status, _) = run(args(&["status"])).await.unwrap();
    let line = status
        .lines()
        .find(|l| l.contains("metalsoft_test user:1:"))
        .unwrap_or_else(|| panic!("a cursor for user 1: {status}"));
    let old = line.split(": ").nth(1).unwrap().split(' ').next().unwrap();
    let old_time = chrono::DateTime::parse_from_rfc3339(old).unwrap();

    let set = |value: String, more: &[&str]| {
        let mut a = args(&[
            "ledger",
            "set-cursor",
            "--source",
            "metalsoft_test",
            "--stream",
            "user:1",
            "--reason",
            "re-read after a provider fix",
            "--value",
        ]);
        a.push(value);
        a.extend(more.iter().map(|s| s.to_string()));
        run(a)
    };
    // Back a day: allowed, said, audited.
    let back =
        (old_time - chrono::Duration::days(1)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let (code, stdout, stderr) = set(back.clone(), &[]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{old} → {back}")), "{stdout}");
    let (_, status, _) = run(args(&["status"])).await.unwrap();
    assert!(
        status.contains(&format!("metalsoft_test user:1: {back}")),
        "{status}"
    );

    // The next sync asks MetalSoft for that day again and sends nothing twice.
    world.metalsoft.clear_calls();
    let (code, stdout, stderr) = run(args(&["sync"])).await.unwrap();
    assert_eq!(
        code,
        Some(4),
        "still the one held record: {stdout}\n{stderr}"
    );
    let windows_of = |user: u64| {
        world
            .metalsoft
            .calls()
            .iter()
            .filter(|c| c.params.get(0).and_then(|u| u.as_u64()) == Some(user))
            .count()
    };
    assert!(
        windows_of(1) > windows_of(2),
        "user 1 is read from a day further back than user 2: {} against {} windows",
        windows_of(1),
        windows_of(2)
    );
    assert_eq!(world.lago.events().len(), sent);
    assert!(world.lago.counts().values().all(|&n| n == 1));

    // Refused (exit 2, nothing changed): a stream that does not exist, another form, forward.
    let ahead =
        (old_time + chrono::Duration::days(30)).to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    for (value, stream, why) in [
        (back.clone(), "user:99", "no cursor"),
        ("2026-10".to_string(), "user:1", "not in the form"),
        (ahead.clone(), "user:1", "--allow-forward"),
        ("1800".to_string(), "window", "cannot be moved"),
    ] {
        let mut a = args(&[
            "ledger",
            "set-cursor",
            "--source",
            "metalsoft_test",
            "--reason",
            "typo",
            "--stream",
            stream,
            "--value",
        ]);
        a.push(value);
        let (code, stdout, stderr) = run(a).await.unwrap();
        assert_eq!(code, Some(2), "{why}: {stdout}\n{stderr}");
        assert!(stderr.contains(why), "{why}: {stderr}");
    }
    let (code, stdout, stderr) = set(ahead.clone(), &["--allow-forward"]).await.unwrap();
    assert_eq!(code, Some(0), "{stdout}\n{stderr}");
}

/// `mappings validate` is the offline check a mapping repository's CI job runs: it takes where
/// the mapping files are and which sinks exist from the settings without resolving the API keys
/// (such a job does not have them), and refuses a rule that names a sink the settings do not
/// configure (a sync would hold every record it maps).
#[test]
fn mappings_validate_needs_no_secrets_and_refuses_a_rule_naming_an_unconfigured_sink() {
    let dir = tempfile::tempdir().unwrap();
    let mappings = world::example_mappings_dir(dir.path());
    let cfg = world::write_config(
        dir.path(),
        "http://127.0.0.1:9",
        "http://127.0.0.1:9",
        mappings.to_str().unwrap(),
        "",
    );
    // Neither TEST_MS_KEY nor TEST_LAGO_KEY is set.
    let ok = billsync(&["--config", cfg.as_str(), "mappings", "validate"], &[]);
    let (stdout, stderr) = text(&ok);
    assert_eq!(ok.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(stdout.contains("mappings OK"), "{stdout}");

    std::fs::write(
        mappings.join("zz_stripe.yaml"),
        "version: 1\nrules:\n  - name: instances_to_stripe\n    match: { resource_type: instance }\n    metric: instance_hours\n    sink: strpie\n    value: { quantity: { unit: hours } }\n",
    )
    .unwrap();
    let typo = billsync(&["--config", cfg.as_str(), "mappings", "validate"], &[]);
    let (stdout, stderr) = text(&typo);
    assert_eq!(typo.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("zz_stripe.yaml:3:"), "{stderr}");
    assert!(
        stderr.contains("strpie") && stderr.contains("lago"),
        "names the sink and the configured ones: {stderr}"
    );
    // Without settings the sinks are unknown: the files themselves are fine.
    let alone = billsync(&["mappings", "validate", mappings.to_str().unwrap()], &[]);
    assert_eq!(alone.status.code(), Some(0), "{}", text(&alone).1);
}

/// `billsync status | head -1`, `billsync ledger export | head`: the reader of standard output
/// goes away after what it wanted (here before the first line). Every command then stops
/// printing and exits quietly, as Unix tools do: no panic ("failed printing to stdout: Broken
/// pipe", exit 101) and no error message; the command's own exit code (0 here).
#[test]
fn a_command_whose_stdout_reader_has_gone_exits_quietly() {
    use std::process::Stdio;
    let dir = tempfile::tempdir().unwrap();
    let cfg = demo_ledger_with_settings(dir.path());
    let cfg = cfg.as_str();
    for args in [
        &["status"][..],
        &["ledger", "export"][..],
        &["mappings", "schema"][..],
    ] {
        let mut child = Command::new(env!("CARGO_BIN_EXE_billsync"))
            .args(["--output", "text", "--config", cfg])
            .args(args)
            .env_remove("BILLSYNC_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The pipe's only reading end is closed before billsync writes anything.
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
            "{args:?}: {stderr}"
        );
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stderr}");
    }
}

/// A ledger that cannot be opened is named with SQLite's reason once: the reason was also the
/// error's source, and every layer of the printed chain repeated it (three times).
#[test]
fn a_ledger_that_is_not_a_database_is_named_with_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    std::fs::write(&ledger, vec![b'x'; 8192]).unwrap();
    let cfg = dir.path().join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger: {{ path: {} }}\nsinks:\n  out:\n    kind: jsonl\n    directory: {}/out\n",
            ledger.display(),
            dir.path().display()
        ),
    )
    .unwrap();
    let out = billsync(
        &[
            "--log-format",
            "text",
            "--config",
            cfg.to_str().unwrap(),
            "status",
        ],
        &[],
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("ledger {}: cannot open", ledger.display())),
        "{stderr}"
    );
    assert_eq!(
        stderr.matches("file is not a database").count(),
        1,
        "{stderr}"
    );
}

/// `billsync --help` and `billsync demo --help` say what the demo runs: simulators of all four
/// providers and of Lago. They used to say "MetalSoft and Lago" only, so a newcomer looking for
/// a SoftLayer, SAKURA Cloud or Jelastic trial skipped the demo that shows exactly that.
#[test]
fn the_demos_help_names_all_four_providers_and_lago() {
    for args in [&["--help"][..], &["demo", "--help"][..]] {
        let out = billsync(args, &[]);
        let (stdout, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {stdout}\n{stderr}");
        let demo = stdout
            .lines()
            .find(|l| l.contains("simulators"))
            .unwrap_or_else(|| panic!("{args:?}: {stdout}"));
        for name in ["MetalSoft", "SoftLayer", "SAKURA Cloud", "Jelastic", "Lago"] {
            assert!(demo.contains(name), "{args:?}: {name}: {demo}");
        }
    }
}

/// `demo --dir` pointed at the directory of a ledger a CronJob syncs would write the demo's
/// records into it (sent to a simulated Lago, one held, failing every later sync with exit 4)
/// and upgrade it with this binary. A ledger with cursors of other sources is refused (exit 2,
/// unchanged); the demo's own ledger is run again as before.
#[tokio::test]
async fn the_demo_refuses_a_ledger_that_is_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = billsync::ledger::Ledger::open(&path).await.unwrap();
    let run = ledger.start_run("sync", chrono::Utc::now()).await.unwrap();
    ledger
        .set_cursor(
            run,
            "metalsoft_prod",
            "user:1",
            "2026-11-01T00:00:00Z",
            chrono::Utc::now(),
        )
        .await
        .unwrap();
    ledger.close().await;
    let before = std::fs::read(&path).unwrap();
    let d = dir.path().to_str().unwrap();
    let out = billsync(&["--log-format", "text", "demo", "--dir", d], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stdout}\n{stderr}");
    assert!(stderr.contains("is not a demo ledger"), "{stderr}");
    assert!(stderr.contains("metalsoft_prod"), "{stderr}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        before,
        "the ledger was changed"
    );

    let own = tempfile::tempdir().unwrap();
    let d = own.path().to_str().unwrap();
    for _ in 0..2 {
        let out = billsync(&["demo", "--dir", d], &[]);
        assert_eq!(out.status.code(), Some(0), "{:?}", text(&out));
    }
}
