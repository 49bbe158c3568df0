//! Read-only Lago catalogue calls for `billsync mappings check --remote`: the billable metrics
//! and the subscriptions, following Lago's pagination `meta.next_page`.
//!
//! Kept apart from the event sink: the sink's client never follows redirects and freezes
//! payloads; these are plain GETs whose answers only feed a report. The comparison itself is
//! pure and lives in [`crate::mapping::remote`].

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;

use crate::config::Secret;
use crate::http::{get_text, ReadFailure, RetryPolicy};
use crate::mapping::remote::RemoteMetric;
use crate::sinks::lago::LagoConfig;

/// Largest page Lago serves.
const PER_PAGE: usize = 100;
/// A safety stop against a server that never ends its pagination (a million items): reaching
/// it is an error, never a silently shortened list.
const MAX_PAGES: usize = 10_000;

/// A catalogue call that failed.
#[derive(Debug, thiserror::Error)]
pub enum LagoAdminError {
    /// Transport failure or timeout (after the sink's retries, for a request that was sent).
    #[error("GET {url}: {message}")]
    Transport { url: String, message: String },
    /// A non-2xx answer.
    #[error("GET {url}: HTTP {status}: {body}")]
    Status {
        url: String,
        status: u16,
        body: String,
    },
    /// The answer is not the JSON Lago documents.
    #[error("GET {url}: unexpected answer: {message}")]
    Shape { url: String, message: String },
    /// A `meta.next_page` that does not move forward: the list cannot be followed, and
    /// ending it there would check a part of it.
    #[error("GET {url}: the list of {listing} answered next_page {next} on page {page}: it cannot be followed, not checked on a partial list")]
    Backwards {
        url: String,
        listing: String,
        page: u64,
        next: u64,
    },
    /// The listing ended with another number of items than its `meta.total_count`.
    #[error("GET {url}: the list of {listing} counts total_count {total} but ended after {items} items read: not checked on a partial list")]
    Short {
        url: String,
        listing: String,
        total: u64,
        items: usize,
    },
    /// The listing still had a next page after 10,000 pages: the items read are not all of
    /// them, and a check on a part of the list would call the others missing.
    #[error("GET {url}: the list of {listing} did not end after {pages} pages ({items} items read): not checked on a partial list")]
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
        Ok(items
            .iter()
            .filter_map(|s| s.get("external_id")?.as_str().map(str::to_string))
            .collect())
    }
}
