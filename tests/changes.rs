//! Changes of sent records that wait for a person. A record already billed comes back with new
//! content that cannot go out as a correction (here: renamed, it now belongs to another
//! customer's subscription). `billsync ledger changes` lists it with what was sent and why;
//! `billsync ledger resolve --keep-sent` resolves it without any sink traffic (what was billed
//! stays billed), and the month it was billed in, priced per month, then settles on what was
//! sent. Reading the same content again raises nothing.

#[path = "common/serving.rs"]
mod serving;
use serving::Serving;

use std::process::{Command, Output, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::Ledger;
use billsync::mapping::MappingSet;
use billsync::record::UsageRecord;
use billsync::simulators::lago::{LagoSim, LagoSimConfig, LagoSimHandle, StoredEvent};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::{Pipeline, RunSummary, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

fn dec(s: &str) -> Decimal {
    Decimal::from_str(s).unwrap()
}

fn at(y: i32, m: u32, d: u32, h: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, h, 0, 0).unwrap()
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

/// One final MetalSoft line of October 2026 for instance 2416, 10.00 GBP, named `name`.
fn october_line(name: &str) -> UsageRecord {
    let start = at(2026, 10, 5, 0);
    UsageRecord {
        provider: "metalsoft".into(),
        source: "metalsoft".into(),
        billing_account_id: "ms".into(),
        sub_account_id: "1".into(),
        resource_id: "2416".into(),
        resource_name: Some(name.into()),
        resource_type: "instance".into(),
        service_name: "Instances".into(),
        sku_id: Some("M.8.8".into()),
        charge_description: Some("instance-2416".into()),
        charge_period_start: start,
        charge_period_end: start + chrono::Duration::hours(1),
        consumed_quantity: Decimal::from(3600),
        consumed_unit: "seconds".into(),
        billed_cost: dec("10.00"),
        billing_currency: "GBP".into(),
        scope: "1".into(),
        natural_key: vec![("instance".into(), "2416".into())],
        is_final: true,
        attributes: Default::default(),
        raw: Default::default(),
    }
}

/// The October line of `acme-web` re-described as a GPU line costing `cost`.
fn gpu_line(cost: &str) -> UsageRecord {
    let mut line = october_line("acme-web");
    line.billed_cost = dec(cost);
    line.charge_description = Some("gpu-2416".into());
    line
}

/// Instances named `acme-*` are billed to ACME, `globex-*` to Globex, each at least 50.00 a
/// month; the line's cost goes out as it is.
fn by_name() -> MappingSet {
    MappingSet::from_sources(&[(
        "customers.yaml".to_string(),
        "version: 1
customers:
  - match: { provider: metalsoft, resource_name: { glob: \"acme-*\" } }
    external_subscription_id: sub_acme
    pricing: { minimum: \"50\", period: month }
  - match: { provider: metalsoft, resource_name: { glob: \"globex-*\" } }
    external_subscription_id: sub_globex
    pricing: { minimum: \"50\", period: month }
rules:
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
"
        .to_string(),
    )])
    .unwrap()
}

struct World {
    lago: LagoSimHandle,
    dir: tempfile::TempDir,
    served: Arc<Mutex<Vec<UsageRecord>>>,
    mappings: MappingSet,
}

impl World {
    async fn start() -> World {
        World::start_with(by_name()).await
    }

    async fn start_with(mappings: MappingSet) -> World {
        World {
            lago: LagoSim::start(LagoSimConfig {
                api_key: "lago-key".into(),
                ..Default::default()
            })
            .await
            .unwrap(),
            dir: tempfile::tempdir().unwrap(),
            served: Arc::new(Mutex::new(Vec::new())),
            mappings,
        }
    }

    fn ledger_path(&self) -> std::path::PathBuf {
        self.dir.path().join("ledger.db")
    }

    fn serve(&self, lines: Vec<UsageRecord>) {
        *self.served.lock().unwrap() = lines;
    }

    async fn sync(&self, now: DateTime<Utc>) -> RunSummary {
        let p = self.pipeline().await;
        let summary = p
            .sync(&SyncOptions {
                now: Some(now),
                ..Default::default()
            })
            .await
            .unwrap();
        p.ledger.close().await;
        assert_eq!(summary.sink_errors, Vec::<String>::new());
        summary
    }

    /// `billsync replay --status rejected` at `now`.
    async fn replay_rejected(&self, now: DateTime<Utc>) -> RunSummary {
        let p = self.pipeline().await;
        let summary = p
            .replay(&billsync::sync::ReplayOptions {
                filter: billsync::ledger::RecordFilter::status(billsync::ledger::Status::Rejected),
                dry_run: false,
                reason: "fixed in Lago".into(),
                now: Some(now),
            })
            .await
            .unwrap();
        p.ledger.close().await;
        summary
    }

    async fn pipeline(&self) -> Pipeline {
        let mut p = Pipeline::new(
            Ledger::open(&self.ledger_path()).await.unwrap(),
            vec![Box::new(Serving(self.served.clone()))],
            vec![Box::new(
                LagoSink::new(
                    "lago".into(),
                    LagoConfig {
                        api_url: self.lago.url.clone(),
                        api_key: Secret::new("lago-key"),
                        batch_size: 10,
                        timeout: Duration::from_secs(5),
                        retry: retry(),
                    },
                )
                .unwrap(),
            )],
            self.mappings.clone(),
        );
        p.period_close_delay = chrono::Duration::days(1);
        p
    }

    /// The metrics a sync at `now` would push: the revenue that waits for a person shows
    /// where alerts can see it.
    async fn metrics(&self, summary: &RunSummary, now: DateTime<Utc>) -> String {
        let ledger = Ledger::open(&self.ledger_path()).await.unwrap();
        let gauges = ledger.gauges().await.unwrap();
        let periods = ledger.period_status().await.unwrap();
        ledger.close().await;
        billsync::observe::render_metrics(summary, &gauges, Some(&periods), now, &["lago".into()])
    }

    /// A settings file for the binary: the ledger of this world (the provider and sink are
    /// not reached by `status` and `ledger` commands).
    fn config(&self) -> String {
        let path = self.dir.path().join("billsync.yaml");
        std::fs::write(
            &path,
            format!(
                "ledger:\n  path: {ledger}\nmappings: []\nproviders:\n  metalsoft:\n    kind: metalsoft\n    endpoint: http://127.0.0.1:9\n    api_key: env:TEST_MS_KEY\n    user_ids: [1]\n    start: 2026-10-01T00:00:00Z\nsinks:\n  lago:\n    kind: lago\n    api_url: {lago}\n    api_key: env:TEST_LAGO_KEY\n",
                ledger = self.ledger_path().display(),
                lago = self.lago.url,
            ),
        )
        .unwrap();
        path.to_string_lossy().into_owned()
    }

    fn run(&self, output: &str, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_billsync"))
            .args(["--config", &self.config(), "--output", output])
            .args(args)
            .env("TEST_MS_KEY", "ms-key")
            .env("TEST_LAGO_KEY", "lago-key")
            .env_remove("BILLSYNC_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .output()
            .unwrap()
    }

    /// `billsync ledger changes --output json`: one object a line.
    fn open_changes(&self) -> Vec<serde_json::Value> {
        let out = self.run("json", &["ledger", "changes"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
            .collect()
    }

    fn status(&self) -> String {
        let out = self.run("text", &["status"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        text(&out)
    }

    fn adjustments(&self) -> Vec<StoredEvent> {
        self.lago
            .events()
            .into_iter()
            .filter(|e| e.transaction_id.starts_with("period."))
            .collect()
    }

    /// How many changes of sent records the ledger keeps, in any state.
    async fn changes_kept(&self) -> i64 {
        let pool = sqlx::SqlitePool::connect_with(
            sqlx::sqlite::SqliteConnectOptions::new().filename(self.ledger_path()),
        )
        .await
        .unwrap();
        let n = sqlx::query_scalar("SELECT COUNT(*) FROM record_changes")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        n
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn amount(e: &StoredEvent) -> Decimal {
    dec(e.properties["amount"].as_str().expect("amount is a string"))
}

/// A line billed to ACME (10.00, October), renamed to a Globex instance after it was sent. It
/// cannot be corrected (another subscription): it waits for a person, listed by `ledger
/// changes` with what was sent and why, and shown by `status`. ACME's October, priced at a
/// monthly minimum of 50.00, waits for it. Kept as sent, the change is no longer listed, the
/// month settles on what was sent (an adjustment of exactly 40.00 to ACME, nothing to
/// Globex), and re-reading the renamed line raises nothing again.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_kept_as_sent_is_no_longer_listed_and_its_month_settles_on_what_was_sent() {
    let w = World::start().await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!((first.new, first.sent), (1, 1), "{first:?}");
    let key = october_line("acme-web").idempotency_key();

    // Renamed: it would belong to Globex now. Nothing goes out.
    w.serve(vec![october_line("globex-web")]);
    let renamed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(
        (
            renamed.changed_after_send,
            renamed.corrections,
            renamed.sent
        ),
        (1, 0, 0),
        "{renamed:?}"
    );
    // October has closed: ACME's month waits for the change.
    let waiting = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(w.adjustments().len(), 0, "{:?}", w.lago.events());
    // Alerts see both: one change waits for a person, and the oldest month due for settlement
    // ended 9 days ago (its close delay is one day).
    let metrics = w.metrics(&waiting, at(2026, 11, 10, 0)).await;
    for line in [
        "billsync_changes_unresolved 1\n",
        "billsync_period_settlement_lag_seconds 777600\n",
        "billsync_period_months{state=\"unsettleable\"} 0\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }

    let open = w.open_changes();
    assert_eq!(open.len(), 1, "{open:?}");
    let c = &open[0];
    assert_eq!(c["key"], key.as_str(), "{c}");
    assert_eq!(c["source"], "metalsoft", "{c}");
    assert_eq!(c["status"], "sent", "{c}");
    assert_eq!(c["sent_sink"], "lago", "{c}");
    assert_eq!(c["sent_subscription"], "sub_acme", "{c}");
    assert_eq!(c["sent_metric"], "resale_cost", "{c}");
    assert_eq!(dec(c["sent_value"].as_str().unwrap()), dec("10.00"), "{c}");
    assert_eq!(dec(c["sent_total"].as_str().unwrap()), dec("10.00"), "{c}");
    let reason = c["reason"].as_str().unwrap();
    assert!(
        reason.contains(
            "now maps to lago:sub_globex/resale_cost instead of lago:sub_acme/resale_cost"
        ),
        "{reason}"
    );
    assert!(c["seen_at"].as_str().is_some(), "{c}");
    let change = c["change"].as_i64().unwrap();

    // A person reads it in the table and in `status`.
    let table = w.run("text", &["ledger", "changes"]);
    assert_eq!(table.status.code(), Some(0), "{}", text(&table));
    let table = text(&table);
    assert!(
        table.contains(&key) && table.contains("sub_acme"),
        "{table}"
    );
    assert!(table.contains("sub_globex"), "{table}");
    let status = w.status();
    assert!(
        status.contains("changes of sent records to resolve by hand: 1"),
        "{status}"
    );
    assert!(
        status.contains(&format!("change {change} of {key}"))
            && status.contains("billsync ledger changes"),
        "{status}"
    );

    // Resolved: what was billed stays billed.
    let events_before = w.lago.events().len();
    let resolved = w.run(
        "text",
        &[
            "ledger",
            "resolve",
            "--change",
            &change.to_string(),
            "--keep-sent",
            "--reason",
            "renamed on purpose; October stays with ACME",
        ],
    );
    assert_eq!(resolved.status.code(), Some(0), "{}", text(&resolved));
    assert_eq!(w.lago.events().len(), events_before, "no sink traffic");
    assert_eq!(w.open_changes().len(), 0);
    assert!(
        w.status()
            .contains("changes of sent records to resolve by hand: 0"),
        "{}",
        w.status()
    );

    // The next sync settles ACME's October on what was sent: 50.00 − 10.00.
    let settled = w.sync(at(2026, 11, 10, 1)).await;
    assert_eq!(
        (
            settled.changed_after_send,
            settled.new,
            settled.period_adjustments
        ),
        (0, 0, 1),
        "{settled:?}"
    );
    let metrics = w.metrics(&settled, at(2026, 11, 10, 1)).await;
    for line in [
        "billsync_changes_unresolved 0\n",
        "billsync_period_settlement_lag_seconds 0\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let adjustments = w.adjustments();
    assert_eq!(adjustments.len(), 1, "{adjustments:?}");
    assert_eq!(adjustments[0].external_subscription_id, "sub_acme");
    assert_eq!(amount(&adjustments[0]), dec("40.00"));
    let acme: Decimal = w
        .lago
        .events()
        .iter()
        .filter(|e| e.external_subscription_id == "sub_acme")
        .map(amount)
        .sum();
    assert_eq!(acme, dec("50.00"), "ACME's October holds its minimum");
    assert!(
        w.lago
            .events()
            .iter()
            .all(|e| e.external_subscription_id != "sub_globex"),
        "{:?}",
        w.lago.events()
    );

    // Re-reading the renamed line again raises nothing and sends nothing.
    let kept = w.changes_kept().await;
    let again = w.sync(at(2026, 11, 11, 0)).await;
    assert_eq!(
        (
            again.changed_after_send,
            again.corrections,
            again.sent,
            again.period_adjustments
        ),
        (0, 0, 0, 0),
        "{again:?}"
    );
    assert_eq!(w.changes_kept().await, kept);
    assert_eq!(w.open_changes().len(), 0);
    assert_eq!(w.adjustments().len(), 1);
}

/// The resolution is kept in the ledger's audit trail with its reason, and only a change that
/// waits can be resolved: an unknown id, one resolved already, or no resolution named is
/// refused as a usage error (exit 2), changing nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_resolution_is_audited_with_its_reason_and_only_an_open_change_is_resolved() {
    let w = World::start().await;
    w.serve(vec![october_line("acme-web")]);
    w.sync(at(2026, 10, 20, 0)).await;
    w.serve(vec![october_line("globex-web")]);
    w.sync(at(2026, 10, 21, 0)).await;
    let change = w.open_changes()[0]["change"].as_i64().unwrap().to_string();

    let no_resolution = w.run(
        "text",
        &["ledger", "resolve", "--change", &change, "--reason", "x"],
    );
    assert_eq!(
        no_resolution.status.code(),
        Some(2),
        "{}",
        text(&no_resolution)
    );
    assert!(text(&no_resolution).contains("--keep-sent"));
    let unknown = w.run(
        "text",
        &[
            "ledger",
            "resolve",
            "--change",
            "999",
            "--keep-sent",
            "--reason",
            "x",
        ],
    );
    assert_eq!(unknown.status.code(), Some(2), "{}", text(&unknown));
    assert_eq!(w.open_changes().len(), 1, "nothing resolved");

    let args = [
        "ledger",
        "resolve",
        "--change",
        &change,
        "--keep-sent",
        "--reason",
        "ticket BILL-42",
    ];
    let ok = w.run("text", &args);
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    let twice = w.run("text", &args);
    assert_eq!(twice.status.code(), Some(2), "{}", text(&twice));
    assert!(text(&twice).contains("kept"), "{}", text(&twice));

    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new().filename(w.ledger_path()),
    )
    .await
    .unwrap();
    let audit: Vec<(String, String)> =
        sqlx::query_as("SELECT action, detail FROM audit WHERE action = 'resolve'")
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(audit.len(), 1, "{audit:?}");
    let detail: serde_json::Value = serde_json::from_str(&audit[0].1).unwrap();
    assert_eq!(detail["reason"], "ticket BILL-42");
    assert_eq!(detail["resolution"], "keep-sent");
    assert_eq!(detail["changes"][0].as_i64(), change.parse().ok());
    let (state, resolution): (String, Option<String>) =
        sqlx::query_as("SELECT state, resolution FROM record_changes WHERE id = ?1")
            .bind(change.parse::<i64>().unwrap())
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(
        (state.as_str(), resolution.as_deref()),
        ("kept", Some("ticket BILL-42"))
    );
    pool.close().await;
}

/// Two changes of one record wait (renamed, then restated at 12.00 while renamed). Resolving
/// the newer alone leaves the older open: still listed, and the month still waits (a person
/// has not looked at everything that happened to the record). `--all-of-record` resolves the
/// rest, and the month settles on what was sent (10.00, not the restated 12.00).
#[tokio::test(flavor = "multi_thread")]
async fn a_month_waits_until_every_change_of_its_record_is_resolved() {
    let w = World::start().await;
    w.serve(vec![october_line("acme-web")]);
    w.sync(at(2026, 10, 20, 0)).await;
    w.serve(vec![october_line("globex-web")]);
    w.sync(at(2026, 10, 21, 0)).await;
    let mut restated = october_line("globex-web");
    restated.billed_cost = dec("12.00");
    w.serve(vec![restated]);
    let second = w.sync(at(2026, 10, 22, 0)).await;
    assert_eq!(second.changed_after_send, 1, "{second:?}");
    let open = w.open_changes();
    assert_eq!(open.len(), 2, "{open:?}");
    assert_eq!(
        dec(open[1]["new_billed_cost"].as_str().unwrap()),
        dec("12.00")
    );
    let (older, newer) = (
        open[0]["change"].as_i64().unwrap().to_string(),
        open[1]["change"].as_i64().unwrap().to_string(),
    );

    let resolve = |change: &str, all: bool| {
        let mut args = vec![
            "ledger",
            "resolve",
            "--change",
            change,
            "--keep-sent",
            "--reason",
            "stays with ACME",
        ];
        if all {
            args.push("--all-of-record");
        }
        let out = w.run("text", &args);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        text(&out)
    };
    let partly = resolve(&newer, false);
    assert!(partly.contains("1 other change(s)"), "{partly}");
    let open = w.open_changes();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0]["change"].as_i64().unwrap().to_string(), older);
    let waiting = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(waiting.period_adjustments, 0, "{waiting:?}");
    assert_eq!(w.adjustments().len(), 0);
    // Money waits for a person: not a successful run (exit 4 for the CronJob), though every
    // record was delivered.
    assert_eq!(
        (
            waiting.outcome,
            waiting.undelivered,
            waiting.changes_to_resolve
        ),
        (billsync::sync::RunOutcome::Undelivered, 0, 1),
        "{waiting:?}"
    );

    resolve(&older, true);
    assert_eq!(w.open_changes().len(), 0);
    let settled = w.sync(at(2026, 11, 10, 1)).await;
    assert_eq!(settled.period_adjustments, 1, "{settled:?}");
    assert_eq!(
        (settled.outcome, settled.changes_to_resolve),
        (billsync::sync::RunOutcome::Ok, 0),
        "{settled:?}"
    );
    let adjustments = w.adjustments();
    assert_eq!(adjustments.len(), 1, "{adjustments:?}");
    assert_eq!(adjustments[0].external_subscription_id, "sub_acme");
    assert_eq!(amount(&adjustments[0]), dec("40.00"));
}

/// A line billed to ACME, whose pricing is per record, is renamed to a Globex instance; Globex
/// is priced at a monthly minimum of 50.00. The change waits for a person: nothing of the line
/// is at Globex. Globex's October must not count the line (its value went to ACME): settling
/// it with the line would send Globex an adjustment of 40.00 "up to the minimum" on a month in
/// which Globex holds nothing but that adjustment.
#[tokio::test(flavor = "multi_thread")]
async fn a_sent_line_renamed_into_a_month_priced_customer_is_not_counted_in_that_month() {
    let mappings = MappingSet::from_sources(&[(
        "customers.yaml".to_string(),
        "version: 1
customers:
  - match: { provider: metalsoft, resource_name: { glob: \"acme-*\" } }
    external_subscription_id: sub_acme
  - match: { provider: metalsoft, resource_name: { glob: \"globex-*\" } }
    external_subscription_id: sub_globex
    pricing: { minimum: \"50\", period: month }
rules:
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
"
        .to_string(),
    )])
    .unwrap();
    let w = World::start_with(mappings).await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 1, "{first:?}");
    w.serve(vec![october_line("globex-web")]);
    let renamed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(renamed.changed_after_send, 1, "{renamed:?}");
    let closed = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(closed.period_adjustments, 0, "{closed:?}");
    assert!(
        w.lago
            .events()
            .iter()
            .all(|e| e.external_subscription_id != "sub_globex"),
        "{:?}",
        w.lago.events()
    );
    // Kept as sent, it stays out of Globex's month too.
    let change = w.open_changes()[0]["change"].as_i64().unwrap().to_string();
    let out = w.run(
        "text",
        &[
            "ledger",
            "resolve",
            "--change",
            &change,
            "--keep-sent",
            "--reason",
            "stays ACME's",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let after = w.sync(at(2026, 11, 10, 1)).await;
    assert_eq!(after.period_adjustments, 0, "{after:?}");
    assert_eq!(w.adjustments().len(), 0, "{:?}", w.lago.events());
}

/// `ledger vacuum` prunes old sent records, with their change history. A change that still
/// waits for a person is not history: a provider restating a line older than the retention
/// (seen yesterday, on a record sent more than `--older-than` ago) must stay listed and
/// counted until someone resolves it, not vanish with the next vacuum (the count would drop to
/// 0 while the record's month kept waiting, with nothing left to resolve). Once resolved, the
/// month settles on what was sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_change_waiting_for_a_person_survives_vacuum_until_it_is_resolved() {
    let w = World::start().await;
    w.serve(vec![october_line("acme-web")]);
    w.sync(at(2026, 10, 20, 0)).await;
    w.serve(vec![october_line("globex-web")]);
    w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(w.open_changes().len(), 1);

    // Everything sent so far is older than the retention.
    let ledger = Ledger::open(&w.ledger_path()).await.unwrap();
    ledger
        .acquire_lock("test-vacuum", Utc::now(), Duration::from_secs(60))
        .await
        .unwrap();
    let pruned = ledger
        .vacuum(
            Utc::now() + chrono::Duration::days(1),
            "test-vacuum",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    ledger.release_lock("test-vacuum").await.unwrap();
    ledger.close().await;
    assert_eq!(pruned.pruned, 1, "{pruned:?}");

    let open = w.open_changes();
    assert_eq!(open.len(), 1, "the change still waits: {open:?}");
    assert!(
        w.status()
            .contains("changes of sent records to resolve by hand: 1"),
        "{}",
        w.status()
    );
    let change = open[0]["change"].as_i64().unwrap().to_string();
    let out = w.run(
        "text",
        &[
            "ledger",
            "resolve",
            "--change",
            &change,
            "--keep-sent",
            "--reason",
            "stays ACME's",
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    let settled = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(settled.period_adjustments, 1, "{settled:?}");
    assert_eq!(amount(&w.adjustments()[0]), dec("40.00"));
}

/// A change that cannot go out as a correction but stays in the same (sink, subscription,
/// metric, month) — here because `vacuum` pruned what was sent; equally a restated currency or
/// a changed value property — waits for a person, and so does the month: the person may yet
/// bill the 1000.00 by hand (the share stays the 10.00 that was sent; see
/// `a_restatement_kept_as_sent_after_vacuum_leaves_its_month_on_what_was_sent`).
#[tokio::test(flavor = "multi_thread")]
async fn an_open_change_in_the_same_month_leaves_its_month_waiting() {
    let mappings = MappingSet::from_sources(&[(
        "customers.yaml".to_string(),
        "version: 1
customers:
  - match: { provider: metalsoft, resource_name: { glob: \"acme-*\" } }
    external_subscription_id: sub_acme
    pricing:
      tiers: [{ up_to: \"100\", markup_percent: 20 }, { markup_percent: 10 }]
      period: month
rules:
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
"
        .to_string(),
    )])
    .unwrap();
    let w = World::start_with(mappings).await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 1, "{first:?}");

    // Everything sent so far is older than the retention.
    let ledger = Ledger::open(&w.ledger_path()).await.unwrap();
    ledger
        .acquire_lock("test-vacuum", Utc::now(), Duration::from_secs(60))
        .await
        .unwrap();
    let pruned = ledger
        .vacuum(
            Utc::now() + chrono::Duration::days(1),
            "test-vacuum",
            Duration::from_secs(60),
        )
        .await
        .unwrap();
    ledger.release_lock("test-vacuum").await.unwrap();
    ledger.close().await;
    assert_eq!(pruned.pruned, 1, "{pruned:?}");

    // The provider restates the line: 1000.00 instead of 10.00. It cannot be corrected (what
    // was sent is pruned): a change for a person.
    let mut restated = october_line("acme-web");
    restated.billed_cost = dec("1000.00");
    w.serve(vec![restated]);
    let changed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(changed.changed_after_send, 1, "{changed:?}");
    assert_eq!(w.open_changes().len(), 1);

    // October closes while the change is open: the month must wait.
    let closed = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(
        (closed.period_adjustments, w.adjustments().len()),
        (0, 0),
        "the month settled while its record's change waits for a person: {:?}",
        w.adjustments()
            .iter()
            .map(|e| (e.transaction_id.clone(), amount(e)))
            .collect::<Vec<_>>()
    );
}

/// The same without `vacuum`: a line re-described under a rule of the same subscription and
/// metric whose value goes out under another property cannot be corrected (a change for a
/// person); its month waits while the change does.
#[tokio::test(flavor = "multi_thread")]
async fn a_re_described_line_under_another_property_leaves_its_month_waiting() {
    let mappings = two_properties_with_tiers(
        r#"[{ up_to: "100", markup_percent: 20 }, { markup_percent: 10 }]"#,
    );
    let w = World::start_with(mappings).await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 1, "{first:?}");
    w.serve(vec![gpu_line("1000.00")]);
    let changed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(changed.changed_after_send, 1, "{changed:?}");
    let closed = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(
        (closed.period_adjustments, w.adjustments().len()),
        (0, 0),
        "the month settled while its record's change waits for a person: {:?} {:?}",
        w.adjustments()
            .iter()
            .map(|e| (e.transaction_id.clone(), e.properties.clone()))
            .collect::<Vec<_>>(),
        w.open_changes()
    );
}

impl World {
    /// `ledger vacuum` of everything sent so far (all of it older than the retention).
    async fn vacuum_everything(&self) {
        let ledger = Ledger::open(&self.ledger_path()).await.unwrap();
        ledger
            .acquire_lock("test-vacuum", Utc::now(), Duration::from_secs(60))
            .await
            .unwrap();
        let pruned = ledger
            .vacuum(
                Utc::now() + chrono::Duration::days(1),
                "test-vacuum",
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        ledger.release_lock("test-vacuum").await.unwrap();
        ledger.close().await;
        assert_eq!(pruned.pruned, 1, "{pruned:?}");
    }

    /// `billsync ledger resolve --keep-sent` of every open change.
    fn keep_every_change_as_sent(&self) {
        let open = self.open_changes();
        assert!(!open.is_empty(), "no change waits for a person");
        for c in open {
            let change = c["change"].as_i64().unwrap().to_string();
            let out = self.run(
                "text",
                &[
                    "ledger",
                    "resolve",
                    "--change",
                    &change,
                    "--keep-sent",
                    "--reason",
                    "the restatement is not billed",
                ],
            );
            assert_eq!(out.status.code(), Some(0), "{}", text(&out));
        }
        assert_eq!(self.open_changes().len(), 0);
    }

    /// The adjustments sent, as (key, amount).
    /// Everything Lago holds (the tests' one subscription and month).
    fn lago_total(&self) -> Decimal {
        self.lago.events().iter().map(amount).sum()
    }

    /// `settled` sent the month's one adjustment, of `expected`.
    fn assert_one_adjustment(&self, settled: &RunSummary, expected: &str) {
        assert_eq!(settled.period_adjustments, 1, "{settled:?}");
        let adjustments = self.adjustment_amounts();
        assert_eq!(adjustments.len(), 1, "{adjustments:?}");
        assert_eq!(adjustments[0].1, dec(expected), "{adjustments:?}");
    }

    fn adjustment_amounts(&self) -> Vec<(String, Decimal)> {
        self.adjustments()
            .iter()
            .map(|e| (e.transaction_id.clone(), amount(e)))
            .collect()
    }
}

/// ACME's month tiered (+10 % on the first 5.00 of a month, +20 % above; each line goes out at
/// the lowest rate, and the month's adjustment adds what the tiers add above it), with two
/// rules for its lines: GPU lines (by description) go out under the event property
/// `gpu_amount`, any other under `amount`.
fn tiers_with_two_properties() -> MappingSet {
    two_properties_with_tiers(r#"[{ up_to: "5", markup_percent: 10 }, { markup_percent: 20 }]"#)
}

/// ACME's month tiered by `tiers`, GPU lines under `gpu_amount`, any other under `amount`.
fn two_properties_with_tiers(tiers: &str) -> MappingSet {
    MappingSet::from_sources(&[(
        "customers.yaml".to_string(),
        format!(
            "version: 1
customers:
  - match: {{ provider: metalsoft }}
    external_subscription_id: sub_acme
    pricing:
      tiers: {tiers}
      period: month
rules:
  - name: gpu
    match: {{ provider: metalsoft, charge_description: {{ glob: \"gpu*\" }} }}
    metric: resale_cost
    property: gpu_amount
    value: {{ cost: {{ markup_percent: 0 }} }}
  - name: cost
    match: {{ provider: metalsoft }}
    metric: resale_cost
    property: amount
    value: {{ cost: {{ markup_percent: 0 }} }}
"
        ),
    )])
    .unwrap()
}

/// The month's only line went out at 10.00 (11.00 at the lowest rate); `vacuum` pruned what
/// was sent, then the provider restated it at 1000.00. It cannot be corrected (a change for a
/// person), so nothing of the 1000.00 is billed and the line's share of October stays the
/// 10.00 that was. Kept as sent, October is tiered on it: 5.00 × 10 % + 5.00 × 20 % = 1.50,
/// of which the line carries 1.00, an adjustment of exactly 0.50 (before: the share had
/// followed the restatement, and October was tiered on 1000.00 that nobody billed, an
/// adjustment of 99.50).
#[tokio::test(flavor = "multi_thread")]
async fn a_restatement_kept_as_sent_after_vacuum_leaves_its_month_on_what_was_sent() {
    let w = World::start_with(tiers_with_two_properties()).await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 1, "{first:?}");
    w.vacuum_everything().await;

    let mut restated = october_line("acme-web");
    restated.billed_cost = dec("1000.00");
    w.serve(vec![restated]);
    let changed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(
        (
            changed.changed_after_send,
            changed.corrections,
            changed.sent
        ),
        (1, 0, 0),
        "{changed:?}"
    );
    let open = w.open_changes();
    assert!(
        open[0]["reason"].as_str().unwrap().contains("vacuum"),
        "{open:?}"
    );
    w.keep_every_change_as_sent();

    let settled = w.sync(at(2026, 11, 10, 0)).await;
    w.assert_one_adjustment(&settled, "0.50");
    let adjustments = w.adjustment_amounts();
    // Re-reading the restatement changes nothing.
    let again = w.sync(at(2026, 11, 11, 0)).await;
    assert_eq!(
        (
            again.changed_after_send,
            again.sent,
            again.period_adjustments
        ),
        (0, 0, 0),
        "{again:?}"
    );
    assert_eq!(w.adjustment_amounts(), adjustments);
}

/// The same without `vacuum`: the line, re-described as a GPU line at 1000.00, would now go
/// out under `gpu_amount` instead of `amount`. Kept as sent, October is tiered on the 10.00
/// that went out: an adjustment of exactly 0.50 (before: 99.50, on the unbilled restatement).
#[tokio::test(flavor = "multi_thread")]
async fn a_line_re_described_under_another_property_kept_as_sent_leaves_its_month_on_what_was_sent()
{
    let w = World::start_with(tiers_with_two_properties()).await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 1, "{first:?}");

    w.serve(vec![gpu_line("1000.00")]);
    let changed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(
        (
            changed.changed_after_send,
            changed.corrections,
            changed.sent
        ),
        (1, 0, 0),
        "{changed:?}"
    );
    w.keep_every_change_as_sent();

    let settled = w.sync(at(2026, 11, 10, 0)).await;
    w.assert_one_adjustment(&settled, "0.50");
    assert_eq!(
        w.lago_total(),
        dec("11.50"),
        "October holds its tiered total"
    );
}

/// A change left to a person is superseded by newer content that can be corrected: the line,
/// re-described under `gpu_amount` at 1000.00 (a change for a person), comes back as a plain
/// line at 30.00, which goes out as a correction of +22.00 (33.00 at the lowest rate). The
/// share follows what is billed now: once the older change is kept, October is tiered on
/// 30.00: 5.00 × 10 % + 25.00 × 20 % = 5.50, of which the line carries 3.00, an adjustment of
/// exactly 2.50 (0.50 would be the month tiered on the first 10.00, 99.50 on the 1000.00).
#[tokio::test(flavor = "multi_thread")]
async fn a_change_superseded_by_a_correction_leaves_its_month_on_the_corrected_content() {
    let w = World::start_with(tiers_with_two_properties()).await;
    w.serve(vec![october_line("acme-web")]);
    w.sync(at(2026, 10, 20, 0)).await;
    w.serve(vec![gpu_line("1000.00")]);
    let changed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(changed.changed_after_send, 1, "{changed:?}");

    let mut corrected = october_line("acme-web");
    corrected.billed_cost = dec("30.00");
    w.serve(vec![corrected]);
    let second = w.sync(at(2026, 10, 22, 0)).await;
    assert_eq!((second.corrections, second.sent), (1, 1), "{second:?}");
    // The older change still waits: so does October.
    let waiting = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(waiting.period_adjustments, 0, "{waiting:?}");
    w.keep_every_change_as_sent();

    let settled = w.sync(at(2026, 11, 10, 1)).await;
    w.assert_one_adjustment(&settled, "2.50");
    assert_eq!(
        w.lago_total(),
        dec("35.50"),
        "October holds its tiered total"
    );
}

/// The month's only line went out at 10.00 (11.00 at the lowest rate); the provider restates
/// it at 30.00 and its correction (+22.00) is refused by Lago. The line's share follows the
/// corrected content, the sink holds none of it: settled then (as before), the month got the
/// tier adjustment of 30.00 (2.50) on top of the 11.00 Lago held, an invoice priced on neither
/// content. The month waits for the correction; once a replay sends it, October is tiered on
/// 30.00: 5.00 × 10 % + 25.00 × 20 % = 5.50 above 30.00, of which the lines carried 3.00.
#[tokio::test(flavor = "multi_thread")]
async fn a_month_waits_while_a_correction_of_its_line_is_refused() {
    let w = World::start_with(tiers_with_two_properties()).await;
    w.serve(vec![october_line("acme-web")]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 1, "{first:?}");
    let key = w.lago.events()[0].transaction_id.clone();

    let mut restated = october_line("acme-web");
    restated.billed_cost = dec("30.00");
    w.serve(vec![restated]);
    w.lago.reject_transaction(format!("{key}.r1"));
    let refused = w.sync(at(2026, 10, 22, 0)).await;
    assert_eq!(
        (refused.corrections, refused.rejected),
        (1, 1),
        "{refused:?}"
    );

    let closed = w.sync(at(2026, 11, 10, 0)).await;
    assert_eq!(
        (closed.period_adjustments, w.adjustment_amounts()),
        (0, vec![]),
        "the month settled while the correction of its line is refused: {closed:?}"
    );
    let status = w.status();
    assert!(
        status.contains("months with period pricing: 1 open, 0 settled"),
        "{status}"
    );

    w.lago.clear_faults();
    // The replay sends the correction and settles the month it completes.
    let replayed = w.replay_rejected(at(2026, 11, 10, 1)).await;
    assert_eq!(
        (replayed.sent, replayed.period_adjustments),
        (2, 1),
        "{replayed:?}"
    );
    let after = w.sync(at(2026, 11, 10, 2)).await;
    assert_eq!((after.sent, after.period_adjustments), (0, 0), "{after:?}");
    let adjustments = w.adjustment_amounts();
    assert_eq!(adjustments.len(), 1, "{adjustments:?}");
    assert_eq!(adjustments[0].1, dec("2.50"), "{adjustments:?}");
    assert_eq!(
        w.lago_total(),
        dec("35.50"),
        "October holds its tiered total"
    );
}

/// A line billed before its customer was priced by the month: sent at 10.00 under a flat rule,
/// then the customer gets monthly tiers (same subscription and metric), and the provider
/// re-describes the line at 1000.00 under a rule whose value goes out under another property:
/// a change for a person, nothing of the 1000.00 is billed. The line had no share of October;
/// before, one was made from the new content before staging, and once the change was kept as
/// sent October was tiered on 1000.00 (an adjustment of 99.50 more for nothing billed). It
/// stays out of the month, billed as it was sent.
#[tokio::test(flavor = "multi_thread")]
async fn a_line_billed_before_monthly_pricing_gets_no_share_from_content_nobody_billed() {
    let flat = MappingSet::from_sources(&[(
        "customers.yaml".to_string(),
        "version: 1
customers:
  - match: { provider: metalsoft }
    external_subscription_id: sub_acme
rules:
  - name: cost
    match: { provider: metalsoft }
    metric: resale_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
"
        .to_string(),
    )])
    .unwrap();
    // A second line, read again unchanged once the tiers exist: it joins the month as sent.
    let mut db = october_line("acme-db");
    db.resource_id = "2417".into();
    db.natural_key = vec![("instance".into(), "2417".into())];
    let mut w = World::start_with(flat).await;
    w.serve(vec![october_line("acme-web"), db.clone()]);
    let first = w.sync(at(2026, 10, 20, 0)).await;
    assert_eq!(first.sent, 2, "{first:?}");

    w.mappings = tiers_with_two_properties();
    w.serve(vec![gpu_line("1000.00"), db]);
    let changed = w.sync(at(2026, 10, 21, 0)).await;
    assert_eq!(changed.changed_after_send, 1, "{changed:?}");
    w.keep_every_change_as_sent();

    // October holds the unchanged line only: its tiers add 5.00 × 20 % − 5.00 × 10 % = 0.50
    // above the lowest rate (before: 100.50, tiered on 1010.00).
    let closed = w.sync(at(2026, 11, 10, 0)).await;
    let adjustments = w.adjustment_amounts();
    assert_eq!(
        (closed.period_adjustments, adjustments.len()),
        (1, 1),
        "{closed:?}"
    );
    assert_eq!(
        adjustments[0].1,
        dec("0.50"),
        "October was priced on content nobody billed: {adjustments:?}"
    );
    assert_eq!(w.lago_total(), dec("20.50"));
}
