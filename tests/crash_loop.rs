//! The crash loop: the real `billsync` binary, SIGKILLed at random (seeded) moments, again and
//! again, until a run completes. Then the sink must hold every expected key exactly once, with
//! totals equal to the cent, and the ledger nothing pending.
//!
//! Ignored by default (it spawns the binary many times). CI runs the short form:
//!
//! ```sh
//! cargo test --locked --test crash_loop -- --ignored --nocapture
//! ```
//!
//! (≥ 20 kills per Lago behaviour on a few thousand records). The long form is
//! `BILLSYNC_CRASH_LONG=1` (≥ 200 kills per behaviour on ≥ 100,000 records; run it with
//! `--release`, ~10 minutes). When a round's sync completes before the kills have landed, another
//! round follows on a fresh ledger and fresh simulators; every round is checked on its own. A
//! failing round is reproduced with `BILLSYNC_CRASH_SEED=<seed printed by the round>`.

#[path = "common/world.rs"]
mod world;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use billsync::config::Secret;
use billsync::ledger::Ledger;
use billsync::mapping::{MapOutcome, MappingSet};
use billsync::providers::metalsoft::{MetalsoftConfig, MetalsoftProvider};
use billsync::providers::Provider;
use billsync::simulators::lago::{Behaviour, LagoSim, LagoSimConfig, LagoSimHandle};
use billsync::simulators::metalsoft::{MetalsoftDataset, MetalsoftSim};
use chrono::{DateTime, DurationRound, Utc};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rust_decimal::Decimal;
use world::{LAGO_KEY, MS_KEY};

/// Sizes of one form of the loop.
struct Form {
    name: &'static str,
    users: u64,
    resources_per_user: usize,
    hours: i64,
    /// Kills to land: a round goes on until a run completes, and rounds (each on a fresh
    /// ledger and simulators, checked on its own) follow until this many kills have landed.
    kills: usize,
    /// Range of the delay before a kill, in milliseconds.
    kill_delay_ms: (u64, u64),
    min_records: usize,
}

fn form() -> Form {
    if std::env::var("BILLSYNC_CRASH_LONG").is_ok_and(|v| v != "0" && !v.is_empty()) {
        Form {
            name: "long",
            users: 20,
            resources_per_user: 60,
            hours: 120,
            kills: 200,
            kill_delay_ms: (250, 1000),
            min_records: 100_000,
        }
    } else {
        Form {
            name: "short",
            users: 5,
            // 8 resources gave 1,433–1,900 records depending on the seed: 12 stay above 1,500.
            resources_per_user: 12,
            hours: 36,
            kills: 20,
            kill_delay_ms: (150, 700),
            min_records: 1_500,
        }
    }
}

fn seed() -> u64 {
    match std::env::var("BILLSYNC_CRASH_SEED") {
        Ok(s) => s
            .trim()
            .parse()
            .expect("BILLSYNC_CRASH_SEED must be an integer"),
        Err(_) => rand::random(),
    }
}

/// Customers for users 1..=users (three subscriptions, so totals are per customer) and the
/// example MetalSoft rules (instances, traffic, storage; subnets and reserved ignored).
fn write_mappings(dir: &Path, users: u64) -> std::path::PathBuf {
    let mappings = dir.join("mappings");
    std::fs::create_dir_all(&mappings).unwrap();
    let mut customers = String::from("version: 1\ncustomers:\n");
    for u in 1..=users {
        let c = u % 3;
        customers.push_str(&format!(
            "  - match: {{ provider: metalsoft, sub_account_id: \"{u}\" }}\n    external_subscription_id: sub_{c}\n    external_customer_id: cust_{c}\n"
        ));
    }
    std::fs::write(mappings.join("00-customers.yaml"), customers).unwrap();
    let rules = billsync::mapping::EXAMPLE_MAPPINGS
        .iter()
        .find(|(name, _)| name.ends_with("metalsoft.yaml"))
        .expect("the example MetalSoft rules")
        .1;
    std::fs::write(mappings.join("10-metalsoft.yaml"), rules).unwrap();
    mappings
}

fn mapping_set(dir: &Path) -> MappingSet {
    let mut sources = Vec::new();
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    names.sort();
    for p in names {
        sources.push((
            p.display().to_string(),
            std::fs::read_to_string(&p).unwrap(),
        ));
    }
    MappingSet::from_sources(&sources).unwrap()
}

fn write_settings(
    dir: &Path,
    metalsoft: &str,
    lago: &str,
    mappings: &Path,
    users: u64,
    start: DateTime<Utc>,
) -> String {
    let path = dir.join("billsync.yaml");
    let ids: Vec<String> = (1..=users).map(|u| u.to_string()).collect();
    std::fs::write(
        &path,
        format!(
            // lock_ttl 0s: a SIGKILLed run's lock is free at once. Only one process runs at a
            // time in this test, so the lock is not needed to keep runs apart.
            "ledger:\n  path: {ledger}\n  lock_ttl: 0s\nmappings:\n  - {mappings}\nproviders:\n  metalsoft_test:\n    kind: metalsoft\n    endpoint: {metalsoft}\n    api_key: env:TEST_MS_KEY\n    user_ids: [{ids}]\n    window: 1h\n    settle_delay: 2h\n    start: {start}\n    retry:\n      max_retries: 2\n      min_delay: 10ms\n      max_delay: 50ms\nsinks:\n  lago:\n    kind: lago\n    api_url: {lago}\n    api_key: env:TEST_LAGO_KEY\n    batch_size: {batch}\n    timeout: 10s\n    retry:\n      max_retries: 2\n      min_delay: 10ms\n      max_delay: 50ms\n",
            ledger = dir.join("ledger").join("ledger.db").display(),
            mappings = mappings.display(),
            ids = ids.join(", "),
            start = start.to_rfc3339(),
            batch = if users > 10 { 100 } else { 25 },
        ),
    )
    .unwrap();
    path.to_string_lossy().into_owned()
}

fn command(cfg: &str, args: &[&str]) -> Command {
    command_with_output(cfg, "json", args)
}

fn command_with_output(cfg: &str, output: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_billsync"));
    cmd.args(["--config", cfg, "--output", output, "--log-format", "json"])
        .args(args)
        .env("TEST_MS_KEY", MS_KEY)
        .env("TEST_LAGO_KEY", LAGO_KEY)
        .env("BILLSYNC_LOG", "billsync=warn")
        .env_remove("BILLSYNC_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn property_of(code: &str) -> &'static str {
    world::World::value_property(code)
}

/// What Lago holds: (count per key, total per (subscription, metric)).
type Held = (BTreeMap<String, usize>, BTreeMap<(String, String), Decimal>);

fn lago_holds(lago: &LagoSimHandle) -> Held {
    let mut totals = BTreeMap::new();
    for e in lago.events() {
        let value: Decimal = e
            .properties
            .get(property_of(&e.code))
            .and_then(|v| v.as_str())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("event {} has no value property", e.transaction_id));
        *totals
            .entry((e.external_subscription_id.clone(), e.code.clone()))
            .or_insert(Decimal::ZERO) += value;
    }
    (lago.counts(), totals)
}

/// Rounds of [`crash_loop`] until the form's kills have landed. A fast (release) binary can
/// finish a round's sync after a few dozen kills; another round on a fresh ledger and fresh
/// simulators then goes on, each round checked to the cent on its own.
async fn crash_rounds(behaviour: Behaviour) -> Figures {
    let form = form();
    let mut total = Figures {
        kills: 0,
        kills_in_pull: 0,
        runs: 0,
        records: usize::MAX,
        expected_keys: 0,
        duration: Duration::ZERO,
    };
    let mut rounds = 0;
    while total.kills < form.kills {
        rounds += 1;
        assert!(rounds <= 20, "20 rounds landed only {} kills", total.kills);
        let f = crash_loop(behaviour).await;
        total.kills += f.kills;
        total.kills_in_pull += f.kills_in_pull;
        total.runs += f.runs;
        total.records = total.records.min(f.records);
        total.expected_keys += f.expected_keys;
        total.duration += f.duration;
    }
    println!(
        "crash loop {behaviour:?} ({} form): {rounds} round(s), {} kills ({} while pulling/staging, {} while pushing) over {} runs, at least {} records per round, {} keys delivered in all, 0 lost, 0 billed twice, {:.1} s",
        form.name,
        total.kills,
        total.kills_in_pull,
        total.kills - total.kills_in_pull,
        total.runs,
        total.records,
        total.expected_keys,
        total.duration.as_secs_f64()
    );
    total
}

struct Figures {
    kills: usize,
    kills_in_pull: usize,
    runs: usize,
    records: usize,
    expected_keys: usize,
    duration: Duration,
}

async fn crash_loop(behaviour: Behaviour) -> Figures {
    let form = form();
    let seed = seed();
    println!(
        "crash loop {behaviour:?} ({} form): seed {seed} (BILLSYNC_CRASH_SEED={seed} reproduces it)",
        form.name
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    // The dataset ends three hours before now (so every window has settled), on the hour.
    let end = Utc::now()
        .duration_trunc(chrono::Duration::hours(1))
        .unwrap()
        - chrono::Duration::hours(3);
    let start = end - chrono::Duration::hours(form.hours);
    let dataset = MetalsoftDataset::generated(
        form.users,
        form.resources_per_user,
        seed ^ 0x5eed,
        start,
        end,
    );
    let metalsoft = MetalsoftSim::start(dataset, MS_KEY).await.unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: LAGO_KEY.into(),
        behaviour,
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mappings_dir = write_mappings(dir.path(), form.users);
    let mappings = mapping_set(&mappings_dir);
    let cfg = write_settings(
        dir.path(),
        &metalsoft.url,
        &lago.url,
        &mappings_dir,
        form.users,
        start,
    );

    // What must reach Lago, computed without billsync's pipeline: plan + fetch + map.
    let mut pcfg = MetalsoftConfig::new(
        metalsoft.url.clone(),
        Secret::new(MS_KEY),
        (1..=form.users).collect(),
        start,
    );
    pcfg.window = chrono::Duration::hours(1);
    pcfg.settle_delay = chrono::Duration::hours(2);
    let provider = MetalsoftProvider::new("metalsoft_test".into(), pcfg).unwrap();
    let now = Utc::now();
    let mut expected_keys: BTreeMap<String, Decimal> = BTreeMap::new();
    let mut expected_totals: BTreeMap<(String, String), Decimal> = BTreeMap::new();
    let mut records = 0usize;
    for chunk in provider.plan(&Default::default(), now).await.unwrap() {
        for record in provider.fetch(&chunk, now).await.unwrap().records {
            records += 1;
            if let MapOutcome::Mapped(ev) = mappings.apply(&record) {
                assert!(record.is_final, "{record:?}");
                *expected_totals
                    .entry((
                        ev.external_subscription_id.to_string(),
                        ev.metric_code.to_string(),
                    ))
                    .or_insert(Decimal::ZERO) += ev.value;
                assert!(
                    expected_keys
                        .insert(record.idempotency_key(), ev.value)
                        .is_none(),
                    "two records with one key"
                );
            }
        }
    }
    println!(
        "  {records} records pulled, {} to deliver, {} (subscription, metric) totals",
        expected_keys.len(),
        expected_totals.len()
    );
    assert!(
        records >= form.min_records,
        "the dataset is too small: {records} records"
    );

    let mut kills = 0usize;
    let mut kills_in_pull = 0usize;
    let mut runs = 0usize;
    loop {
        runs += 1;
        assert!(runs < form.kills * 20 + 100, "the loop does not converge");
        // Vary where the kills land: sometimes slow pushes (before or after Lago stores the
        // batch), sometimes slow pulls (kills during staging).
        let push_before = Duration::from_millis(rng.random_range(0..=15));
        let push_after = Duration::from_millis(rng.random_range(0..=15));
        let pull = Duration::from_millis(rng.random_range(0..=2));
        lago.set_delay(push_before);
        lago.set_answer_delay(push_after);
        metalsoft.set_delay(pull);
        let want_kill = kills < form.kills;
        let delay =
            Duration::from_millis(rng.random_range(form.kill_delay_ms.0..=form.kill_delay_ms.1));
        let stored_before = lago.events().len();
        let pulls_before = metalsoft.request_count();
        let mut child = command(&cfg, &["sync"]).spawn().unwrap();
        let pid = child.id();
        let t0 = Instant::now();
        if want_kill {
            loop {
                if child.try_wait().unwrap().is_some() || t0.elapsed() >= delay {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
        if want_kill && child.try_wait().unwrap().is_none() {
            let status = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status()
                .unwrap();
            assert!(status.success());
            let _ = tokio::task::spawn_blocking(move || child.wait_with_output())
                .await
                .unwrap();
            kills += 1;
            // Pushing starts when the pull is over; no new batch stored means the run was
            // (most likely) still pulling and staging.
            let in_pull = lago.events().len() == stored_before;
            if in_pull {
                kills_in_pull += 1;
            }
            println!(
                "  kill {kills}: run {runs}, after {} ms ({}; {} pulls, lago holds {})",
                t0.elapsed().as_millis(),
                if in_pull {
                    "pulling/staging"
                } else {
                    "pushing"
                },
                metalsoft.request_count() - pulls_before,
                lago.events().len()
            );
            continue;
        }
        let out = tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
            .await
            .unwrap();
        let code = out.status.code();
        println!(
            "  run {runs} exited {code:?} after {} ms",
            t0.elapsed().as_millis()
        );
        match code {
            Some(0) => break,
            // Retries exhausted on a slow answer, or the previous kill's lock: run again.
            Some(1) | Some(3) | Some(4) => continue,
            _ => panic!(
                "unexpected exit {code:?}:\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        }
    }

    // The sink holds exactly the expected keys, each once, with the expected totals.
    let (counts, totals) = lago_holds(&lago);
    let missing: Vec<_> = expected_keys
        .keys()
        .filter(|k| !counts.contains_key(*k))
        .take(5)
        .collect();
    let extra: Vec<_> = counts
        .keys()
        .filter(|k| !expected_keys.contains_key(*k))
        .take(5)
        .collect();
    let twice: Vec<_> = counts.iter().filter(|(_, &n)| n != 1).take(5).collect();
    assert!(missing.is_empty(), "lost (seed {seed}): {missing:?}");
    assert!(extra.is_empty(), "unexpected keys (seed {seed}): {extra:?}");
    assert!(twice.is_empty(), "billed twice (seed {seed}): {twice:?}");
    assert_eq!(counts.len(), expected_keys.len());
    assert_eq!(totals, expected_totals, "totals differ (seed {seed})");
    // Each event's value is the expected one for its key (not only the sums).
    for e in lago.events() {
        let v: Decimal = e.properties[property_of(&e.code)]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(v, expected_keys[&e.transaction_id], "{}", e.transaction_id);
    }

    // `billsync status`: nothing pending, nothing undelivered.
    let status = tokio::task::spawn_blocking({
        let cfg = cfg.clone();
        move || {
            command_with_output(&cfg, "text", &["status"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    let text = String::from_utf8_lossy(&status.stdout).into_owned();
    assert_eq!(status.status.code(), Some(0), "{text}");
    assert!(!text.contains(" pending:"), "{text}");
    assert!(!text.contains("oldest undelivered"), "{text}");
    assert!(
        text.contains(&format!("\n  sent: {}\n", expected_keys.len())),
        "{text}"
    );
    let ledger = Ledger::open(&dir.path().join("ledger").join("ledger.db"))
        .await
        .unwrap();
    assert_eq!(ledger.undelivered().await.unwrap(), 0);
    ledger.close().await;

    let figures = Figures {
        kills,
        kills_in_pull,
        runs,
        records,
        expected_keys: expected_keys.len(),
        duration: started.elapsed(),
    };
    println!(
        "crash loop {behaviour:?} ({} form) seed {seed}: {} kills ({} while pulling/staging, {} while pushing) over {} runs, {} records, {} keys delivered, 0 lost, 0 billed twice, {} totals equal, {:.1} s",
        form.name,
        figures.kills,
        figures.kills_in_pull,
        figures.kills - figures.kills_in_pull,
        figures.runs,
        figures.records,
        figures.expected_keys,
        expected_totals.len(),
        figures.duration.as_secs_f64()
    );
    figures
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawns the binary many times; CI runs it in its own step"]
async fn crash_loop_postgres_store() {
    let f = crash_rounds(Behaviour::Postgres).await;
    assert!(f.kills >= form().kills, "too few kills landed: {}", f.kills);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "spawns the binary many times; CI runs it in its own step"]
async fn crash_loop_clickhouse_store() {
    let f = crash_rounds(Behaviour::ClickHouse).await;
    assert!(f.kills >= form().kills, "too few kills landed: {}", f.kills);
}
