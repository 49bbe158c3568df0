//! What the providers' HTTP calls share: how one attempt ends, the retry loop around it, and how
//! a transport error is described.
//!
//! Each provider classifies its own answers (which statuses and error bodies are worth another
//! try is API knowledge); the loop is the same everywhere: retry only [`Attempt::Retry`], on the
//! source's [`RetryPolicy`] (exponential backoff with jitter), a server's wait hint replacing the
//! computed delay (capped at `max_delay`), one warning per retry, and the last error returned.

use std::future::Future;
use std::time::Duration;

use backon::Retryable;
use tracing::warn;

use crate::http::RetryPolicy;
use crate::providers::ProviderError;

/// The outcome of one failed attempt: worth retrying or not.
#[derive(Debug)]
pub(crate) enum Attempt {
    /// Transient (transport error, timeout, HTTP 5xx or 429, a rate-limit body): try again,
    /// after `hint` when the server gave one.
    Retry {
        error: ProviderError,
        hint: Option<Duration>,
    },
    /// Final: retrying cannot help (bad credentials, an API error, a body of the wrong shape).
    Fatal(ProviderError),
}

impl Attempt {
    fn error(&self) -> &ProviderError {
        match self {
            Attempt::Retry { error, .. } | Attempt::Fatal(error) => error,
        }
    }

    fn into_error(self) -> ProviderError {
        match self {
            Attempt::Retry { error, .. } | Attempt::Fatal(error) => error,
        }
    }
}

/// Run `attempt` until it succeeds, fails with [`Attempt::Fatal`], or `policy`'s retries are
/// spent; the error is the last attempt's. `kind` prefixes the retry warning (`metalsoft:
/// retrying`), `source` and `call` are its fields.
pub(crate) async fn send_with_retry<T, F, Fut>(
    policy: &RetryPolicy,
    kind: &str,
    source: &str,
    call: &str,
    attempt: F,
) -> Result<T, ProviderError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Attempt>>,
{
    attempt
        .retry(policy.backoff())
        .sleep(tokio::time::sleep)
        .when(|a: &Attempt| matches!(a, Attempt::Retry { .. }))
        .adjust(|a: &Attempt, computed| match a {
            Attempt::Retry { hint, .. } => policy.with_hint(computed, *hint),
            Attempt::Fatal(_) => None,
        })
        .notify(|a: &Attempt, wait| {
            warn!(source, call, error = %a.error(), ?wait, "{kind}: retrying");
        })
        .await
        .map_err(Attempt::into_error)
}

/// A transport error in words ([`crate::http::transport_reason`]): its kind and its whole
/// source chain, the URL without user info or query. Providers keep their credentials in
/// headers or bodies (MetalSoft's Bearer header, SoftLayer's and SAKURA's Basic header,
/// Jelastic's session in the form body), which reqwest's text never includes.
pub(crate) fn describe_reqwest(e: &reqwest::Error) -> String {
    crate::http::transport_reason(e)
}
