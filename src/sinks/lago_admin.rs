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
    /// Transport failure or timeout.
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
        })
    }

    /// Every item under `key` of the paginated `path`, with `filters` added to each request.
    async fn list(
        &self,
        path: &str,
        key: &str,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Value>, LagoAdminError> {
        let url = format!("{}{path}", self.base);
        let mut out = Vec::new();
        let mut page = 1usize;
        for _ in 0..MAX_PAGES {
            let resp = self
                .client
                .get(&url)
                .bearer_auth(self.api_key.expose())
                .query(&[("page", page), ("per_page", PER_PAGE)])
                .query(filters)
                .send()
                .await
                .map_err(|e| LagoAdminError::Transport {
                    url: url.clone(),
                    message: e.to_string(),
                })?;
            let status = resp.status();
            let body = resp.text().await.map_err(|e| LagoAdminError::Transport {
                url: url.clone(),
                message: e.to_string(),
            })?;
            if !status.is_success() {
                return Err(LagoAdminError::Status {
                    url,
                    status: status.as_u16(),
                    body: crate::http::snippet(&body),
                });
            }
            let json: Value = serde_json::from_str(&body).map_err(|e| LagoAdminError::Shape {
                url: url.clone(),
                message: e.to_string(),
            })?;
            let items =
                json.get(key)
                    .and_then(Value::as_array)
                    .ok_or_else(|| LagoAdminError::Shape {
                        url: url.clone(),
                        message: format!("no `{key}` array"),
                    })?;
            out.extend(items.iter().cloned());
            match json
                .get("meta")
                .and_then(|m| m.get("next_page"))
                .and_then(Value::as_u64)
            {
                Some(next) if next as usize > page => page = next as usize,
                _ => return Ok(out),
            }
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
