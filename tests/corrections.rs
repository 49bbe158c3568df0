//! Corrections, end to end with SAKURA Cloud: a provisional month pushed early (the source opts
//! in with `push_provisional`) and changed by the provider afterwards yields exactly one
//! correction carrying the exact difference; once the month is final, what Lago holds for it
//! equals the provider's final total to the yen. A sent payload is never overwritten.

use std::str::FromStr;
use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::Ledger;
use billsync::mapping::MappingSet;
use billsync::providers::sakura::{Month, SakuraConfig, SakuraProvider};
use billsync::simulators::lago::{LagoSim, LagoSimConfig};
use billsync::simulators::sakura::{SakuraDataset, SakuraSim};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::{Pipeline, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;

fn at(y: i32, m: u32, d: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, m, d, 12, 0, 0).unwrap()
}

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

#[tokio::test]
async fn a_changed_provisional_sakura_month_yields_one_correction_and_ends_equal_to_the_yen() {
    let october = Month::new(2026, 10).unwrap();
    let november = Month::new(2026, 11).unwrap();
    let sakura = SakuraSim::start(
        SakuraDataset::generate(3, october, 2, 3).unwrap(),
        "tok",
        "sec",
    )
    .await
    .unwrap();
    let lago = LagoSim::start(LagoSimConfig {
        api_key: "lago-key".into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let pipeline = async || {
        let mut cfg = SakuraConfig::new(
            sakura.endpoint.clone(),
            Secret::new("tok"),
            Secret::new("sec"),
            october,
        );
        cfg.push_provisional = true;
        cfg.retry = retry();
        Pipeline::new(
            Ledger::open(&dir.path().join("ledger.db")).await.unwrap(),
            vec![Box::new(SakuraProvider::new("sakura".into(), cfg).unwrap())],
            vec![Box::new(
                LagoSink::new(
                    "lago".into(),
                    LagoConfig {
                        api_url: lago.url.clone(),
                        api_key: Secret::new("lago-key"),
                        batch_size: 100,
                        timeout: Duration::from_secs(5),
                        retry: retry(),
                    },
                )
                .unwrap(),
            )],
            MappingSet::examples().unwrap(),
        )
    };
    let sync_at = |now| SyncOptions {
        now: Some(now),
        ..Default::default()
    };
    let lago_total = |month: Month| -> Decimal {
        lago.events()
            .iter()
            .filter(|e| e.timestamp >= month.start_utc() && e.timestamp < month.end_utc())
            .map(|e| Decimal::from_str(e.properties["amount"].as_str().unwrap()).unwrap())
            .sum()
    };

    // 20 November: October is final, November provisional; both are pushed.
    let first = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 20)))
        .await
        .unwrap();
    assert_eq!(first.sent, 6, "{first:?}");
    assert_eq!(lago_total(november), sakura.dataset().month_total(november));
    let frozen = lago.events();

    // The provider re-states one November line: 1,000 + 100 tax more.
    let bill = sakura.dataset().bills_of(november)[0].clone();
    let line = bill.lines[1].clone();
    let before = line.price_excl_tax + line.tax;
    let (net, tax) = (
        line.price_excl_tax + Decimal::from(1000),
        line.tax + Decimal::from(100),
    );
    sakura
        .set_detail_amount(bill.bill_id, line.index, net, tax)
        .unwrap();

    let second = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 21)))
        .await
        .unwrap();
    assert_eq!(second.corrections, 1, "{second:?}");
    assert_eq!(second.sent, 1, "only the correction goes out");
    let correction = lago
        .events()
        .into_iter()
        .find(|e| e.transaction_id.ends_with(".r1"))
        .expect("a correction event");
    assert_eq!(
        Decimal::from_str(correction.properties["amount"].as_str().unwrap()).unwrap(),
        net + tax - before,
        "the correction carries the exact difference"
    );
    // What was sent before is untouched: same keys, same timestamps, same amounts.
    for e in &frozen {
        let now = lago
            .events()
            .into_iter()
            .find(|x| x.transaction_id == e.transaction_id)
            .unwrap();
        assert_eq!(
            (&now.properties, now.timestamp),
            (&e.properties, e.timestamp)
        );
    }

    // Read again unchanged: nothing new.
    let third = pipeline()
        .await
        .sync(&sync_at(at(2026, 11, 22)))
        .await
        .unwrap();
    assert_eq!((third.sent, third.corrections), (0, 0));

    // December: November is final with the same amounts. No further correction; Lago's
    // November equals the provider's final November to the yen.
    sakura.finalize_month(november);
    let fourth = pipeline()
        .await
        .sync(&sync_at(at(2026, 12, 5)))
        .await
        .unwrap();
    assert_eq!((fourth.sent, fourth.corrections), (0, 0), "{fourth:?}");
    assert_eq!(lago_total(november), sakura.dataset().month_total(november));
    assert_eq!(lago_total(october), sakura.dataset().month_total(october));
    let status = pipeline().await.ledger.status().await.unwrap();
    assert_eq!(status.corrections, 1);
    assert_eq!(status.open_changes, 0);
}
