//! The SoftLayer provider inside the real pipeline (ledger, Lago simulator), where money is
//! counted: what Lago holds after each run.
//!
//! SoftLayer's `statusCode` says whether SoftLayer was *paid* (`OPEN` = not yet, `CLOSED` =
//! paid, `CLOSED_FAILED` = closed unpaid); an invoice's lines are a copy of the billing items
//! made when the invoice is created, and credits and refunds arrive as invoices of their own
//! (reference `providers.md` 1.7 and 1.9; softlayer-go `Billing_Invoice.StatusCode`,
//! `TypeCode` and `Billing_Invoice_Item`). So an unpaid invoice is billed when it appears, it
//! is read once, and a refund is the one and only adjustment of the line it refunds.

use std::time::Duration;

use billsync::config::Secret;
use billsync::http::RetryPolicy;
use billsync::ledger::Ledger;
use billsync::mapping::MappingSet;
use billsync::providers::softlayer::{SoftlayerConfig, SoftlayerProvider, STREAM_INVOICES};
use billsync::providers::{Chunk, Cursors, Page, Provider, ProviderError};
use billsync::simulators::lago::{LagoSim, LagoSimConfig, LagoSimHandle};
use billsync::simulators::softlayer::{SoftlayerDataset, SoftlayerSim, SoftlayerSimHandle};
use billsync::sinks::lago::{LagoConfig, LagoSink};
use billsync::sync::{Pipeline, SyncOptions};
use chrono::{DateTime, TimeZone, Utc};
use rust_decimal::Decimal;
use serde_json::{json, Value};

const USER: &str = "SL123456";
const KEY: &str = "sl-test-key";
const LAGO_KEY: &str = "lago-test-key";

/// Every SoftLayer invoice line, at cost, on one subscription.
const MAPPING: &str = "version: 1
customers:
  - match: { provider: softlayer }
    external_subscription_id: sub_reseller
rules:
  - name: softlayer-lines
    match: { provider: softlayer, attributes.record_kind: invoice }
    metric: softlayer_cost
    property: amount
    value: { cost: { markup_percent: 0 } }
";

fn retry() -> RetryPolicy {
    RetryPolicy {
        max_retries: 2,
        min_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
    }
}

fn dec(text: &str) -> Decimal {
    text.parse().expect("test decimal")
}

fn now() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 6, 1, 12, 0, 0).unwrap()
}

struct World {
    softlayer: SoftlayerSimHandle,
    lago: LagoSimHandle,
    dir: tempfile::TempDir,
}

impl World {
    async fn start(dataset: SoftlayerDataset) -> World {
        World {
            softlayer: SoftlayerSim::start(dataset, USER, KEY).await.unwrap(),
            lago: LagoSim::start(LagoSimConfig {
                api_key: LAGO_KEY.into(),
                ..Default::default()
            })
            .await
            .unwrap(),
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn provider(&self) -> SoftlayerProvider {
        let mut cfg = SoftlayerConfig::new(self.softlayer.url.clone(), USER, Secret::new(KEY));
        cfg.retry = retry();
        cfg.timeout = Duration::from_secs(5);
        SoftlayerProvider::new("softlayer_test".into(), cfg).unwrap()
    }

    /// A pipeline on the world's ledger, as a fresh process opens it.
    async fn pipeline(&self) -> Pipeline {
        self.pipeline_with(Box::new(self.provider())).await
    }

    async fn pipeline_with(&self, provider: Box<dyn Provider>) -> Pipeline {
        Pipeline::new(
            Ledger::open(&self.dir.path().join("ledger.db"))
                .await
                .unwrap(),
            vec![provider],
            vec![Box::new(
                LagoSink::new(
                    "lago".into(),
                    LagoConfig {
                        api_url: self.lago.url.clone(),
                        api_key: Secret::new(LAGO_KEY),
                        batch_size: 25,
                        timeout: Duration::from_secs(5),
                        retry: retry(),
                    },
                )
                .unwrap(),
            )],
            MappingSet::from_sources(&[("softlayer.yaml".into(), MAPPING.into())]).unwrap(),
        )
    }

    async fn sync(&self) -> billsync::sync::RunSummary {
        self.sync_with(self.pipeline().await).await
    }

    async fn sync_with(&self, pipeline: Pipeline) -> billsync::sync::RunSummary {
        pipeline
            .sync(&SyncOptions {
                now: Some(now()),
                ..Default::default()
            })
            .await
            .expect("sync")
    }

    /// What Lago holds for the reseller's SoftLayer cost, every stored event counted.
    fn billed(&self) -> Decimal {
        self.lago
            .total("sub_reseller", "softlayer_cost", "amount")
            .unwrap_or_default()
    }
}

fn line(id: u64, billing_item: u64, amount: &str) -> Value {
    json!({"id": id, "billingItemId": billing_item, "categoryCode": "server",
        "category": {"name": "Server"}, "description": "Dual E5-2690 v3",
        "recurringAfterTaxAmount": amount, "oneTimeAfterTaxAmount": "0"})
}

#[tokio::test]
async fn an_unpaid_invoice_is_billed_when_it_appears_and_not_again_once_it_is_paid() {
    let mut ds = SoftlayerDataset::new(77);
    ds.add_invoice(
        10,
        "2026-03-04T00:00:00-06:00",
        "CLOSED",
        "RECURRING",
        vec![line(1, 501, "1.10")],
    );
    // Not paid yet: SoftLayer's OPEN means "payment not received", not "still changing".
    ds.add_invoice(
        11,
        "2026-04-04T00:00:00-05:00",
        "OPEN",
        "RECURRING",
        vec![line(2, 502, "2.20")],
    );
    ds.add_invoice(
        12,
        "2026-05-04T00:00:00-05:00",
        "CLOSED",
        "RECURRING",
        vec![line(3, 503, "3.30")],
    );
    let w = World::start(ds).await;

    let first = w.sync().await;
    assert_eq!(
        w.billed(),
        dec("6.60"),
        "every invoice line is billed at once, paid or not: {first:?}"
    );

    // Paid later (or closed unpaid when the account is terminated): nothing more to bill.
    w.softlayer.update(|d| d.close_invoice(11));
    let second = w.sync().await;
    assert_eq!(second.sent, 0, "{second:?}");
    assert_eq!(w.billed(), dec("6.60"));
    assert_eq!(w.lago.events().len(), 3);
}

#[tokio::test]
async fn a_refund_is_the_only_adjustment_of_the_line_it_refunds() {
    let mut ds = SoftlayerDataset::new(77);
    ds.add_invoice(
        20,
        "2026-04-04T00:00:00-05:00",
        "OPEN",
        "RECURRING",
        vec![line(7, 5001, "100.00"), line(8, 5002, "40.00")],
    );
    let w = World::start(ds).await;
    w.sync().await;

    // The server of line 7 is refunded with a REFUND invoice. Were the unpaid invoice's line
    // also seen changed in place (SoftLayer documents credits as separate invoices, and an
    // invoice's lines as a copy made when it is created; an in-place change is unconfirmed),
    // billing both the change and the refund would take the 100.00 off twice.
    w.softlayer.update(|d| {
        let inv = d.invoices.iter_mut().find(|i| i.id == 20).unwrap();
        inv.items[0]["recurringAfterTaxAmount"] = json!("0");
        d.close_invoice(20);
        d.add_invoice(
            21,
            "2026-04-20T10:00:00-05:00",
            "CLOSED",
            "REFUND",
            vec![line(9, 5001, "100.00")],
        );
    });
    let second = w.sync().await;
    assert_eq!(
        w.billed(),
        dec("40.00"),
        "140.00 billed, 100.00 refunded once: {second:?}"
    );
}

/// The provider as billsync had it before an invoice's lines were final when read: lines of an
/// `OPEN` invoice provisional, and the cursor only past invoices that are closed, like every
/// invoice listed before them.
struct HeldUntilPaid(SoftlayerProvider);

#[async_trait::async_trait]
impl Provider for HeldUntilPaid {
    fn kind(&self) -> &'static str {
        self.0.kind()
    }

    fn name(&self) -> &str {
        self.0.name()
    }

    async fn plan(
        &self,
        cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError> {
        let mut chunks = self.0.plan(cursors, now).await?;
        let mut prefix_closed = true;
        for chunk in chunks.iter_mut().filter(|c| c.stream == STREAM_INVOICES) {
            let mut detail: Value = serde_json::from_str(&chunk.detail).unwrap();
            let status = detail["invoice"]["status_code"]
                .as_str()
                .unwrap()
                .to_owned();
            prefix_closed &= status.starts_with("CLOSED");
            if !prefix_closed {
                detail["cursor"] = Value::Null;
            }
            chunk.detail = detail.to_string();
        }
        Ok(chunks)
    }

    async fn fetch(&self, chunk: &Chunk, now: DateTime<Utc>) -> Result<Page, ProviderError> {
        let mut page = self.0.fetch(chunk, now).await?;
        for r in &mut page.records {
            r.is_final = r.attributes["invoice_status"].starts_with("CLOSED");
        }
        Ok(page)
    }
}

#[tokio::test]
async fn a_ledger_that_held_an_unpaid_invoice_sends_it_once_after_the_upgrade() {
    let mut ds = SoftlayerDataset::new(77);
    ds.add_invoice(
        10,
        "2026-03-04T00:00:00-06:00",
        "CLOSED",
        "RECURRING",
        vec![line(1, 501, "1.10")],
    );
    ds.add_invoice(
        11,
        "2026-04-04T00:00:00-05:00",
        "OPEN",
        "RECURRING",
        vec![line(2, 502, "2.20")],
    );
    ds.add_invoice(
        12,
        "2026-05-04T00:00:00-05:00",
        "CLOSED",
        "RECURRING",
        vec![line(3, 503, "3.30")],
    );
    let w = World::start(ds).await;
    let before = w
        .sync_with(w.pipeline_with(Box::new(HeldUntilPaid(w.provider()))).await)
        .await;
    assert_eq!(before.staged_by_status.get("provisional"), Some(&1));
    assert_eq!(w.billed(), dec("4.40"));

    let after = w.sync().await;
    assert_eq!((after.sent, after.new), (1, 0), "{after:?}");
    assert_eq!(w.billed(), dec("6.60"));
    assert_eq!(w.lago.events().len(), 3, "nothing sent twice");
    let again = w.sync().await;
    assert_eq!((again.pulled, again.sent), (0, 0), "{again:?}");
}
