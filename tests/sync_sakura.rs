//! The SAKURA provider inside the real pipeline (ledger, Lago simulator): a provisional month is
//! staged as provisional, a changed line is restaged under the same key, and once the month is
//! final and staged a further run stages nothing new.

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
async fn provisional_month_is_restaged_when_it_changes_and_final_months_are_not_pulled_again() {
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

    // Same day, nothing changed: only June is pulled again, and it is unchanged.
    let s = p.sync(&sync(t("2016-06-15T00:00:00Z"))).await.unwrap();
    assert_eq!((s.pulled, s.new, s.unchanged), (3, 0, 3), "{s:?}");

    // June's ISO line changes: same key, restaged, not new.
    sim.set_detail_amount(13481639, 2, Decimal::from(200), Decimal::from(16))
        .unwrap();
    let s = p.sync(&sync(t("2016-06-16T00:00:00Z"))).await.unwrap();
    assert_eq!(
        (s.pulled, s.new, s.unchanged, s.restaged),
        (3, 0, 2, 1),
        "{s:?}"
    );

    // July: June becomes final (restaged as final); then only the running month is asked.
    let s = p.sync(&sync(t("2016-07-05T00:00:00Z"))).await.unwrap();
    assert_eq!((s.pulled, s.new), (3, 0), "{s:?}");
    let s = p.sync(&sync(t("2016-07-06T00:00:00Z"))).await.unwrap();
    assert_eq!((s.pulled, s.new), (0, 0), "{s:?}");
}
