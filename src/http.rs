//! What every HTTP integration shares: one client shape and one retry policy.
//!
//! Retries use `backon` (exponential backoff with jitter); a server's own `Retry-After` or
//! `X-RateLimit-Reset` replaces the computed delay, because guessing shorter only earns another 429.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use serde::Deserialize;

/// Build the HTTP client used for one integration.
pub fn client(timeout: Duration) -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("billsync/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("the TLS backend is compiled in; building a client cannot fail")
}

/// How often and how patiently to retry transient failures.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub max_retries: usize,
    /// First backoff delay.
    #[serde(with = "crate::config::duration")]
    pub min_delay: Duration,
    /// Largest backoff delay (also caps a server's `Retry-After`).
    #[serde(with = "crate::config::duration")]
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            max_retries: 6,
            min_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The backoff schedule: exponential, with jitter, capped.
    pub fn backoff(&self) -> ExponentialBuilder {
        ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_retries)
            .with_jitter()
    }

    /// The delays this policy would wait, for logs and tests.
    pub fn delays(&self) -> Vec<Duration> {
        self.backoff().build().collect()
    }

    /// The delay to wait given the server's hint: the hint wins (capped at `max_delay`).
    pub fn with_hint(
        &self,
        computed: Option<Duration>,
        hint: Option<Duration>,
    ) -> Option<Duration> {
        match (computed, hint) {
            (None, _) => None,
            (Some(_), Some(h)) => Some(h.min(self.max_delay)),
            (Some(c), None) => Some(c),
        }
    }
}

/// The server's wait hint: `Retry-After` (seconds or HTTP date) or `X-RateLimit-Reset` (seconds).
pub fn retry_hint(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let text = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = text("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(when) = chrono::DateTime::parse_from_rfc2822(v) {
            let wait = when.with_timezone(&chrono::Utc) - chrono::Utc::now();
            return Some(wait.to_std().unwrap_or(Duration::ZERO));
        }
    }
    text("x-ratelimit-reset")
        .and_then(|v| v.parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// Read a body as text for an error message, cut to a readable length.
pub async fn body_snippet(resp: reqwest::Response) -> String {
    let text = resp.text().await.unwrap_or_default();
    snippet(&text)
}

/// Cut text to a readable length for an error message.
pub fn snippet(text: &str) -> String {
    const MAX: usize = 500;
    let t = text.trim();
    if t.len() <= MAX {
        t.to_string()
    } else {
        let mut end = MAX;
        while !t.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &t[..end])
    }
}
