//! Settings: a YAML file plus `BILLSYNC__…` environment overrides, read with the `config` crate.
//!
//! Secrets are never values in the file: a [`Secret`] names where to read it (`env:NAME` or
//! `file:/path`), is resolved at start-up and redacted in every `Debug` output.

use std::fmt;
use std::path::PathBuf;

use serde::{Deserialize, Deserializer};

/// A secret value (API key). `Debug` and `Display` never show it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wrap a value that is already known (tests, simulators).
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Resolve a reference: `env:NAME` reads an environment variable, `file:/path` reads a
    /// mounted file (trailing newline removed). Anything else is refused, so a key pasted into
    /// the configuration file is caught instead of silently used.
    pub fn resolve(reference: &str) -> Result<Secret, String> {
        if let Some(name) = reference.strip_prefix("env:") {
            let value = std::env::var(name)
                .map_err(|_| format!("environment variable {name} is not set"))?;
            if value.trim().is_empty() {
                return Err(format!("environment variable {name} is empty"));
            }
            Ok(Secret(value.trim().to_string()))
        } else if let Some(path) = reference.strip_prefix("file:") {
            let value = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read secret file {path}: {e}"))?;
            let value = value.trim_end_matches(['\r', '\n']).to_string();
            if value.is_empty() {
                return Err(format!("secret file {path} is empty"));
            }
            Ok(Secret(value))
        } else {
            Err("a secret must be written `env:VARIABLE` or `file:/path/to/file`, never as a value in the configuration".into())
        }
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let reference = String::deserialize(d)?;
        Secret::resolve(&reference).map_err(serde::de::Error::custom)
    }
}

/// Durations written the human way: `90s`, `15m`, `2h`, `1d`.
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))
    }

    /// The same for `chrono::Duration` (time arithmetic with timestamps).
    pub mod chrono {
        use serde::{Deserialize, Deserializer};

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<chrono::Duration, D::Error> {
            let text = String::deserialize(d)?;
            let std = humantime::parse_duration(&text).map_err(|e| {
                serde::de::Error::custom(format!("invalid duration {text:?}: {e}"))
            })?;
            chrono::Duration::from_std(std)
                .map_err(|_| serde::de::Error::custom(format!("duration {text:?} is too large")))
        }
    }
}

/// Where the settings file is, when none is given.
pub fn default_path() -> PathBuf {
    PathBuf::from("billsync.yaml")
}
