//! The SAKURA provider inside the real pipeline (ledger, Lago simulator): a provisional month is
//! staged as provisional, a changed line is restaged under the same key, and once the month is
//! final and staged a further run stages nothing new; a final month whose lines miss its bill
//! keeps the cursor (and shows in the cursor lag metric), and a bill SAKURA lists late is found
//! by the look-back and sent once.

use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::Ledger;
use billsync::mapping::MappingSet;
use billsync::providers::sakura::{SakuraConfig, SakuraProvider};
use billsync::simulators::lago::{LagoSim, LagoSimConfig};
use billsync::simulators::sakura::{SakuraDataset, SakuraSim};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::{Pipeline, SyncOptions};
use chrono::{DateTime, Utc};
use rust_decimal::Decimal;

fn t(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text)
        .unwrap()
        .with_timezone(&Utc)
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

#[tokio::test]
async fn provisional_month_is_restaged_when_it_changes_and_final_months_read_again_stage_nothing() {
    let sim = SakuraSim::start(SakuraDataset::from_fixtures().unwrap(), "tok", "sec")
        .await
        .unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = |sim_endpoint: String, lago_url: String| {
        let path = dir.path().join("ledger.db");
        async move {
            let mut cfg = SakuraConfig::new(
                sim_endpoint,
                Secret::new("tok"),
                Secret::new("sec"),
                "2016-05".parse().unwrap(),
            );
            cfg.retry = retry();
            Pipeline::new(
                Ledger::open(&path).await.unwrap(),
                vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
                vec![Box::new(
                    LagoSink::new(
                        "lago".into(),
                        LagoConfig {
                            api_url: lago_url,
                            api_key: Secret::new("lago-key"),
                            batch_size: 25,
                            timeout: Duration::from_secs(5),
                            retry: retry(),
                        },
                    )
                    .unwrap(),
                )],
                MappingSet::from_sources(&[]).unwrap(),
            )
        }
    };
    let sync = |now: DateTime<Utc>| SyncOptions {
        now: Some(now),
        ..Default::default()
    };

    // Mid-June 2016: May is final (3 lines), June provisional (3 lines).
    let p = pipeline(sim.endpoint.clone(), lago.url.clone()).await;
    let s = p.sync(&sync(t("2016-06-15T00:00:00Z"))).await.unwrap();
    assert_eq!((s.pulled, s.new), (6, 6), "{s:?}");

    // Same day, nothing changed: June is pulled again, May too (the look-back reads the final
    // months up to the cursor again, for bills SAKURA lists late); both are unchanged.
    let s = p.sync(&sync(t("2016-06-15T00:00:00Z"))).await.unwrap();
    assert_eq!((s.pulled, s.new, s.unchanged), (6, 0, 6), "{s:?}");

    // June's ISO line changes: same key, restaged, not new.
    sim.set_detail_amount(13481639, 2, Decimal::from(200), Decimal::from(16))
        .unwrap();
    let s = p.sync(&sync(t("2016-06-16T00:00:00Z"))).await.unwrap();
    assert_eq!(
        (s.pulled, s.new, s.unchanged, s.restaged),
        (6, 0, 5, 1),
        "{s:?}"
    );

    // July: June becomes final (restaged as final); after that the final months read again
    // stage nothing.
    let s = p.sync(&sync(t("2016-07-05T00:00:00Z"))).await.unwrap();
    assert_eq!((s.pulled, s.new, s.restaged), (6, 0, 3), "{s:?}");
    let s = p.sync(&sync(t("2016-07-06T00:00:00Z"))).await.unwrap();
    assert_eq!(
        (s.pulled, s.new, s.unchanged, s.restaged),
        (6, 0, 6, 0),
        "{s:?}"
    );
}

/// A pipeline on `ledger` (a path) reading `sim` with the example mappings, sending to `lago`.
fn mapped_pipeline(
    ledger: Ledger,
    sim_endpoint: &str,
    lago_url: &str,
    start_month: &str,
) -> Pipeline {
    let mut cfg = SakuraConfig::new(
        sim_endpoint.to_string(),
        Secret::new("tok"),
        Secret::new("sec"),
        start_month.parse().unwrap(),
    );
    cfg.retry = retry();
    Pipeline::new(
        ledger,
        vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
        vec![Box::new(
            LagoSink::new(
                "lago".into(),
                LagoConfig {
                    api_url: lago_url.to_string(),
                    api_key: Secret::new("lago-key"),
                    batch_size: 25,
                    timeout: Duration::from_secs(5),
                    retry: retry(),
                },
            )
            .unwrap(),
        )],
        MappingSet::examples().unwrap(),
    )
}

#[tokio::test]
async fn a_held_month_keeps_the_ledger_cursor_and_a_late_bill_is_sent_once_nothing_twice() {
    const MAY_BILL: u64 = 13327977;
    let sim = SakuraSim::start(SakuraDataset::from_fixtures().unwrap(), "tok", "sec")
        .await
        .unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut p = mapped_pipeline(
        Ledger::open(&path).await.unwrap(),
        &sim.endpoint,
        &lago.url,
        "2016-05",
    );
    // A final month normally reaches the sinks within final_lag (1 day) and a run (1 hour)
    // of its end (what `billsync sync` sets from the settings); later records are flagged.
    p.late_after.insert(
        "sakura".into(),
        chrono::Duration::days(1) + chrono::Duration::hours(1),
    );
    let late_of = |s: &billsync::sync::RunSummary| s.sources["sakura"].late;
    let sync = |now: &str| SyncOptions {
        now: Some(t(now)),
        ..Default::default()
    };
    let cursor = || async {
        Ledger::open(&path)
            .await
            .unwrap()
            .cursors("sakura")
            .await
            .unwrap()
            .get("account:000000526782")
            .cloned()
    };

    // July 2016: May and June are final; May's details miss a line its bill counts.
    sim.withhold_details(MAY_BILL, 1);
    let s = p.sync(&sync("2016-07-05T00:00:00Z")).await.unwrap();
    assert_eq!((s.new, s.sent), (5, 5), "{s:?}");
    assert_eq!(cursor().await, None, "May is held: no cursor passes it");
    // A first run reading months that ended weeks ago (a backfill): every line is late for
    // an invoice of its month that may be finalized.
    assert_eq!(late_of(&s), 5, "{s:?}");

    // The missing line is listed: it alone goes out, and the cursor passes May and June.
    sim.withhold_details(MAY_BILL, 0);
    let s = p.sync(&sync("2016-07-06T00:00:00Z")).await.unwrap();
    assert_eq!((s.new, s.sent), (1, 1), "{s:?}");
    assert_eq!(cursor().await.as_deref(), Some("2016-06"));
    assert_eq!(
        late_of(&s),
        1,
        "May's missing line comes a month late: {s:?}"
    );

    // August: SAKURA lists a second bill for May, which the cursor passed: the look-back reads
    // May again, the new bill's lines go out once, and what was sent is not sent again.
    let mut late = sim
        .dataset()
        .bills
        .into_iter()
        .find(|b| b.bill_id == MAY_BILL)
        .unwrap();
    late.bill_id = 13500001;
    sim.add_bill(late);
    let s = p.sync(&sync("2016-08-05T00:00:00Z")).await.unwrap();
    assert_eq!((s.new, s.sent, s.restaged), (3, 3, 0), "{s:?}");
    assert_eq!(cursor().await.as_deref(), Some("2016-07"));
    // May's late bill is flagged (three months after May ended).
    assert_eq!(late_of(&s), 3, "{s:?}");
    assert_eq!(lago.event_count(), 9);
    let twice: Vec<_> = lago.counts().into_iter().filter(|(_, n)| *n != 1).collect();
    assert!(twice.is_empty(), "sent more than once: {twice:?}");
}

/// A held month must be visible to alerting, not only in the log: the SAKURA cursor (a month)
/// shows in `billsync_cursor_lag_seconds`, counted from the end of its month (JST), so a cursor
/// stuck before a held month shows a lag that keeps growing past a month and `final_lag`.
#[tokio::test]
async fn a_month_cursor_shows_in_the_cursor_lag_metric_so_a_held_month_can_be_alerted_on() {
    const MAY_BILL: u64 = 13327977;
    let sim = SakuraSim::start(SakuraDataset::from_fixtures().unwrap(), "tok", "sec")
        .await
        .unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let p = mapped_pipeline(
        Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
        &sim.endpoint,
        &lago.url,
        "2016-04",
    );
    sim.withhold_details(MAY_BILL, 1);
    let now = t("2016-07-05T00:00:00Z");
    let s = p
        .sync(&SyncOptions {
            now: Some(now),
            ..Default::default()
        })
        .await
        .unwrap();
    let gauges = p.ledger.gauges().await.unwrap();
    let body = billsync::observe::render_metrics(&s, &gauges, None, now, &["lago".to_string()]);
    // The cursor stays at April (May is held): April ended 2016-05-01 00:00 JST, 65 days and
    // 9 hours before now.
    let lag = 65 * 86_400 + 9 * 3_600;
    let line = format!(
        "billsync_cursor_lag_seconds{{source=\"sakura\",stream=\"account:000000526782\"}} {lag}\n"
    );
    assert!(body.contains(&line), "missing {line:?} in\n{body}");
}

/// A month read as soon as it is final (the 1st of the next month, 00:00 JST, + final_lag) is
/// within the source's usual lateness: nothing is flagged late. The same month read a day
/// later than that is.
#[tokio::test]
async fn a_month_read_as_soon_as_it_is_final_is_not_flagged_late() {
    let sim = SakuraSim::start(SakuraDataset::from_fixtures().unwrap(), "tok", "sec")
        .await
        .unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    for (now, expect_late) in [
        // June is final at 2016-07-02 00:00 JST (2016-07-01T15:00Z); read half an hour later.
        ("2016-07-01T15:30:00Z", false),
        // Read a day and a half after that.
        ("2016-07-03T03:30:00Z", true),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let mut p = mapped_pipeline(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            &sim.endpoint,
            &lago.url,
            "2016-06",
        );
        p.late_after.insert(
            "sakura".into(),
            chrono::Duration::days(1) + chrono::Duration::hours(1),
        );
        let s = p
            .sync(&SyncOptions {
                now: Some(t(now)),
                ..Default::default()
            })
            .await
            .unwrap();
        assert!(s.new > 0, "{s:?}");
        let late = s.sources["sakura"].late;
        assert_eq!(late > 0, expect_late, "at {now}: {late} late of {s:?}");
    }
}
