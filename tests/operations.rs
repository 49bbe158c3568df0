//! Running unattended: a SIGTERM in the middle of a push, two runs on one ledger, metrics
//! pushed to a Pushgateway, and no secret in anything billsync prints.

#[path = "common/old_ledger.rs"]
mod old_ledger;
#[path = "common/world.rs"]
mod world;

use old_ledger::newest_migration;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use billsync::simulators::lago::Behaviour;
use world::{World, LAGO_KEY, MS_KEY};

const MS_SECRET: &str = MS_KEY;
const LAGO_SECRET: &str = LAGO_KEY;

fn command(cfg: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_billsync"));
    cmd.args(["--config", cfg, "--output", "text"])
        .args(args)
        .env("TEST_MS_KEY", MS_SECRET)
        .env("TEST_LAGO_KEY", LAGO_SECRET)
        .env_remove("BILLSYNC_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

async fn finish(child: Child) -> Output {
    tokio::task::spawn_blocking(move || child.wait_with_output().unwrap())
        .await
        .unwrap()
}

async fn run(cfg: &str, args: &[&str]) -> Output {
    finish(command(cfg, args).spawn().unwrap()).await
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn setup(world: &World, extra: &str) -> String {
    let dir = world.dir.path();
    let mappings = world::example_mappings_dir(dir);
    world::write_config(
        dir,
        &world.metalsoft.url,
        &world.lago.url,
        mappings.to_str().unwrap(),
        extra,
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_push_records_everything_and_the_next_run_sends_the_rest_once() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    // 71 records in batches of 25, each request taking 1.5 s.
    world.lago.set_delay(Duration::from_millis(1500));
    let child = command(&cfg, &["sync"]).spawn().unwrap();
    let pid = child.id();
    // Wait until the first batch is in flight or done, then ask the run to stop.
    for _ in 0..100 {
        if world.lago.request_count() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = finish(child).await;
    let output = text(&out);
    assert_eq!(
        out.status.code(),
        Some(6),
        "interrupted exit code: {output}"
    );
    assert!(output.contains("interrupted"), "{output}");

    // The batch in flight finished and was recorded; no other batch was started.
    let stored = world.lago.events().len();
    assert_eq!(
        stored, 25,
        "exactly the in-flight batch reached Lago: {output}"
    );
    world.lago.set_delay(Duration::ZERO);
    let status = run(&cfg, &["status", "--by-source"]).await;
    let st = text(&status);
    assert!(st.contains("lock: free"), "{st}");
    assert!(st.contains("metalsoft_test sent: 25"), "{st}");
    assert!(st.contains("metalsoft_test pending: 46"), "{st}");
    assert!(st.contains("outcome interrupted"), "{st}");

    let next = run(&cfg, &["sync"]).await;
    assert_eq!(
        next.status.code(),
        Some(4),
        "only the held record is left: {}",
        text(&next)
    );
    assert!(text(&next).contains("sent 46 "), "{}", text(&next));
    assert_eq!(world.lago.events().len(), 71);
    assert!(
        world.lago.counts().values().all(|&n| n == 1),
        "nothing pushed twice"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_sync_on_the_same_ledger_exits_with_the_locked_code() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    world.lago.set_delay(Duration::from_millis(700));
    let first = command(&cfg, &["sync"]).spawn().unwrap();
    for _ in 0..100 {
        if world.lago.request_count() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = run(&cfg, &["sync"]).await;
    let output = text(&second);
    assert_eq!(second.status.code(), Some(3), "{output}");
    assert!(output.contains("holds the ledger lock"), "{output}");
    let first = finish(first).await;
    assert_eq!(first.status.code(), Some(4), "{}", text(&first));
    assert_eq!(world.lago.events().len(), 71);
    assert!(world.lago.counts().values().all(|&n| n == 1));
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_are_pushed_to_the_pushgateway_after_a_run() {
    use wiremock::matchers::{method, path};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/metrics/job/billsync/instance/test-pod"))
        .respond_with(ResponseTemplate::new(200))
        .expect(1)
        .mount(&gateway)
        .await;
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(
        &world,
        &format!(
            "metrics:\n  pushgateway_url: {}\n  instance: test-pod\n",
            gateway.uri()
        ),
    );
    let out = run(&cfg, &["sync"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let requests = gateway.received_requests().await.unwrap();
    let body = String::from_utf8_lossy(&requests[0].body).into_owned();
    for line in [
        "billsync_records_pulled{source=\"metalsoft_test\",provider=\"metalsoft\"} 80",
        "billsync_records_sent{sink=\"lago\"} 71",
        "billsync_records_undelivered{source=\"metalsoft_test\",status=\"unmapped\"} 1",
        "billsync_run_outcome{outcome=\"undelivered\"} 1",
        "billsync_cursor_lag_seconds{source=\"metalsoft_test\",stream=\"user:1\"}",
        "billsync_last_success_timestamp_seconds ",
        "billsync_run_duration_seconds ",
        "billsync_changes_unresolved 0\n",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    // No mapping prices per month: no month metrics.
    assert!(!body.contains("billsync_period_"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn no_output_of_any_command_contains_a_secret() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let mut outputs = Vec::new();
    // A refused key (error path), a normal run, status, a replay, help texts, a bad config.
    let mut refused = command(&cfg, &["sync"]);
    refused.env("TEST_LAGO_KEY", "lago-refused-secret-123");
    let refused = finish(refused.spawn().unwrap()).await;
    assert_eq!(refused.status.code(), Some(5));
    outputs.push(text(&refused));
    for args in [
        vec!["sync"],
        vec!["status"],
        vec![
            "replay",
            "--status",
            "unmapped",
            "--reason",
            "check",
            "--dry-run",
        ],
        vec!["--help"],
        vec!["sync", "--help"],
        vec!["--log-format", "text", "sync"],
    ] {
        outputs.push(text(&run(&cfg, &args).await));
    }
    let all = outputs.join("\n");
    for secret in [MS_SECRET, LAGO_SECRET, "lago-refused-secret-123"] {
        assert!(
            !all.contains(secret),
            "{secret} appears in the output:\n{all}"
        );
    }
    // The JSON logs do carry the run id, so the search covered real log lines.
    assert!(all.contains("\"run_id\""), "{all}");
}

#[tokio::test(flavor = "multi_thread")]
async fn reconcile_exits_zero_when_everything_agrees_and_seven_on_a_lost_event() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    let ok = run(&cfg, &["reconcile", "--period", "2026-10"]).await;
    assert_eq!(ok.status.code(), Some(0), "{}", text(&ok));
    assert!(text(&ok).contains("every difference is explained"));

    let lost = world.lago.events()[0].transaction_id.clone();
    world.lago.delete_event(&lost);
    let bad = run(
        &cfg,
        &["reconcile", "--period", "2026-10", "--format", "csv"],
    )
    .await;
    assert_eq!(bad.status.code(), Some(7), "{}", text(&bad));
    let csv = String::from_utf8_lossy(&bad.stdout);
    assert!(csv.lines().next().unwrap().starts_with("source,"), "{csv}");
    assert!(csv.contains(&lost), "the lost key is named: {csv}");
}

const SUBSCRIPTIONS: &[&str] = &[
    "sub_acme_main",
    "sub_globex_main",
    "sub_hooli_cloud",
    "sub_initech_cloud",
    "sub_paas_api",
    "sub_paas_blog",
    "sub_paas_shop",
    "sub_reseller_house",
    "sub_sakura_tenant",
    "sub_umbrella_cloud",
    "sub_reseller_initech",
    "sub_reseller_umbrella",
];

#[tokio::test(flavor = "multi_thread")]
async fn mappings_check_remote_finds_what_lago_lacks_and_explain_reads_a_ledger_record() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    for sub in SUBSCRIPTIONS {
        world.lago.register_subscription(sub, "customer");
    }
    for (code, field) in [
        ("instance_hours", "hours"),
        ("network_gb", "value"),
        ("storage_cost", "amount"),
        ("paas_cost", "amount"),
        ("sakura_cost", "amount"),
    ] {
        world.lago.register_metric(code, "sum_agg", Some(field));
    }
    // softlayer_cost is missing in Lago: an error naming it, exit 2.
    let out = run(&cfg, &["mappings", "check", "--remote"]).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(2), "{output}");
    assert!(output.contains("softlayer_cost"), "{output}");
    world
        .lago
        .register_metric("softlayer_cost", "sum_agg", Some("amount"));
    let out = run(&cfg, &["mappings", "check", "--remote"]).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(0), "{output}");
    // Lago's default billing entity has no invoice grace period: MetalSoft's last window of a
    // month (1d, closing up to a day after the month's end in the customer's timezone, read
    // again for its look-back of 1d, then settle_delay 2h and the next hourly run) reaches Lago
    // after the month's invoice was finalized and is never billed. A warning (exit 0) naming
    // the entity, the source and both figures.
    assert!(
        output.contains(
            "warning: billing entity `default` (of customer(s) `customer` without a grace \
             period of their own): invoice grace period 0 days is shorter than the 2days 3h \
             after a period's end that `metalsoft_test` needs (window 1 day + look_back 1 day \
             + settle_delay 2h + run interval 1h)"
        ),
        "{output}"
    );
    assert!(
        output.contains("set invoice_grace_period to at least 3 days"),
        "{output}"
    );
    let out = run(
        &cfg,
        &["mappings", "check", "--remote", "--run-interval", "30m"],
    )
    .await;
    assert!(
        text(&out).contains("the 2days 2h 30m after a period's end that `metalsoft_test` needs"),
        "{}",
        text(&out)
    );

    // explain --id: the held reservation installment of the ledger, rule by rule.
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    let export = run(&cfg, &["ledger", "export", "--status", "unmapped"]).await;
    let csv = String::from_utf8_lossy(&export.stdout).into_owned();
    let id = csv
        .lines()
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .to_string();
    let out = run(&cfg, &["mappings", "explain", "--id", &id]).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(0), "{output}");
    assert!(output.contains("reservation_installment"), "{output}");
    assert!(
        output.contains("metalsoft.yaml#instance-hours"),
        "each rule tried is listed: {output}"
    );
}

/// SAKURA bills by JST month and its records are dated at the month's start, the 1st 00:00 JST
/// (the last day of the month before in UTC), sent once the month is final (1st of the next
/// month + `final_lag`). Into a Lago customer billed in UTC (Lago's default) with no grace
/// period, they land in the month before, long finalized, and are never billed: `mappings
/// check --remote` says so, and that the grace period is too short, and still exits 0.
#[tokio::test(flavor = "multi_thread")]
async fn mappings_check_remote_warns_about_sakura_into_a_utc_customer_without_grace_period() {
    use billsync::simulators::lago::{LagoSim, LagoSimConfig};
    let lago = LagoSim::start(LagoSimConfig {
        api_key: LAGO_SECRET.into(),
        ..LagoSimConfig::default()
    })
    .await
    .unwrap();
    lago.register_metric("sakura_cost", "sum_agg", Some("amount"));
    lago.register_subscription("sub_sakura_tenant", "sakura-tenant");
    let dir = tempfile::tempdir().unwrap();
    let maps = dir.path().join("maps");
    std::fs::create_dir_all(&maps).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/mappings/sakura.yaml"),
        maps.join("sakura.yaml"),
    )
    .unwrap();
    let cfg = dir.path().join("billsync.yaml");
    std::fs::write(
        &cfg,
        format!(
            "ledger:\n  path: {}\nmappings: [{}]\nproviders:\n  sakura_main:\n    kind: sakura\n    endpoint: http://127.0.0.1:9/cloud/zone/is1a/api/system/1.0\n    token: env:TEST_MS_KEY\n    secret: env:TEST_MS_KEY\n    start_month: 2026-09\nsinks:\n  lago:\n    kind: lago\n    api_url: {}\n    api_key: env:TEST_LAGO_KEY\n",
            dir.path().join("ledger.db").display(),
            maps.display(),
            lago.url
        ),
    )
    .unwrap();
    let out = run(cfg.to_str().unwrap(), &["mappings", "check", "--remote"]).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(0), "{output}");
    assert!(
        output.contains(
            "warning: customer `sakura-tenant` is billed in timezone UTC but SAKURA source \
             `sakura_main` feeds it"
        ),
        "{output}"
    );
    assert!(
        output.contains(
            "invoice grace period 0 days is shorter than the 1day 1h after a period's end that \
             `sakura_main` needs (a month is final on the 1st of the next, 00:00 JST, + \
             final_lag 1 day + run interval 1h; a bill SAKURA lists later, found by the \
             look-back or after a held month, comes later still and no grace period covers it)"
        ),
        "{output}"
    );
    lago.shutdown().await;
}

/// A sink in front of the Lago simulator whose n-th request waits `delays[n]` before it is
/// sent, and whose second request asks the run to stop (as SIGTERM does), so that the requests
/// in flight at the stop end one after the other.
struct StaggeredSink {
    inner: billsync::sinks::lago::LagoSink,
    calls: std::sync::atomic::AtomicUsize,
    delays: Vec<Duration>,
    trigger: std::sync::Mutex<Option<billsync::shutdown::ShutdownTrigger>>,
}

#[async_trait::async_trait]
impl billsync::sinks::Sink for StaggeredSink {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn encode(
        &self,
        key: &str,
        event: &billsync::mapping::MappedEvent,
    ) -> Result<String, billsync::sinks::EncodeError> {
        self.inner.encode(key, event)
    }
    async fn deliver(
        &self,
        batch: &[billsync::sinks::Outgoing],
    ) -> Result<Vec<billsync::sinks::Outcome>, billsync::sinks::SinkStopped> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if n == 1 {
            if let Some(trigger) = self.trigger.lock().unwrap().take() {
                trigger.trigger();
            }
        }
        tokio::time::sleep(self.delays.get(n).copied().unwrap_or_default()).await;
        self.inner.deliver(batch).await
    }
}

/// `shutdown_deadline` bounds the whole wait for the requests in flight after a stop, not each
/// of them in turn: Kubernetes kills the pod `terminationGracePeriodSeconds` after SIGTERM,
/// and a run killed there records nothing and keeps its lock. Here two requests are in flight
/// at the stop, ending 1.8 s and 3.6 s later, with a 2 s deadline: the second is abandoned at
/// the deadline (its records stay pending) and the run ends interrupted, on time.
#[tokio::test(flavor = "multi_thread")]
async fn after_a_stop_the_shutdown_deadline_bounds_all_requests_in_flight_together() {
    use billsync::sync::{RunOutcome, SyncOptions};
    let world = World::start(Behaviour::Postgres).await;
    let (trigger, shutdown) = billsync::shutdown::channel();
    let mut pipeline = world.pipeline().await;
    pipeline.sinks = vec![Box::new(StaggeredSink {
        inner: world.sink_with_key(LAGO_KEY),
        calls: Default::default(),
        delays: vec![
            Duration::ZERO,
            Duration::from_millis(1800),
            Duration::from_millis(3600),
        ],
        trigger: std::sync::Mutex::new(Some(trigger)),
    })];
    pipeline.shutdown = shutdown.clone();
    pipeline.shutdown_deadline = Duration::from_secs(2);
    let run = tokio::spawn(async move {
        let summary = pipeline
            .sync(&SyncOptions {
                now: Some(world::now()),
                ..Default::default()
            })
            .await;
        (summary, std::time::Instant::now())
    });
    shutdown.requested().await;
    let stopped_at = std::time::Instant::now();
    let (summary, ended_at) = run.await.unwrap();
    let summary = summary.unwrap();
    let took = ended_at - stopped_at;
    assert_eq!(summary.outcome, RunOutcome::Interrupted);
    assert!(
        took < Duration::from_millis(3000),
        "the run ended {took:?} after the stop, past its 2 s shutdown deadline"
    );
    // The abandoned request never reached Lago; the next run sends what is left, once.
    let next = world
        .pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(world::now()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(next.sent > 0, "the abandoned batch is sent by the next run");
    assert_eq!(world.lago.events().len(), 71);
    assert!(
        world.lago.counts().values().all(|&n| n == 1),
        "nothing pushed twice"
    );
}

/// A sink in front of the Lago simulator whose second batch stops it (as a 401 does) and whose
/// third, in flight beside the second, is still out when a stop is asked for (as SIGTERM
/// does): it asks for the stop, then takes `slow` before it is sent.
struct StopThenSigtermSink {
    inner: billsync::sinks::lago::LagoSink,
    calls: std::sync::atomic::AtomicUsize,
    slow: Duration,
    trigger: std::sync::Mutex<Option<billsync::shutdown::ShutdownTrigger>>,
}

#[async_trait::async_trait]
impl billsync::sinks::Sink for StopThenSigtermSink {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn encode(
        &self,
        key: &str,
        event: &billsync::mapping::MappedEvent,
    ) -> Result<String, billsync::sinks::EncodeError> {
        self.inner.encode(key, event)
    }
    async fn deliver(
        &self,
        batch: &[billsync::sinks::Outgoing],
    ) -> Result<Vec<billsync::sinks::Outcome>, billsync::sinks::SinkStopped> {
        match self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            1 => Err(billsync::sinks::SinkStopped::new(
                self.inner.name(),
                "refused the credentials (401)",
            )),
            2 => {
                // Let the stop be seen first, then ask the run to stop.
                tokio::time::sleep(Duration::from_millis(200)).await;
                if let Some(trigger) = self.trigger.lock().unwrap().take() {
                    trigger.trigger();
                }
                tokio::time::sleep(self.slow).await;
                self.inner.deliver(batch).await
            }
            _ => self.inner.deliver(batch).await,
        }
    }
}

/// A stopped sink's batches in flight are awaited (their answers recorded), but a SIGTERM
/// during that wait keeps its guarantee: `shutdown_deadline` bounds it, the run ends
/// interrupted on time (Kubernetes kills the pod `terminationGracePeriodSeconds` after
/// SIGTERM), and the abandoned batch stays pending for the next run, which sends it once.
#[tokio::test(flavor = "multi_thread")]
async fn a_sigterm_while_a_stopped_sink_drains_its_batches_in_flight_ends_the_run_on_time() {
    use billsync::sync::{RunOutcome, SyncOptions};
    let world = World::start(Behaviour::Postgres).await;
    let (trigger, shutdown) = billsync::shutdown::channel();
    let mut pipeline = world.pipeline().await;
    pipeline.sinks = vec![Box::new(StopThenSigtermSink {
        inner: world.sink_with_key(LAGO_KEY),
        calls: Default::default(),
        slow: Duration::from_secs(30),
        trigger: std::sync::Mutex::new(Some(trigger)),
    })];
    pipeline.shutdown = shutdown.clone();
    pipeline.shutdown_deadline = Duration::from_secs(1);
    let run = tokio::spawn(async move {
        let summary = pipeline
            .sync(&SyncOptions {
                now: Some(world::now()),
                ..Default::default()
            })
            .await;
        (summary, std::time::Instant::now())
    });
    // The third batch asks for the stop only if it is still awaited after the sink stopped.
    tokio::time::timeout(Duration::from_secs(20), shutdown.requested())
        .await
        .expect("the batch in flight beside the stopped one was dropped, not awaited");
    let stopped_at = std::time::Instant::now();
    let (summary, ended_at) = run.await.unwrap();
    let summary = summary.unwrap();
    let took = ended_at - stopped_at;
    assert_eq!(summary.outcome, RunOutcome::Interrupted, "{summary:?}");
    assert!(
        summary.interrupted && summary.sink_errors.len() == 1,
        "{summary:?}"
    );
    assert!(
        took < Duration::from_millis(2500),
        "the run ended {took:?} after the stop, past its 1 s shutdown deadline"
    );
    assert_eq!(summary.sent, 25, "only the first batch: {summary:?}");
    // The stopped and the abandoned batches are sent by the next run, once each.
    let next = world
        .pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(world::now()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(next.sent, 46, "{next:?}");
    assert_eq!(world.lago.events().len(), 71);
    assert!(
        world.lago.counts().values().all(|&n| n == 1),
        "nothing pushed twice"
    );
}

/// A sink in front of the Lago simulator whose second batch is slow (`slow` before it is
/// sent) and whose third, sent beside it, asks the run to stop (as SIGTERM does) once Lago has
/// answered it.
struct SlowThenSigtermSink {
    inner: billsync::sinks::lago::LagoSink,
    calls: std::sync::atomic::AtomicUsize,
    slow: Duration,
    trigger: std::sync::Mutex<Option<billsync::shutdown::ShutdownTrigger>>,
}

#[async_trait::async_trait]
impl billsync::sinks::Sink for SlowThenSigtermSink {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn name(&self) -> &str {
        self.inner.name()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn encode(
        &self,
        key: &str,
        event: &billsync::mapping::MappedEvent,
    ) -> Result<String, billsync::sinks::EncodeError> {
        self.inner.encode(key, event)
    }
    async fn deliver(
        &self,
        batch: &[billsync::sinks::Outgoing],
    ) -> Result<Vec<billsync::sinks::Outcome>, billsync::sinks::SinkStopped> {
        match self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) {
            1 => {
                tokio::time::sleep(self.slow).await;
                self.inner.deliver(batch).await
            }
            2 => {
                let answer = self.inner.deliver(batch).await;
                if let Some(trigger) = self.trigger.lock().unwrap().take() {
                    trigger.trigger();
                }
                answer
            }
            _ => self.inner.deliver(batch).await,
        }
    }
}

/// Batches are answered in the order they were sent; at the shutdown deadline a batch still
/// out (here the second, slow) is abandoned. The third batch's answer had already arrived
/// (Lago stored its events) but waited behind the second's, and was dropped with it: Lago held
/// 46 events, the ledger said 25 were sent, and the next run sent the third batch again (a
/// webhook receiver that does not deduplicate by key bills it twice). Answers received before
/// the deadline are recorded, whatever their turn.
#[tokio::test(flavor = "multi_thread")]
async fn at_the_shutdown_deadline_answers_already_received_are_recorded() {
    use billsync::sync::{RunOutcome, SyncOptions};
    let world = World::start(Behaviour::Postgres).await;
    // Staged first, so that the batches are the same whatever the timing: 25, 25, 21.
    world
        .pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(world::now()),
            skip_push: true,
            ..Default::default()
        })
        .await
        .unwrap();
    let (trigger, shutdown) = billsync::shutdown::channel();
    let mut pipeline = world.pipeline().await;
    pipeline.sinks = vec![Box::new(SlowThenSigtermSink {
        inner: world.sink_with_key(LAGO_KEY),
        calls: Default::default(),
        slow: Duration::from_secs(30),
        trigger: std::sync::Mutex::new(Some(trigger)),
    })];
    pipeline.shutdown = shutdown.clone();
    pipeline.shutdown_deadline = Duration::from_millis(500);
    let summary = tokio::time::timeout(
        Duration::from_secs(20),
        pipeline.sync(&SyncOptions {
            now: Some(world::now()),
            ..Default::default()
        }),
    )
    .await
    .expect("the run ends at the shutdown deadline")
    .unwrap();
    assert_eq!(summary.outcome, RunOutcome::Interrupted, "{summary:?}");
    // Batches of 25: the first and the third (21 events) reached Lago.
    assert_eq!(world.lago.events().len(), 46);
    assert_eq!(
        summary.sent, 46,
        "what Lago answered is recorded: {summary:?}"
    );
    let next = world
        .pipeline()
        .await
        .sync(&SyncOptions {
            now: Some(world::now()),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        (next.sent, next.already_delivered),
        (25, 0),
        "the next run sends only the abandoned batch: {next:?}"
    );
    assert_eq!(world.lago.events().len(), 71);
}

/// `status` and `ledger export` only read: pointed at a ledger that does not exist (a typo in
/// `ledger.path`, a volume not mounted) they say so, naming the file, and create nothing —
/// instead of creating an empty ledger and reporting "lock: free", no records and no runs.
#[tokio::test(flavor = "multi_thread")]
async fn status_and_export_of_a_missing_ledger_fail_naming_it_and_create_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let ledger_dir = world.dir.path().join("ledger");
    let ledger = ledger_dir.join("ledger.db");
    for args in [&["status"][..], &["ledger", "export"][..]] {
        let out = run(&cfg, args).await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {output}");
        assert!(
            output.contains(&ledger.display().to_string()) && output.contains("does not exist"),
            "{args:?} names the missing ledger: {output}"
        );
        assert!(
            !ledger_dir.exists(),
            "{args:?} created {}",
            ledger_dir.display()
        );
    }
    // A sync creates it; then status reads it.
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let status = run(&cfg, &["status", "--by-source"]).await;
    assert_eq!(status.status.code(), Some(0), "{}", text(&status));
    assert!(text(&status).contains("metalsoft_test sent: 71"));
}

/// A replay only re-maps records a ledger holds: pointed at a ledger that does not exist (a pod
/// started without its volume, a typo in `ledger.path`) it used to create an empty one and
/// report success (exit 0, nothing replayed), so the engineer believed the held records had
/// gone out. Now, dry run or not, it fails naming the file (exit 1) and creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_of_a_missing_ledger_fails_naming_it_and_creates_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let ledger_dir = world.dir.path().join("ledger");
    let ledger = ledger_dir.join("ledger.db");
    let replay = [
        "replay",
        "--status",
        "unmapped",
        "--reason",
        "mapping fixed",
    ];
    let dry_run = [&replay[..], &["--dry-run"][..]].concat();
    for args in [&replay[..], &dry_run[..]] {
        let out = run(&cfg, args).await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {output}");
        assert!(
            output.contains(&ledger.display().to_string()) && output.contains("does not exist"),
            "{args:?} names the missing ledger: {output}"
        );
        assert!(
            !ledger_dir.exists(),
            "{args:?} created {}",
            ledger_dir.display()
        );
    }
    assert_eq!(world.lago.request_count(), 0);
}

/// A replay's filters that can match nothing by their construction are refused as a `sync`
/// refuses them (exit 2, nothing replayed, no run recorded): a `--provider` that is neither a
/// configured source's name or kind nor a source the ledger holds cursors of (a typo), and an
/// `--until` not after `--since`. They used to replay nothing and exit 0, which reads as "done".
/// A source no longer configured whose records the ledger holds can still be replayed; an
/// unknown `--key` (maybe a record replayed already) is 0 records, said as "matched 0".
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_filter_that_cannot_match_is_refused_and_one_that_matched_nothing_says_so() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let replay = |extra: &'static [&'static str]| {
        let mut args = vec!["replay", "--status", "unmapped", "--reason", "check"];
        args.extend_from_slice(extra);
        args
    };
    for (extra, names) in [
        (&["--provider", "nosuch"][..], "nosuch"),
        (&["--provider", "nosuch", "--dry-run"][..], "nosuch"),
        (
            &["--since", "2026-11-01", "--until", "2026-10-01"][..],
            "--until",
        ),
        (
            &["--since", "2026-10-01", "--until", "2026-10-01"][..],
            "--until",
        ),
    ] {
        let out = run(&cfg, &replay(extra)).await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(2), "{extra:?}: {output}");
        assert!(output.contains(names), "{extra:?}: {output}");
        assert!(!output.contains("replay run"), "{extra:?}: {output}");
    }
    // `ledger export` takes the same window: swapped dates are refused, not an empty CSV.
    let out = run(
        &cfg,
        &[
            "ledger",
            "export",
            "--since",
            "2026-11-01",
            "--until",
            "2026-10-01",
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("--until"), "{}", text(&out));
    let status = run(&cfg, &["status"]).await;
    assert!(
        !text(&status).contains("replay"),
        "no replay run recorded: {}",
        text(&status)
    );
    // A configured source by name or kind, and a key that matches nothing.
    for (extra, matched) in [
        (&["--provider", "metalsoft_test", "--dry-run"][..], 1),
        (&["--provider", "metalsoft", "--dry-run"][..], 1),
        (&["--key", "no-such-key", "--dry-run"][..], 0),
    ] {
        let out = run(&cfg, &replay(extra)).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", text(&out));
        assert!(
            stdout.contains(&format!("matched {matched} ")),
            "{extra:?}: {stdout}"
        );
    }
    // The source renamed in the settings: its records are still the ledger's to replay.
    let settings = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(&cfg, settings.replace("metalsoft_test:", "metalsoft_eu:")).unwrap();
    let out = run(
        &cfg,
        &replay(&["--provider", "metalsoft_test", "--dry-run"]),
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("matched 1 "),
        "{}",
        text(&out)
    );
}

/// `ledger set-cursor` makes the next sync read a period again (or skip one): the audit trail
/// must say why, as for `replay`, `resolve` and `mark-delivered`. An empty or blank `--reason`
/// used to be taken; it is now refused with exit 2 and the cursor stays where it was.
#[tokio::test(flavor = "multi_thread")]
async fn set_cursor_refuses_an_empty_reason_and_moves_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let cursors = |out: &Output| -> Vec<String> {
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("metalsoft_test user:"))
            // The value, not the lag that follows it (it grows by the second).
            .map(|l| l.split(" (").next().unwrap_or(l).to_string())
            .collect()
    };
    let before = cursors(&run(&cfg, &["status"]).await);
    assert!(!before.is_empty());
    for reason in ["", "  \t"] {
        let out = run(
            &cfg,
            &[
                "ledger",
                "set-cursor",
                "--source",
                "metalsoft_test",
                "--stream",
                "user:1",
                "--value",
                "2026-10-01T00:00:00Z",
                "--reason",
                reason,
            ],
        )
        .await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(2), "{reason:?}: {output}");
        assert!(output.contains("--reason must say why"), "{output}");
    }
    assert_eq!(cursors(&run(&cfg, &["status"]).await), before);
}

/// In a CronJob the host name is the pod's name, new every hour (`billsync-29412345-x7k2p`).
/// Used as the Pushgateway's `instance`, every run would push into a group of its own: groups
/// pile up forever (the Pushgateway never forgets), an old failed run's `run_outcome` stays 1,
/// and "the last success" is one series per pod instead of one value a failed run keeps. Without
/// an `instance` setting the run pushes to the job's one group (`/metrics/job/<job>`, the
/// Pushgateway's convention for batch jobs).
#[tokio::test(flavor = "multi_thread")]
async fn metrics_of_every_cronjob_pod_go_to_one_group_not_one_per_pod_name() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&gateway)
        .await;
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(
        &world,
        &format!("metrics:\n  pushgateway_url: {}\n", gateway.uri()),
    );
    for pod in ["billsync-29412345-x7k2p", "billsync-29412405-q9m4d"] {
        let out = finish(
            command(&cfg, &["sync"])
                .env("HOSTNAME", pod)
                .spawn()
                .unwrap(),
        )
        .await;
        assert!(matches!(out.status.code(), Some(0 | 4)), "{}", text(&out));
    }
    let paths: Vec<String> = gateway
        .received_requests()
        .await
        .unwrap()
        .iter()
        .map(|r| r.url.path().to_string())
        .collect();
    assert_eq!(paths, ["/metrics/job/billsync", "/metrics/job/billsync"]);
}

/// A Pushgateway behind basic auth is reached with `user:password@` in its URL (reqwest sends
/// it as an `Authorization: Basic` header). When the push fails, the warning names the gateway
/// without the credentials: "secrets never appear in logs" holds for the metrics push too.
#[tokio::test(flavor = "multi_thread")]
async fn a_failed_metrics_push_never_logs_the_pushgateway_credentials() {
    let world = World::start(Behaviour::Postgres).await;
    // Nothing listens on port 9 (discard): the push fails with a connection error.
    let cfg = setup(
        &world,
        "metrics:\n  pushgateway_url: http://pgadmin:PG-PASS-SECRET-42@127.0.0.1:9\n",
    );
    let out = run(&cfg, &["sync"]).await;
    let output = text(&out);
    assert!(output.contains("metrics not pushed"), "{output}");
    assert!(
        output.contains("127.0.0.1:9"),
        "the gateway is named: {output}"
    );
    assert!(!output.contains("PG-PASS-SECRET-42"), "{output}");
}

/// `sync --dry-run` writes nothing, the ledger's schema included: on a ledger of an older
/// schema it exits 2 and leaves it as it is (a newer image's dry run, a natural check before a
/// rollout, would otherwise upgrade the ledger that the CronJob's older image then refuses);
/// on a path where no ledger exists yet (a typo, an unmounted volume) it plans as a first sync
/// would and creates nothing there. It exits 0 for what it would leave held, but 1 when a
/// provider failed (a pre-flight check after rotating a key must not pass on a wrong key).
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_run_never_creates_or_upgrades_the_ledger_and_fails_when_a_provider_does() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let ledger_dir = world.dir.path().join("ledger");

    // No ledger yet: planned from an empty one, nothing created.
    let first = run(&cfg, &["sync", "--dry-run"]).await;
    assert_eq!(first.status.code(), Some(0), "{}", text(&first));
    assert!(
        text(&first).contains("80 records pulled"),
        "{}",
        text(&first)
    );
    assert!(
        !ledger_dir.exists(),
        "the dry run created {}",
        ledger_dir.display()
    );
    assert!(world.lago.events().is_empty());

    // A provider that refuses the key: exit 1, not 0.
    let mut refused = command(&cfg, &["sync", "--dry-run"]);
    refused.env("TEST_MS_KEY", "rotated-wrong-key");
    let refused = finish(refused.spawn().unwrap()).await;
    assert_eq!(refused.status.code(), Some(1), "{}", text(&refused));

    // A ledger one migration behind this binary: refused, not upgraded.
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    let path = ledger_dir.join("ledger.db");
    let known = newest_migration(&path).await;
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = ?1")
        .bind(known)
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let older = run(&cfg, &["sync", "--dry-run"]).await;
    assert_eq!(older.status.code(), Some(2), "{}", text(&older));
    assert_eq!(
        newest_migration(&path).await,
        known - 1,
        "the dry run upgraded the ledger"
    );
}

/// A run killed by SIGKILL or the OOM killer leaves its lock row behind until `lock_ttl`
/// passes. After that, `status` must not say the lock is "held": on a bad day that sends the
/// on-call engineer looking for a run that is not there.
#[tokio::test(flavor = "multi_thread")]
async fn status_tells_an_expired_lock_of_a_killed_run_from_a_held_one() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let ledger_path = world.dir.path().join("ledger").join("ledger.db");
    let ledger = billsync::ledger::Ledger::open(&ledger_path).await.unwrap();
    let killed_at = chrono::Utc::now() - chrono::Duration::hours(2);
    ledger
        .acquire_lock("billsync@killed-pod:1", killed_at, Duration::from_secs(900))
        .await
        .unwrap();
    let status = run(&cfg, &["status"]).await;
    let output = text(&status);
    assert_eq!(status.status.code(), Some(0), "{output}");
    let lock_line = output
        .lines()
        .find(|l| l.starts_with("lock:"))
        .unwrap_or_else(|| panic!("no lock line: {output}"));
    assert!(
        lock_line.starts_with("lock: free") && lock_line.contains("expired"),
        "an expired lock is free: {lock_line}"
    );
    assert!(lock_line.contains("billsync@killed-pod:1"), "{lock_line}");

    // A live holder is still shown as holding it.
    ledger.release_lock("billsync@killed-pod:1").await.unwrap();
    ledger
        .acquire_lock(
            "billsync@live-pod:2",
            chrono::Utc::now(),
            Duration::from_secs(900),
        )
        .await
        .unwrap();
    let status = run(&cfg, &["status"]).await;
    let output = text(&status);
    assert!(
        output.contains("lock: held by billsync@live-pod:2"),
        "{output}"
    );
}

/// The CronJob passes its Job's name (`BILLSYNC_JOB_NAME`): the retry of a Job whose first pod
/// was OOM-killed finds that attempt's lock, unexpired, and takes it over instead of exiting 3
/// for `lock_ttl`. A `replay` with the same variable (started by hand inside the pod) does not:
/// only a sync takes over, and only from its own Job's earlier pod; another Job's sync, and a
/// second sync started by hand in the live pod, get exit 3.
#[tokio::test(flavor = "multi_thread")]
async fn a_retried_cronjob_sync_takes_over_its_crashed_attempts_lock_and_nothing_else_does() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let ledger_path = world.dir.path().join("ledger").join("ledger.db");
    let ledger = billsync::ledger::Ledger::open(&ledger_path).await.unwrap();
    let crashed = "job:billsync-29412345/billsync-29412345-x7k2p:1:0000abcd";
    ledger
        .acquire_lock(crashed, chrono::Utc::now(), Duration::from_secs(900))
        .await
        .unwrap();
    let with_job = |args: &[&str], job: &str| {
        let mut cmd = command(&cfg, args);
        cmd.env("BILLSYNC_JOB_NAME", job)
            .env("HOSTNAME", format!("{job}-m3n8v"));
        cmd
    };
    let replay = finish(
        with_job(
            &["replay", "--status", "unmapped", "--reason", "x"],
            "billsync-29412345",
        )
        .spawn()
        .unwrap(),
    )
    .await;
    assert_eq!(replay.status.code(), Some(3), "{}", text(&replay));
    let next_hour = finish(with_job(&["sync"], "billsync-29412405").spawn().unwrap()).await;
    assert_eq!(next_hour.status.code(), Some(3), "{}", text(&next_hour));
    let mut same_pod = with_job(&["sync"], "billsync-29412345");
    same_pod.env("HOSTNAME", "billsync-29412345-x7k2p");
    let same_pod = finish(same_pod.spawn().unwrap()).await;
    assert_eq!(same_pod.status.code(), Some(3), "{}", text(&same_pod));
    let retry = finish(with_job(&["sync"], "billsync-29412345").spawn().unwrap()).await;
    let output = text(&retry);
    assert_eq!(retry.status.code(), Some(4), "{output}");
    assert!(
        output.contains("taking over the run lock of an earlier attempt of this Job"),
        "{output}"
    );
    assert!(!world.lago.events().is_empty(), "the retry synced");
}

/// `ledger vacuum` rewrites the whole file (SQLite's VACUUM holds the write lock throughout):
/// beside a sync it would make the sync's writes time out (exit 1, retried by the Job) or
/// itself fail half-way. Like `set-cursor`, it takes the run lock, so beside a run it exits 3
/// and changes nothing; `--dry-run` only counts and needs no lock.
#[tokio::test(flavor = "multi_thread")]
async fn ledger_vacuum_beside_a_running_sync_exits_locked_and_prunes_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    // Send times are stored to the second: let "older than 0s" include them.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let ledger_path = world.dir.path().join("ledger").join("ledger.db");
    let ledger = billsync::ledger::Ledger::open(&ledger_path).await.unwrap();
    ledger
        .acquire_lock(
            "billsync@cronjob-pod:1",
            chrono::Utc::now(),
            Duration::from_secs(900),
        )
        .await
        .unwrap();

    let dry = run(
        &cfg,
        &["ledger", "vacuum", "--older-than", "0s", "--dry-run"],
    )
    .await;
    assert_eq!(dry.status.code(), Some(0), "{}", text(&dry));
    assert!(text(&dry).contains("would prune 79"), "{}", text(&dry));

    let vacuum = run(&cfg, &["ledger", "vacuum", "--older-than", "0s"]).await;
    let output = text(&vacuum);
    assert_eq!(vacuum.status.code(), Some(3), "{output}");
    assert!(output.contains("holds the ledger lock"), "{output}");
    let still = run(
        &cfg,
        &["ledger", "vacuum", "--older-than", "0s", "--dry-run"],
    )
    .await;
    assert!(text(&still).contains("would prune 79"), "{}", text(&still));

    // Once the run is over, it prunes, and leaves the lock free.
    ledger.release_lock("billsync@cronjob-pod:1").await.unwrap();
    let vacuum = run(&cfg, &["ledger", "vacuum", "--older-than", "0s"]).await;
    assert_eq!(vacuum.status.code(), Some(0), "{}", text(&vacuum));
    assert!(text(&vacuum).contains("pruned 79"), "{}", text(&vacuum));
    assert!(text(&vacuum).contains("gave back "), "{}", text(&vacuum));
    let status = run(&cfg, &["status"]).await;
    assert!(text(&status).contains("lock: free"), "{}", text(&status));
}

/// On a bad day `status` must say why records are held, not only how many: every distinct
/// reason (largest groups first), not just the oldest record's. Here two gaps in the mappings
/// (MetalSoft reservation installments, and subnets once their rule is gone) hold records for
/// two different reasons.
#[tokio::test(flavor = "multi_thread")]
async fn status_lists_held_records_by_reason_not_only_the_oldest_one() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let metalsoft = world.dir.path().join("mappings").join("metalsoft.yaml");
    let text_of = std::fs::read_to_string(&metalsoft).unwrap();
    let cut = text_of
        .find("  # Subnets are free")
        .expect("the subnets rule");
    std::fs::write(&metalsoft, &text_of[..cut]).unwrap();
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let status = run(&cfg, &["status"]).await;
    let output = text(&status);
    assert_eq!(status.status.code(), Some(0), "{output}");
    for gap in [
        "resource_type=subnet",
        "resource_type=reservation_installment",
    ] {
        let line = output
            .lines()
            .find(|l| l.contains(gap) && l.contains("unmapped") && l.contains("no rule matches"));
        assert!(line.is_some(), "no held line naming {gap}:\n{output}");
    }
}

/// With two sinks, each sink's pushed counts are its own: a sink that received nothing reports
/// 0, not the run's totals (an alert on `billsync_records_rejected{sink=…}` must point at the
/// sink that refused the records).
#[tokio::test(flavor = "multi_thread")]
async fn pushed_metrics_count_each_sinks_records_separately() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&gateway)
        .await;
    let world = World::start(Behaviour::Postgres).await;
    let files = world.dir.path().join("files");
    let cfg = setup(
        &world,
        &format!(
            "  files:\n    kind: jsonl\n    directory: {}\ndefault_sink: lago\nmetrics:\n  pushgateway_url: {}\n",
            files.display(),
            gateway.uri()
        ),
    );
    let out = run(&cfg, &["sync"]).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let requests = gateway.received_requests().await.unwrap();
    let body = String::from_utf8_lossy(&requests[0].body).into_owned();
    for line in [
        "billsync_records_sent{sink=\"lago\"} 71\n",
        "billsync_records_sent{sink=\"files\"} 0\n",
        "billsync_records_failed{sink=\"files\"} 0\n",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
}

/// A ledger written by a newer billsync (an image rolled back under a ledger the newer one
/// upgraded) is a deployment mismatch: running the same image again cannot fix it. Exit 1 is
/// retried by the CronJob's Job (`backoffLimit`) and reads as a passing fault; exit 2
/// (configuration) fails the Job at once, and nothing is pulled or sent either way.
#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_written_by_a_newer_billsync_exits_2_as_a_deployment_error_not_a_retryable_1() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let path = world.dir.path().join("ledger").join("ledger.db");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let ledger = billsync::ledger::Ledger::open(&path).await.unwrap();
    ledger.close().await;
    {
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time)
             VALUES (9999, 'from the future', 1, x'00', 0)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    for args in [&["sync"][..], &["status"][..]] {
        let out = run(&cfg, args).await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {output}");
        assert!(output.contains("newer billsync"), "{args:?}: {output}");
    }
    assert_eq!(world.metalsoft.request_count(), 0, "nothing was pulled");
    assert!(world.lago.events().is_empty(), "nothing was sent");
}

/// A ledger of an older schema, opened by a command that does not upgrade it (`status`,
/// `ledger …`, `mappings explain --id`: a newer image's one-off command beside the CronJob's
/// older image), is the same deployment mismatch as a newer one: running the same command again
/// cannot help, so it exits 2 like a newer ledger, not the retried exit 1.
#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_of_an_older_schema_opened_by_a_reading_command_exits_2_not_a_retryable_1() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let path = world.dir.path().join("ledger").join("ledger.db");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let ledger = billsync::ledger::Ledger::open(&path).await.unwrap();
    ledger.close().await;
    {
        // The newest migration not applied yet: the ledger of the billsync before this one.
        use sqlx::Connection;
        let mut conn = sqlx::SqliteConnection::connect(&format!("sqlite://{}", path.display()))
            .await
            .unwrap();
        sqlx::query(
            "DELETE FROM _sqlx_migrations
             WHERE version = (SELECT MAX(version) FROM _sqlx_migrations)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
    }
    for args in [
        &["status"][..],
        &["ledger", "export"][..],
        &[
            "ledger",
            "set-cursor",
            "--source",
            "metalsoft",
            "--stream",
            "usage",
            "--value",
            "2026-10-01T00:00:00Z",
            "--reason",
            "re-read October",
        ][..],
        &["ledger", "vacuum", "--older-than", "400d"][..],
        &["mappings", "explain", "--id", "1"][..],
    ] {
        let out = run(&cfg, args).await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {output}");
        assert!(
            output.contains("this billsync knows up to"),
            "{args:?}: {output}"
        );
    }
}

/// The Pushgateway takes the grouping key from the URL path: a `/` in the job name or the
/// instance would split it into other labels (or a 404), and a space or `%` would be read as
/// something else. Values are escaped as its README says: base64url (`job@base64/…`) for a
/// value with a `/`, percent-encoding otherwise.
#[tokio::test(flavor = "multi_thread")]
async fn pushgateway_job_and_instance_with_slashes_and_spaces_are_escaped_in_the_push_path() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&gateway)
        .await;
    for (job, instance, path) in [
        (
            "billing/eu",
            Some("eu west"),
            "/metrics/job@base64/YmlsbGluZy9ldQ==/instance/eu%20west",
        ),
        (
            "billsync",
            Some("eu-west/1"),
            "/metrics/job/billsync/instance@base64/ZXUtd2VzdC8x",
        ),
        ("bill sync%", None, "/metrics/job/bill%20sync%25"),
    ] {
        let settings: billsync::observe::MetricsSettings = serde_yaml_ng::from_str(&format!(
            "pushgateway_url: {}\njob: {job:?}\n{}",
            gateway.uri(),
            instance
                .map(|i| format!("instance: {i:?}\n"))
                .unwrap_or_default()
        ))
        .unwrap();
        gateway.reset().await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&gateway)
            .await;
        billsync::observe::push_metrics(&settings, "sync", "billsync_up 1\n".into())
            .await
            .unwrap();
        let paths: Vec<String> = gateway
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| r.url.path().to_string())
            .collect();
        assert_eq!(paths, [path], "job {job:?}, instance {instance:?}");
    }
}

/// A replay is not the hourly sync: pushed into the sync's group it would set
/// `billsync_last_success_timestamp_seconds` (hiding a failing sync CronJob from the alert on
/// that age), overwrite the sync's outcome and per-sink figures, and replace the sync's
/// `billsync_records_pulled` with an empty family. It pushes to a group of its own
/// (`…/command/replay`) with only what describes the replay itself (its late records included).
#[tokio::test(flavor = "multi_thread")]
async fn a_replay_pushes_its_metrics_to_its_own_group_and_leaves_the_syncs_untouched() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&gateway)
        .await;
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(
        &world,
        &format!("metrics:\n  pushgateway_url: {}\n", gateway.uri()),
    );
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let replay = run(
        &cfg,
        &["replay", "--status", "unmapped", "--reason", "rule fixed"],
    )
    .await;
    assert!(
        matches!(replay.status.code(), Some(0 | 4)),
        "{}",
        text(&replay)
    );
    let requests = gateway.received_requests().await.unwrap();
    let paths: Vec<&str> = requests.iter().map(|r| r.url.path()).collect();
    assert_eq!(
        paths,
        [
            "/metrics/job/billsync",
            "/metrics/job/billsync/command/replay"
        ]
    );
    let body = String::from_utf8_lossy(&requests[1].body).into_owned();
    for line in [
        "billsync_run_outcome{outcome=",
        "billsync_run_duration_seconds ",
        "billsync_records_sent{sink=\"lago\"} ",
        // Its late records, as a sync's: the records it sends may be for finalized periods.
        "billsync_records_late{source=\"metalsoft_test\",provider=\"metalsoft\"} ",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    for sync_only in [
        "billsync_last_success_timestamp_seconds",
        "billsync_records_pulled",
        "billsync_cursor_lag_seconds",
        "billsync_records_undelivered",
    ] {
        assert!(
            !body.contains(sync_only),
            "a replay pushes no {sync_only}:\n{body}"
        );
    }
}

/// A run that ends in an error (the ledger locked by another run: exit 3; a ledger that cannot
/// be opened: exit 1) still pushes its outcome and duration: otherwise
/// `billsync_run_outcome` keeps showing the run before, and an alert on the outcome never
/// fires. It never pushes `billsync_last_success_timestamp_seconds`, so the alert on its age
/// does.
#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_fails_with_an_error_still_pushes_its_outcome_but_no_last_success() {
    use wiremock::matchers::method;
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let gateway = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200))
        .mount(&gateway)
        .await;
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(
        &world,
        &format!("metrics:\n  pushgateway_url: {}\n", gateway.uri()),
    );
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let ledger_path = world.dir.path().join("ledger").join("ledger.db");
    let ledger = billsync::ledger::Ledger::open(&ledger_path).await.unwrap();
    ledger
        .acquire_lock(
            "billsync@other-pod:1",
            chrono::Utc::now(),
            Duration::from_secs(900),
        )
        .await
        .unwrap();
    let locked = run(&cfg, &["sync"]).await;
    assert_eq!(locked.status.code(), Some(3), "{}", text(&locked));
    ledger.close().await;

    // A ledger that is not a database (a wrong volume, a damaged file): exit 1.
    for f in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
        let _ = std::fs::remove_file(world.dir.path().join("ledger").join(f));
    }
    std::fs::write(&ledger_path, vec![b'x'; 8192]).unwrap();
    let broken = run(&cfg, &["sync"]).await;
    assert_eq!(broken.status.code(), Some(1), "{}", text(&broken));

    let requests = gateway.received_requests().await.unwrap();
    assert_eq!(requests.len(), 3, "one push per run");
    for (request, outcome) in requests[1..].iter().zip(["locked", "failed"]) {
        assert_eq!(request.url.path(), "/metrics/job/billsync");
        let body = String::from_utf8_lossy(&request.body).into_owned();
        let line = format!("billsync_run_outcome{{outcome=\"{outcome}\"}} 1\n");
        assert!(body.contains(&line), "missing {line:?} in\n{body}");
        assert!(body.contains("billsync_run_duration_seconds "), "{body}");
        assert!(
            !body.contains("billsync_last_success_timestamp_seconds"),
            "a failed run pushes no last success:\n{body}"
        );
    }
}

/// `reconcile` only reads the ledger. Pointed at a path where there is none (a typo in
/// `ledger.path`, a volume not mounted, `BILLSYNC__LEDGER__PATH` left from another shell) while
/// Lago holds the month's events, it used to create an empty ledger there, find nothing to
/// compare and say "every difference is explained" with exit 0: the check before invoices close
/// passed on nothing. Like `status`, it now fails naming the file, and creates nothing.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_of_a_missing_ledger_fails_naming_it_and_creates_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    assert!(!world.lago.events().is_empty());
    let elsewhere = world.dir.path().join("nowhere");
    let ledger = elsewhere.join("ledger.db");
    let out = finish(
        command(&cfg, &["reconcile", "--period", "2026-10"])
            .env("BILLSYNC__LEDGER__PATH", &ledger)
            .spawn()
            .unwrap(),
    )
    .await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(1), "{output}");
    assert!(
        output.contains(&ledger.display().to_string()) && output.contains("does not exist"),
        "names the missing ledger: {output}"
    );
    assert!(
        !output.contains("every difference is explained"),
        "{output}"
    );
    assert!(!elsewhere.exists(), "created {}", elsewhere.display());
}

/// Only `sync` and `replay` upgrade a ledger's schema. A newer image's `reconcile` run beside
/// the CronJob's older image used to migrate the ledger, after which the older image refused it
/// (exit 2 every hour, nothing billed until the rollout). Like `status`, it now refuses a ledger
/// of an older schema with exit 2 and leaves it at its schema.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_of_a_ledger_of_an_older_schema_exits_2_and_does_not_upgrade_it() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let path = world.dir.path().join("ledger").join("ledger.db");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // The first schema only: the ledger of an older billsync.
    let pool = old_ledger::at_schema_0001(&path).await;
    pool.close().await;
    assert_eq!(newest_migration(&path).await, 1);
    let out = run(&cfg, &["reconcile", "--period", "2026-10"]).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(2), "{output}");
    assert!(output.contains("this billsync knows up to"), "{output}");
    assert_eq!(
        newest_migration(&path).await,
        1,
        "reconcile upgraded the ledger"
    );
}

/// `reconcile` reads the ledger and reads back the sinks; it pulls nothing and maps nothing.
/// Run where only the invoicing system's key is at hand (a billing engineer's shell, a
/// read-only Job without the providers' secrets or the mapping files), it used to fail on the
/// first provider secret it could not resolve (exit 2). It now needs only the ledger and the
/// sinks' settings.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_needs_neither_the_providers_secrets_nor_the_mapping_files() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    std::fs::remove_dir_all(world.dir.path().join("mappings")).unwrap();
    let out = finish(
        command(&cfg, &["reconcile", "--period", "2026-10"])
            .env_remove("TEST_MS_KEY")
            .spawn()
            .unwrap(),
    )
    .await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(0), "{output}");
    assert!(output.contains("every difference is explained"), "{output}");
}

/// Records sent to a sink the settings no longer configure (renamed `lago` → `lago_eu`, same
/// Lago) cannot be read back. `reconcile` used to skip them silently and exit 0, even with an
/// event Lago had lost meanwhile. It now reports a read-back error naming the sink and how many
/// sent records were not read back, and exits 1 like any sink not read back (the check did not
/// complete; 7 is kept for a difference found in what was read back).
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_of_records_sent_to_a_sink_no_longer_configured_is_not_reconciled() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    let sent = world.lago.events().len();
    let lost = world.lago.events()[0].transaction_id.clone();
    world.lago.delete_event(&lost);
    let settings = std::fs::read_to_string(&cfg).unwrap();
    assert!(settings.contains("\n  lago:\n"));
    std::fs::write(&cfg, settings.replace("\n  lago:\n", "\n  lago_eu:\n")).unwrap();
    let out = run(&cfg, &["reconcile", "--period", "2026-10"]).await;
    let output = text(&out);
    assert_eq!(out.status.code(), Some(1), "{output}");
    assert!(
        output.contains(&format!(
            "sink lago of {sent} sent records is not configured: not read back"
        )),
        "{output}"
    );
    assert!(
        !output.contains("every difference is explained"),
        "{output}"
    );
}

/// Lago's `GET /api/v1/events` answers every read-back with a long HTML error page (501, a
/// proxy in front of Lago): nothing could be read back, nothing is known to differ. It used to
/// exit 7, the code for "money differs", and print the whole page once per subscription and
/// metric (11 times here). Now it exits 1 (the check did not complete), the error is printed
/// once for the sink, on one line and cut short, in the table and as a `(read-back failed)`
/// row of the CSV. When Lago can be read for all but one subscription and metric, and among
/// those an event was lost, 7 wins: money first.
#[tokio::test(flavor = "multi_thread")]
async fn reconcile_that_cannot_read_lago_back_exits_1_printing_its_error_once_and_7_when_money_differs_too(
) {
    use wiremock::matchers::{method, path, query_param};
    use wiremock::{Mock, MockServer, ResponseTemplate};
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    assert_eq!(run(&cfg, &["sync"]).await.status.code(), Some(4));
    let page = format!(
        "<!DOCTYPE html>\n<html>\n<head><title>501 Not Implemented</title></head>\n<body>\n{}\n<p>END-OF-PAGE</p></body>\n</html>\n",
        "<p>The gateway does not implement this route.</p>\n".repeat(20)
    );
    let error_page = || ResponseTemplate::new(501).set_body_string(page.clone());
    let settings = std::fs::read_to_string(&cfg).unwrap();
    let point_at = |url: &str| {
        let to = settings.replace(
            &format!("api_url: {}", world.lago.url),
            &format!("api_url: {url}"),
        );
        assert_ne!(to, settings);
        std::fs::write(&cfg, to).unwrap();
    };

    // Nothing can be read back.
    let down = MockServer::start().await;
    Mock::given(method("GET"))
        .respond_with(error_page())
        .mount(&down)
        .await;
    point_at(&down.uri());
    // The report (stdout; the retries' warnings on stderr name each attempt's answer).
    let out = run(&cfg, &["reconcile", "--period", "2026-10"]).await;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert_eq!(report.matches("<title>").count(), 1, "{report}");
    assert_eq!(report.matches("read-back failed").count(), 1, "{report}");
    assert!(!report.contains("END-OF-PAGE"), "cut short: {report}");
    assert!(
        !report.contains("every difference is explained"),
        "{report}"
    );
    let out = run(
        &cfg,
        &["reconcile", "--period", "2026-10", "--format", "csv"],
    )
    .await;
    let csv = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let failed: Vec<&str> = csv
        .lines()
        .filter(|l| l.starts_with("(read-back failed),"))
        .collect();
    assert_eq!(failed.len(), 1, "{csv}");
    assert!(
        failed[0].contains(",lago,") && failed[0].contains("HTTP 501"),
        "{csv}"
    );
    assert_eq!(csv.matches("<title>").count(), 1, "{csv}");

    // Every subscription and metric but one is read back (Lago's events, less a lost one);
    // the other answers the error page.
    let mut events = world.lago.events();
    let failing = (
        events[0].external_subscription_id.clone(),
        events[0].code.clone(),
    );
    let lost = events
        .iter()
        .find(|e| (&e.external_subscription_id, &e.code) != (&failing.0, &failing.1))
        .unwrap()
        .transaction_id
        .clone();
    events.retain(|e| e.transaction_id != lost);
    let partly = MockServer::start().await;
    let mut groups: std::collections::BTreeMap<(String, String), Vec<serde_json::Value>> =
        Default::default();
    for e in &events {
        groups
            .entry((e.external_subscription_id.clone(), e.code.clone()))
            .or_default()
            .push(serde_json::to_value(e).unwrap());
    }
    for ((subscription, code), list) in groups {
        let answer = if (&subscription, &code) == (&failing.0, &failing.1) {
            error_page()
        } else {
            assert!(list.len() <= 100, "one page");
            ResponseTemplate::new(200).set_body_json(serde_json::json!({
                "events": list,
                "meta": {"current_page": 1, "next_page": null, "total_count": list.len()}
            }))
        };
        Mock::given(method("GET"))
            .and(path("/api/v1/events"))
            .and(query_param(
                "external_subscription_id",
                subscription.as_str(),
            ))
            .and(query_param("code", code.as_str()))
            .respond_with(answer)
            .mount(&partly)
            .await;
    }
    point_at(&partly.uri());
    let out = run(&cfg, &["reconcile", "--period", "2026-10"]).await;
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(7), "{}", text(&out));
    assert!(report.contains(&lost), "{report}");
    assert_eq!(report.matches("<title>").count(), 1, "{report}");
}

/// `billsync ledger mark-delivered --key K --reason R`: a rejected record found in the sink is
/// recorded as delivered (exit 0, nothing sent, the refusal it replaces printed); the same
/// command again, or without a reason, is refused with exit 2 and changes nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_rejected_record_found_in_the_sink_is_marked_delivered_through_the_binary() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let ledger_path = world.dir.path().join("ledger").join("ledger.db");
    let key: String = {
        use sqlx::Connection;
        let mut conn =
            sqlx::SqliteConnection::connect(&format!("sqlite://{}", ledger_path.display()))
                .await
                .unwrap();
        let key: String = sqlx::query_scalar(
            "UPDATE records SET status = 'rejected', last_error = 'HTTP 502 (held back)'
             WHERE id = (SELECT MIN(id) FROM records WHERE status = 'sent' AND provider <> 'period')
             RETURNING idem_key",
        )
        .fetch_one(&mut conn)
        .await
        .unwrap();
        key
    };
    let events = world.lago.events().len();
    let no_reason = run(
        &cfg,
        &["ledger", "mark-delivered", "--key", &key, "--reason", " "],
    )
    .await;
    assert_eq!(no_reason.status.code(), Some(2), "{}", text(&no_reason));
    let marked = run(
        &cfg,
        &[
            "ledger",
            "mark-delivered",
            "--key",
            &key,
            "--reason",
            "found in Lago",
        ],
    )
    .await;
    let output = text(&marked);
    assert_eq!(marked.status.code(), Some(0), "{output}");
    assert!(
        output.contains("marked delivered") && output.contains("HTTP 502 (held back)"),
        "{output}"
    );
    let again = run(
        &cfg,
        &[
            "ledger",
            "mark-delivered",
            "--key",
            &key,
            "--reason",
            "found in Lago",
        ],
    )
    .await;
    assert_eq!(again.status.code(), Some(2), "{}", text(&again));
    assert!(
        text(&again).contains("its status is `sent`"),
        "{}",
        text(&again)
    );
    assert_eq!(world.lago.events().len(), events, "nothing sent");
}

/// A backlog that takes a while to push (Lago limits requests per second) is pushed alongside
/// the pull, which has long ended: the push logs its `progress` (records of `push lago`, done
/// out of total) at most every `BILLSYNC_PROGRESS_EVERY` (10 s by default, 1 s here), so a
/// CronJob's log tells a slow push from a stalled one. The pull's own lines keep their figures
/// (windows, never the push's records).
#[tokio::test(flavor = "multi_thread")]
async fn a_long_push_alongside_the_pull_logs_its_progress() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    world.lago.set_rate_limit(Some(2));
    let mut sync = command(&cfg, &["--log-format", "json", "sync"]);
    sync.env("BILLSYNC_PROGRESS_EVERY", "1s")
        .env("BILLSYNC__SINKS__LAGO__BATCH_SIZE", "5")
        .env("BILLSYNC__SINKS__LAGO__RETRY__MAX_DELAY", "2s");
    let started = std::time::Instant::now();
    let out = finish(sync.spawn().unwrap()).await;
    let took = started.elapsed();
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    assert_eq!(world.lago.events().len(), 71, "{}", text(&out));
    assert!(took > Duration::from_secs(3), "the push took only {took:?}");
    let progress: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["message"] == "progress")
        .collect();
    let push: Vec<&serde_json::Value> = progress
        .iter()
        .filter(|l| l["phase"] == "push lago")
        .collect();
    assert!(
        !push.is_empty(),
        "no push progress in a {took:?} run: {}",
        text(&out)
    );
    for line in &push {
        assert_eq!(line["unit"], "records", "{line}");
        let (done, total) = (
            line["done"].as_u64().unwrap(),
            line["total"].as_u64().unwrap(),
        );
        assert!(0 < done && done <= total && total <= 71, "{line}");
    }
    for line in progress.iter().filter(|l| l["phase"] != "push lago") {
        assert_eq!(line["phase"], "pull metalsoft_test", "{line}");
        assert_eq!(line["unit"], "windows", "{line}");
    }
}

/// A dry run reports what the ledger holds: one record held (unmapped) by an earlier sync is
/// `undelivered in ledger: 1` in the summary of `sync --dry-run` and of `replay --dry-run` (as
/// text and as JSON), not 0; and the dry runs still change nothing.
#[tokio::test(flavor = "multi_thread")]
async fn a_dry_runs_summary_counts_what_the_ledger_holds_undelivered() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    assert!(
        String::from_utf8_lossy(&sync.stdout).contains("undelivered in ledger: 1"),
        "{}",
        text(&sync)
    );
    let sent = world.lago.events().len();
    let replay = [
        "replay",
        "--status",
        "unmapped",
        "--reason",
        "check",
        "--dry-run",
    ];
    for args in [&["sync", "--dry-run"][..], &replay[..]] {
        let out = run(&cfg, args).await;
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("undelivered in ledger: 1"),
            "{args:?}: {stdout}"
        );
        let mut json = Command::new(env!("CARGO_BIN_EXE_billsync"));
        json.args(["--config", &cfg, "--output", "json"])
            .args(args)
            .env("TEST_MS_KEY", MS_SECRET)
            .env("TEST_LAGO_KEY", LAGO_SECRET)
            .env_remove("BILLSYNC_CONFIG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let json = finish(json.spawn().unwrap()).await;
        assert_eq!(json.status.code(), Some(0), "{args:?}: {}", text(&json));
        let summary: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(summary["dry_run"], true, "{summary}");
        assert_eq!(summary["undelivered"], 1, "{args:?}: {summary}");
    }
    assert_eq!(world.lago.events().len(), sent, "a dry run sent something");
    let status = run(&cfg, &["status", "--by-source"]).await;
    assert!(
        String::from_utf8_lossy(&status.stdout).contains("metalsoft_test unmapped: 1"),
        "{}",
        text(&status)
    );
}

/// A CronJob's log collector that goes away, or `billsync sync 2>&1 >/dev/null | head -1`,
/// closes standard error under a running sync. Each log line then fails with a broken pipe;
/// tracing-subscriber reported that with `eprintln!`, which panicked on the same closed pipe:
/// the run died (exit 101) between a request and its acknowledgement, its lock stayed held for
/// `lock_ttl` and the next sync exited 3. Logs that cannot be written are now dropped: the run
/// ends with its own exit code and releases its lock, in JSON and in text.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_whose_stderr_reader_has_gone_ends_with_its_own_code_and_releases_the_lock() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    for format in ["json", "text"] {
        // A pipe whose reader is closed before the run writes its first line.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let mut sync = command(&cfg, &["--log-format", format, "sync"]);
        sync.stderr(writer);
        let out = finish(sync.spawn().unwrap()).await;
        drop(sync);
        assert_eq!(
            out.status.code(),
            Some(4),
            "{format}: the run's own exit code: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let status = run(&cfg, &["status"]).await;
        let output = text(&status);
        assert!(
            output.lines().any(|l| l.starts_with("lock: free")),
            "{format}: {output}"
        );
        assert!(!output.contains("running or crashed"), "{format}: {output}");
    }
    let next = run(&cfg, &["sync"]).await;
    assert_eq!(next.status.code(), Some(4), "{}", text(&next));
    assert_eq!(world.lago.events().len(), 71);
    assert!(world.lago.counts().values().all(|&n| n == 1));
}

/// The README promises that a held record is a WARN: a sync that held new records as unmapped
/// (a resource type no rule maps yet, here MetalSoft's traffic and storage) used to log no
/// WARN at all, so a CronJob's log alerts never saw revenue left unbilled. It now logs one
/// WARN per source and run, not one per record, with how many it held and the first one's
/// key and reason; a run that holds nothing new logs none.
#[tokio::test(flavor = "multi_thread")]
async fn a_sync_that_holds_unmapped_records_logs_one_warn_per_source_with_the_count() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let rules = world.dir.path().join("mappings").join("metalsoft.yaml");
    let text_of = std::fs::read_to_string(&rules).unwrap();
    let cut = text_of.find("  # Traffic").expect("the traffic rule");
    std::fs::write(&rules, &text_of[..cut]).unwrap();
    let sync = |cfg: String| async move {
        let mut cmd = command(&cfg, &["--log-format", "json", "sync"]);
        cmd.args(["--output", "json"]);
        finish(cmd.spawn().unwrap()).await
    };
    let held_warnings = |out: &Output| -> Vec<serde_json::Value> {
        String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| {
                l["level"] == "WARN"
                    && l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("records held as unmapped"))
            })
            .collect()
    };
    let out = sync(cfg.clone()).await;
    assert_eq!(out.status.code(), Some(4), "{}", text(&out));
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let held = summary["staged_by_status"]["unmapped"].as_u64().unwrap();
    assert!(held > 1, "{summary}");
    let warnings = held_warnings(&out);
    assert_eq!(
        warnings.len(),
        1,
        "one WARN, not one per record: {warnings:?}"
    );
    let warn = &warnings[0];
    assert_eq!(warn["source"], "metalsoft_test", "{warn}");
    assert_eq!(warn["records"], held, "{warn}");
    assert!(
        warn["first_key"].as_str().is_some_and(|k| !k.is_empty()),
        "{warn}"
    );
    assert!(
        warn["first_reason"].as_str().is_some_and(|r| !r.is_empty()),
        "{warn}"
    );
    assert_eq!(warn["span"]["command"], "sync", "{warn}");

    // Nothing new held: nothing to warn about (`status` keeps listing what is held).
    let again = sync(cfg.clone()).await;
    assert_eq!(again.status.code(), Some(4), "{}", text(&again));
    assert_eq!(held_warnings(&again), Vec::<serde_json::Value>::new());
}

/// `status` and the `ledger` commands only work on the ledger: run where the secrets are not
/// at hand (a billing engineer's shell, a read-only Job), they used to fail on the first
/// provider or sink secret they could not resolve (exit 2, "environment variable … is not
/// set") before reading a thing. They now read only the ledger's settings (and the Stripe
/// sinks' `max_age`, for `status`), and work without any secret.
#[tokio::test(flavor = "multi_thread")]
async fn status_and_the_ledger_commands_need_no_secret() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world, "");
    let sync = run(&cfg, &["sync"]).await;
    assert_eq!(sync.status.code(), Some(4), "{}", text(&sync));
    let without_secrets = |args: &'static [&'static str]| {
        let mut cmd = command(&cfg, args);
        cmd.env_remove("TEST_MS_KEY").env_remove("TEST_LAGO_KEY");
        finish(cmd.spawn().unwrap())
    };
    let set_cursor: &[&str] = &[
        "ledger",
        "set-cursor",
        "--source",
        "metalsoft_test",
        "--stream",
        "user:1",
        "--value",
        "2026-10-01T00:00:00Z",
        "--reason",
        "re-read October",
    ];
    for (args, code, says) in [
        (&["status"][..], 0, "lock: free"),
        (&["status", "--by-source"][..], 0, "metalsoft_test sent: 71"),
        (&["ledger", "export"][..], 0, "metalsoft_test"),
        (
            &["ledger", "changes"][..],
            0,
            "no change of a sent record waits",
        ),
        (
            &["ledger", "vacuum", "--older-than", "400d", "--dry-run"][..],
            0,
            "would prune 0",
        ),
        (set_cursor, 0, "→ 2026-10-01T00:00:00Z"),
        // Refused for what they are asked, not for a secret.
        (
            &[
                "ledger",
                "mark-delivered",
                "--key",
                "no-such-key",
                "--reason",
                "seen",
            ][..],
            2,
            "no-such-key",
        ),
        (
            &[
                "ledger",
                "resolve",
                "--change",
                "999",
                "--keep-sent",
                "--reason",
                "kept",
            ][..],
            2,
            "999",
        ),
        // Explaining a ledger record reads the ledger and the mapping files only.
        (&["mappings", "explain", "--id", "1"][..], 0, "metalsoft"),
    ] {
        let out = without_secrets(args).await;
        let output = text(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {output}");
        assert!(output.contains(says), "{args:?}: {output}");
        assert!(!output.contains("is not set"), "{args:?}: {output}");
    }
}
