//! Read-only Lago catalogue calls for `billsync mappings check --remote`: the billable metrics
//! and the subscriptions, following Lago's pagination `meta.next_page`.
//!
//! Kept apart from the event sink: the sink's client never follows redirects and freezes
//! payloads; these are plain GETs whose answers only feed a report. The comparison itself is
//! pure and lives in [`crate::mapping::remote`].

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde_json::Value;

use crate::config::Secret;
use crate::http::{get_text, ReadFailure, RetryPolicy};
use crate::mapping::remote::{
    RemoteBillingEntity, RemoteCustomer, RemoteFinding, RemoteMetric, RemoteSubscription,
};
use crate::sinks::lago::LagoConfig;

/// Largest page Lago serves.
const PER_PAGE: usize = 100;
/// A safety stop against a server that never ends its pagination (a million items): reaching
/// it is an error, never a silently shortened list.
const MAX_PAGES: usize = 10_000;

/// A catalogue call that failed. The URL is shown without the user info or query `api_url`
/// may carry.
#[derive(Debug, thiserror::Error)]
pub enum LagoAdminError {
    /// Transport failure or timeout (after the sink's retries, for a request that was sent).
    #[error("GET {}: {message}", crate::http::shown_url(.url))]
    Transport { url: String, message: String },
    /// A non-2xx answer.
    #[error("GET {}: HTTP {status}: {body}", crate::http::shown_url(.url))]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// The answer is not the JSON Lago documents.
    #[error("GET {}: unexpected answer: {message}", crate::http::shown_url(.url))]
    Shape { url: String, message: String },
    /// A `meta.next_page` that does not move forward: the list cannot be followed, and
    /// ending it there would check a part of it.
    #[error("GET {}: the list of {listing} answered next_page {next} on page {page}: it cannot be followed, not checked on a partial list", crate::http::shown_url(.url))]
    Backwards {
        url: String,
        listing: String,
        page: u64,
        next: u64,
    },
    /// The listing ended with another number of items than its `meta.total_count`.
    #[error("GET {}: the list of {listing} counts total_count {total} but ended after {items} items read: not checked on a partial list", crate::http::shown_url(.url))]
    Short {
        url: String,
        listing: String,
        total: u64,
        items: usize,
    },
    /// The listing still had a next page after 10,000 pages: the items read are not all of
    /// them, and a check on a part of the list would call the others missing.
    #[error("GET {}: the list of {listing} did not end after {pages} pages ({items} items read): not checked on a partial list", crate::http::shown_url(.url))]
    Unending {
        url: String,
        listing: String,
        pages: usize,
        items: usize,
    },
}

/// Lists Lago's billable metrics and subscriptions.
#[derive(Debug)]
pub struct LagoAdmin {
    base: String,
    api_key: Secret,
    client: reqwest::Client,
    retry: RetryPolicy,
}

impl LagoAdmin {
    /// A client for the sink's `api_url` and key.
    pub fn new(config: &LagoConfig) -> Result<LagoAdmin, LagoAdminError> {
        let base = config.api_url.trim().trim_end_matches('/').to_string();
        let client = reqwest::Client::builder()
            .timeout(config.timeout.max(Duration::from_secs(1)))
            .build()
            .map_err(|e| LagoAdminError::Transport {
                url: base.clone(),
                message: e.to_string(),
            })?;
        Ok(LagoAdmin {
            base,
            api_key: config.api_key.clone(),
            client,
            retry: config.retry.clone(),
        })
    }

    /// Every item under `key` of the paginated `path`, with `filters` added to each request.
    /// Each page is retried as the sink's read-back is (its [`RetryPolicy`]); the list must
    /// end (`meta.next_page` null) with as many items as its `meta.total_count`, or it is an
    /// error: a check on a part of the list would call the others missing.
    async fn list(
        &self,
        path: &str,
        key: &str,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Value>, LagoAdminError> {
        self.list_pages(path, key, filters, false).await
    }

    /// [`Self::list`]; with `meta_optional`, an answer without any `meta` is the whole list
    /// (`GET /api/v1/billing_entities` is documented without pagination).
    async fn list_pages(
        &self,
        path: &str,
        key: &str,
        filters: &[(&str, &str)],
        meta_optional: bool,
    ) -> Result<Vec<Value>, LagoAdminError> {
        let url = format!("{}{path}", self.base);
        let shape = |message: String| LagoAdminError::Shape {
            url: url.clone(),
            message,
        };
        let mut out = Vec::new();
        let mut page = 1u64;
        for _ in 0..MAX_PAGES {
            let request = || {
                self.client
                    .get(&url)
                    .bearer_auth(self.api_key.expose())
                    .query(&[("page", page), ("per_page", PER_PAGE as u64)])
                    .query(filters)
            };
            let what = format!("lago: GET {path}");
            let body =
                get_text(request, &self.retry, &what)
                    .await
                    .map_err(|failure| match failure {
                        ReadFailure::Answered { status, body } => LagoAdminError::Status {
                            url: url.clone(),
                            status,
                            body,
                        },
                        ReadFailure::GaveUp { reason, attempts } => LagoAdminError::Transport {
                            url: url.clone(),
                            message: format!("{reason} (gave up after {attempts} attempts)"),
                        },
                    })?;
            let json: Value = serde_json::from_str(&body).map_err(|e| shape(e.to_string()))?;
            let items = json
                .get(key)
                .and_then(Value::as_array)
                .ok_or_else(|| shape(format!("no `{key}` array")))?;
            out.extend(items.iter().cloned());
            if meta_optional && json.get("meta").is_none() {
                return Ok(out);
            }
            match json.pointer("/meta/next_page") {
                None | Some(Value::Null) => {}
                Some(next) => {
                    let next = next
                        .as_u64()
                        .ok_or_else(|| shape(format!("meta.next_page is {next}")))?;
                    if next <= page {
                        return Err(LagoAdminError::Backwards {
                            url: url.clone(),
                            listing: key.to_string(),
                            page,
                            next,
                        });
                    }
                    page = next;
                    continue;
                }
            }
            // The last page: Lago counts the whole list in every page's meta (required in
            // its `PaginationMeta`).
            let total = json
                .pointer("/meta/total_count")
                .and_then(Value::as_u64)
                .ok_or_else(|| {
                    shape("no meta.total_count: cannot tell whether the list is whole".into())
                })?;
            if total != out.len() as u64 {
                return Err(LagoAdminError::Short {
                    url: url.clone(),
                    listing: key.to_string(),
                    total,
                    items: out.len(),
                });
            }
            return Ok(out);
        }
        Err(LagoAdminError::Unending {
            url,
            listing: key.to_string(),
            pages: MAX_PAGES,
            items: out.len(),
        })
    }

    /// `GET /api/v1/billable_metrics`, every page.
    pub async fn billable_metrics(&self) -> Result<Vec<RemoteMetric>, LagoAdminError> {
        let items = self
            .list("/api/v1/billable_metrics", "billable_metrics", &[])
            .await?;
        Ok(items
            .iter()
            .filter_map(|m| {
                Some(RemoteMetric {
                    code: m.get("code")?.as_str()?.to_string(),
                    aggregation_type: m
                        .get("aggregation_type")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string(),
                    field_name: m
                        .get("field_name")
                        .and_then(Value::as_str)
                        .map(str::to_string),
                })
            })
            .collect())
    }

    /// `GET /api/v1/subscriptions`, every page: the `external_id`s of the subscriptions that
    /// bill usage: active, pending (starts later) and terminated (its usage up to the
    /// termination is still invoiced). Lago lists only the active ones unless asked
    /// (lago-api `SubscriptionIndex`: `status` defaults to `["active"]`); canceled ones never
    /// started and bill nothing.
    pub async fn subscription_ids(&self) -> Result<BTreeSet<String>, LagoAdminError> {
        Ok(self.subscriptions().await?.into_keys().collect())
    }

    /// [`Self::subscription_ids`], each with its `external_customer_id` (empty when absent).
    pub async fn subscriptions(&self) -> Result<BTreeMap<String, String>, LagoAdminError> {
        Ok(customers_of(&self.subscription_list().await?))
    }

    /// The subscriptions of [`Self::subscription_ids`] as Lago lists them: one external id
    /// may come twice (terminated on an old plan, active on the new one).
    pub async fn subscription_list(&self) -> Result<Vec<RemoteSubscription>, LagoAdminError> {
        let items = self
            .list(
                "/api/v1/subscriptions",
                "subscriptions",
                &[
                    ("status[]", "active"),
                    ("status[]", "pending"),
                    ("status[]", "terminated"),
                ],
            )
            .await?;
        let text = |s: &Value, key: &str| s.get(key).and_then(Value::as_str).map(str::to_string);
        Ok(items
            .iter()
            .filter_map(|s| {
                Some(RemoteSubscription {
                    external_id: text(s, "external_id")?,
                    external_customer_id: text(s, "external_customer_id").unwrap_or_default(),
                    status: text(s, "status").unwrap_or_default(),
                    plan_code: text(s, "plan_code"),
                    terminated_at: text(s, "terminated_at"),
                })
            })
            .collect())
    }

    /// The plans `codes`, each with the billable metric codes it has a charge for
    /// (`charges[].billable_metric_code`). Up to [`PLANS_ONE_BY_ONE`] codes, one
    /// `GET /api/v1/plans/{code}` each; above, the whole `GET /api/v1/plans` listing. A plan
    /// Lago does not find, or one answered without `charges`, is left out (not judged).
    pub async fn plans(
        &self,
        codes: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, BTreeSet<String>>, LagoAdminError> {
        let mut out = BTreeMap::new();
        let mut add = |plan: &Value| {
            let code = plan.get("code").and_then(Value::as_str)?;
            let charges = plan.get("charges")?.as_array()?;
            codes.contains(code).then(|| {
                let metrics = charges
                    .iter()
                    .filter_map(|c| c.get("billable_metric_code")?.as_str())
                    .map(str::to_string)
                    .collect();
                out.insert(code.to_string(), metrics);
            })
        };
        if codes.len() > PLANS_ONE_BY_ONE {
            for plan in self.list("/api/v1/plans", "plans", &[]).await? {
                add(&plan);
            }
        } else {
            for code in codes.iter().filter(|c| !c.is_empty()) {
                let path = format!(
                    "/api/v1/plans/{}",
                    percent_encoding::utf8_percent_encode(code, percent_encoding::NON_ALPHANUMERIC)
                );
                if let Some(json) = self.get_one(&path).await? {
                    if let Some(plan) = json.get("plan") {
                        add(plan);
                    }
                }
            }
        }
        Ok(out)
    }

    /// `GET path` (not paginated), retried as the listings are; a 404 is `None`.
    async fn get_one(&self, path: &str) -> Result<Option<Value>, LagoAdminError> {
        let url = format!("{}{path}", self.base);
        let request = || self.client.get(&url).bearer_auth(self.api_key.expose());
        let body = match get_text(request, &self.retry, &format!("lago: GET {path}")).await {
            Ok(body) => body,
            Err(ReadFailure::Answered { status: 404, .. }) => return Ok(None),
            Err(ReadFailure::Answered { status, body }) => {
                return Err(LagoAdminError::Status { url, status, body })
            }
            Err(ReadFailure::GaveUp { reason, attempts }) => {
                return Err(LagoAdminError::Transport {
                    url,
                    message: format!("{reason} (gave up after {attempts} attempts)"),
                })
            }
        };
        serde_json::from_str(&body)
            .map(Some)
            .map_err(|e| LagoAdminError::Shape {
                url,
                message: e.to_string(),
            })
    }

    /// `GET /api/v1/billing_entities` (every page if the answer is paginated): code, invoice
    /// grace period (days), timezone, default or not.
    pub async fn billing_entities(&self) -> Result<Vec<RemoteBillingEntity>, LagoAdminError> {
        let url = format!("{}/api/v1/billing_entities", self.base);
        // A Lago from before billing entities (2025) answers 404: none to read.
        let items = match self
            .list_pages("/api/v1/billing_entities", "billing_entities", &[], true)
            .await
        {
            Err(LagoAdminError::Status { status: 404, .. }) => Vec::new(),
            other => other?,
        };
        items
            .iter()
            .map(|e| {
                let code = e.get("code").and_then(Value::as_str);
                let grace = e.get("invoice_grace_period").and_then(Value::as_i64);
                match (code, grace) {
                    (Some(code), Some(grace_days)) => Ok(RemoteBillingEntity {
                        code: code.to_string(),
                        grace_days,
                        timezone: e
                            .get("timezone")
                            .and_then(Value::as_str)
                            .map(str::to_string),
                        is_default: e
                            .get("is_default")
                            .and_then(Value::as_bool)
                            .unwrap_or(false),
                    }),
                    _ => Err(LagoAdminError::Shape {
                        url: url.clone(),
                        message: format!(
                            "a billing entity without `code` or integer `invoice_grace_period`: {}",
                            crate::http::snippet(&e.to_string())
                        ),
                    }),
                }
            })
            .collect()
    }

    /// The customers `ids` as Lago describes them. Up to [`CUSTOMERS_ONE_BY_ONE`] ids, one
    /// `GET /api/v1/customers/{external_id}` each (a 404 leaves that customer out); above,
    /// the whole `GET /api/v1/customers` listing (100 a page), which costs fewer calls.
    pub async fn customers(
        &self,
        ids: &BTreeSet<String>,
    ) -> Result<BTreeMap<String, RemoteCustomer>, LagoAdminError> {
        let mut out = BTreeMap::new();
        if ids.len() > CUSTOMERS_ONE_BY_ONE {
            for c in self.list("/api/v1/customers", "customers", &[]).await? {
                if let Some(c) = customer_of(&c) {
                    if ids.contains(&c.external_id) {
                        out.insert(c.external_id.clone(), c);
                    }
                }
            }
            return Ok(out);
        }
        for id in ids.iter().filter(|id| !id.is_empty()) {
            let path = format!(
                "/api/v1/customers/{}",
                percent_encoding::utf8_percent_encode(id, percent_encoding::NON_ALPHANUMERIC)
            );
            let Some(json) = self.get_one(&path).await? else {
                continue;
            };
            let c = json.get("customer").and_then(customer_of).ok_or_else(|| {
                LagoAdminError::Shape {
                    url: format!("{}{path}", self.base),
                    message: "no `customer` object with an `external_id`".into(),
                }
            })?;
            out.insert(c.external_id.clone(), c);
        }
        Ok(out)
    }
}

/// Up to this many customers are read one by one; more, by listing every customer.
pub const CUSTOMERS_ONE_BY_ONE: usize = 100;

/// Up to this many plans are read one by one; more, by listing every plan.
pub const PLANS_ONE_BY_ONE: usize = 100;

/// Each listed subscription's `external_customer_id`.
pub fn customers_of(subscriptions: &[RemoteSubscription]) -> BTreeMap<String, String> {
    subscriptions
        .iter()
        .map(|s| (s.external_id.clone(), s.external_customer_id.clone()))
        .collect()
}

/// A `CustomerObject`'s period settings: `applicable_timezone` (else `timezone`),
/// `billing_configuration.invoice_grace_period` (null: the billing entity's),
/// `billing_entity_code`.
fn customer_of(c: &Value) -> Option<RemoteCustomer> {
    let text = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
    Some(RemoteCustomer {
        external_id: c.get("external_id")?.as_str()?.to_string(),
        timezone: text(c.get("applicable_timezone")).or_else(|| text(c.get("timezone"))),
        grace_days: c
            .pointer("/billing_configuration/invoice_grace_period")
            .and_then(Value::as_i64),
        billing_entity: text(c.get("billing_entity_code")),
    })
}

/// The invoicing-period findings of `mappings check --remote` for one Lago sink: reads the
/// subscriptions' customers (see [`LagoAdmin::customers`]) and the billing entities, and
/// compares them with how late `settings`' sources reach Lago (one run every `run_interval`).
pub async fn period_findings(
    admin: &LagoAdmin,
    settings: &crate::config::Settings,
    set: &crate::mapping::MappingSet,
    subscriptions: &BTreeMap<String, String>,
    run_interval: chrono::Duration,
) -> Result<Vec<RemoteFinding>, LagoAdminError> {
    let (sources, period) = settings.lateness(run_interval);
    let pairs: Vec<(String, String)> = sources
        .iter()
        .map(|l| (l.source.clone(), l.kind.clone()))
        .collect();
    let fed: BTreeSet<String> = set
        .sources_by_subscription(&pairs)
        .keys()
        .chain(set.month_priced_subscriptions(&pairs).iter())
        .filter_map(|sub| subscriptions.get(sub))
        .filter(|c| !c.is_empty())
        .cloned()
        .collect();
    if fed.is_empty() {
        return Ok(Vec::new());
    }
    let entities = admin.billing_entities().await?;
    let customers = admin.customers(&fed).await?;
    Ok(set.check_periods(
        &sources,
        Some(&period),
        subscriptions,
        &customers,
        &entities,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `mappings check --remote` prints these errors: an `api_url` carrying user info or a
    /// token in its query must not show them.
    #[test]
    fn errors_show_the_url_without_its_credentials() {
        let url = "https://lago-user:s3cret@lago.example.com/api/v1/billable_metrics?token=t0ken";
        let shown = [
            LagoAdminError::Status {
                url: url.into(),
                status: 500,
                body: "oops".into(),
            }
            .to_string(),
            LagoAdminError::Transport {
                url: url.into(),
                message: "timed out".into(),
            }
            .to_string(),
            LagoAdminError::Unending {
                url: url.into(),
                listing: "billable metrics".into(),
                pages: 10_000,
                items: 1,
            }
            .to_string(),
        ];
        for text in shown {
            assert!(
                !text.contains("s3cret") && !text.contains("t0ken") && !text.contains("lago-user"),
                "{text}"
            );
            assert!(text.contains("lago.example.com"), "{text}");
        }
    }
}
