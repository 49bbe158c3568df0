//! What every HTTP integration shares: one client shape and one retry policy.
//!
//! Retries use `backon` (exponential backoff with jitter); a server's own `Retry-After` (or, on
//! a 429, `X-RateLimit-Reset`) replaces the computed delay, because guessing shorter only earns
//! another 429.

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

/// Why a read ([`get_text`]) failed for good.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadFailure {
    /// An answer that no retry changes (not 2xx, 408, 429 or 5xx), as status and a snippet of
    /// its body.
    Answered { status: u16, body: String },
    /// Transient failures until the policy gave up: the last one's reason and the attempts.
    GaveUp { reason: String, attempts: usize },
}

/// A read-only request (a GET built anew by `request` for each attempt) and its body once the
/// server answered 2xx. Transport errors, timeouts, a cut answer, 408, 429 and 5xx are retried
/// with `retry` and the server's wait hint (`Retry-After`); any other answer fails at once.
/// `what` names the request in the retry warnings.
pub async fn get_text(
    request: impl Fn() -> reqwest::RequestBuilder,
    retry: &RetryPolicy,
    what: &str,
) -> Result<String, ReadFailure> {
    let mut delays = retry.backoff().build();
    let mut attempt = 0usize;
    loop {
        attempt += 1;
        let (reason, hint) = match request().send().await {
            Err(e) => (transport_reason(&e), None),
            Ok(resp) => {
                let status = resp.status();
                let hint = retry_hint(status, resp.headers());
                match resp.text().await {
                    Err(e) => (
                        format!(
                            "HTTP {status}, reading the answer failed: {}",
                            transport_reason(&e)
                        ),
                        hint,
                    ),
                    Ok(text) if status.is_success() => return Ok(text),
                    Ok(text) if matches!(status.as_u16(), 408 | 429 | 500..=599) => {
                        (format!("HTTP {status}: {}", snippet(&text)), hint)
                    }
                    Ok(text) => {
                        return Err(ReadFailure::Answered {
                            status: status.as_u16(),
                            body: snippet(&text),
                        })
                    }
                }
            }
        };
        match retry.with_hint(delays.next(), hint) {
            Some(wait) => {
                tracing::warn!(
                    request = what,
                    attempt,
                    wait_ms = wait.as_millis() as u64,
                    %reason,
                    "read request failed, retrying"
                );
                tokio::time::sleep(wait).await;
            }
            None => {
                return Err(ReadFailure::GaveUp {
                    reason,
                    attempts: attempt,
                })
            }
        }
    }
}

/// The server's wait hint for an answer with `status`: `Retry-After` (seconds or HTTP date),
/// else, on a 429 only, `X-RateLimit-Reset` (seconds).
///
/// `X-RateLimit-Reset` says when the rate-limit window resets, which is the wait only when the
/// rate limit is why the request failed. Lago Cloud sends it on every answer with a reset of
/// 0 or 1 s: taken for a 5xx or 408 it replaced the backoff, and a short outage used up every
/// retry within a second.
pub fn retry_hint(
    status: reqwest::StatusCode,
    headers: &reqwest::header::HeaderMap,
) -> Option<Duration> {
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
    if status != reqwest::StatusCode::TOO_MANY_REQUESTS {
        return None;
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

/// A transport failure (no HTTP answer, or an answer cut short) as one line: its kind, then
/// reqwest's message and each source's (reqwest's own is generic; the cause is below it).
///
/// The request's URL appears without user info and query: a configured URL may carry a
/// token there (webhook receivers often take one), and this line is logged and stored as a
/// record's last error in the ledger, where no secret may go.
pub fn transport_reason(e: &reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connection failed"
    } else if e.is_body() || e.is_decode() {
        "answer cut"
    } else {
        "transport error"
    };
    let mut detail = e.to_string();
    if let Some(url) = e.url() {
        detail = detail.replace(url.as_str(), &redacted_url(url));
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        detail.push_str(": ");
        detail.push_str(&s.to_string());
        source = s.source();
    }
    format!("{kind}: {detail}")
}

/// `url` without user info, query or fragment (`?…` marks a query left out).
/// A configured URL for a message (a start-up error, a log line): as [`redacted_url`] when it
/// parses, else the text with any user info and query cut off, so a URL that is refused
/// never shows the credentials it may carry.
pub fn shown_url(text: &str) -> String {
    if let Ok(url) = reqwest::Url::parse(text) {
        return redacted_url(&url);
    }
    let (base, had_query) = match text.find(['?', '#']) {
        Some(i) => (&text[..i], true),
        None => (text, false),
    };
    let (scheme, rest) = match base.find("://") {
        Some(i) => base.split_at(i + 3),
        None => ("", base),
    };
    let rest = rest.rfind('@').map_or(rest, |i| &rest[i + 1..]);
    format!("{scheme}{rest}{}", if had_query { "?…" } else { "" })
}

pub fn redacted_url(url: &reqwest::Url) -> String {
    let mut shown = url.clone();
    let _ = shown.set_username("");
    let _ = shown.set_password(None);
    shown.set_fragment(None);
    let had_query = shown.query().is_some();
    shown.set_query(None);
    let mut text = shown.to_string();
    if had_query {
        text.push_str("?…");
    }
    text
}
