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
    /// mounted file (surrounding whitespace removed, as for `env:`). Anything else is refused, so a key pasted into
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
            // Surrounding whitespace is never part of a key (as for `env:`): an editor's
            // trailing newline or a pasted space would otherwise be sent.
            let value = value.trim().to_string();
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
            let std = humantime::parse_duration(&text)
                .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?}: {e}")))?;
            chrono::Duration::from_std(std)
                .map_err(|_| serde::de::Error::custom(format!("duration {text:?} is too large")))
        }
    }
}

/// Where the settings file is, when none is given.
pub fn default_path() -> PathBuf {
    PathBuf::from("billsync.yaml")
}

/// The part of the settings the offline mapping commands read ([`Settings::load_for_mappings`]).
#[derive(Debug, Clone, PartialEq)]
pub struct MappingSettings {
    /// Mapping files or directories.
    pub mappings: Vec<PathBuf>,
    /// The configured sinks' names.
    pub sinks: Vec<String>,
}

/// The part of the settings `reconcile` reads ([`Settings::load_for_reconcile`]).
#[derive(Debug)]
pub struct ReconcileSettings {
    /// Where the ledger lives.
    pub ledger: LedgerSettings,
    /// The sinks to read back, by name.
    pub sinks: std::collections::BTreeMap<String, SinkSettings>,
}

/// The part of the settings `status` and the `ledger` commands read
/// ([`Settings::load_for_ledger`]).
#[derive(Debug)]
pub struct LedgerCommandSettings {
    /// Where the ledger lives, and its lock's lifetime.
    pub ledger: LedgerSettings,
    /// Each Stripe sink's `max_age`, by sink name: `status` warns of waiting records near it.
    pub stripe_max_age: std::collections::BTreeMap<String, std::time::Duration>,
}

/// The whole settings file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// Where the ledger lives and how long its lock lasts.
    pub ledger: LedgerSettings,
    /// Mapping files or directories, in the order their rules apply.
    #[serde(default = "default_mappings")]
    pub mappings: Vec<PathBuf>,
    /// Sources by name (snake_case names can be overridden from the environment).
    #[serde(default)]
    pub providers: std::collections::BTreeMap<String, ProviderSettings>,
    /// Sinks by name.
    #[serde(default)]
    pub sinks: std::collections::BTreeMap<String, SinkSettings>,
    /// The sink for rules that name none; may be omitted when exactly one sink is configured.
    #[serde(default)]
    pub default_sink: Option<String>,
    /// After SIGTERM, how long a request in flight may still take (keep it below the pod's
    /// `terminationGracePeriodSeconds`).
    #[serde(default = "default_shutdown_deadline", with = "duration")]
    pub shutdown_deadline: std::time::Duration,
    /// Push run metrics to a Prometheus Pushgateway.
    #[serde(default)]
    pub metrics: Option<crate::observe::MetricsSettings>,
    /// `period: month` pricing: settle a month this long after it ends at the latest (earlier
    /// once every record of the month is final and they reach its end). Keep the invoicing
    /// system's grace period for draft invoices at least this long.
    #[serde(default = "default_period_close_delay", with = "duration::chrono")]
    pub period_close_delay: chrono::Duration,
}

fn default_period_close_delay() -> chrono::Duration {
    chrono::Duration::days(crate::sync::DEFAULT_PERIOD_CLOSE_DAYS)
}

fn default_shutdown_deadline() -> std::time::Duration {
    std::time::Duration::from_secs(20)
}

fn default_mappings() -> Vec<PathBuf> {
    vec![PathBuf::from("mappings")]
}

/// Ledger settings.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LedgerSettings {
    /// The SQLite file. Its directory must be writable (WAL files live beside it).
    pub path: PathBuf,
    /// A run's lock lasts this long without a refresh; a crashed run's lock expires after it.
    #[serde(default = "default_lock_ttl", with = "duration")]
    pub lock_ttl: std::time::Duration,
}

fn default_lock_ttl() -> std::time::Duration {
    std::time::Duration::from_secs(15 * 60)
}

/// One source, by kind.
#[derive(Debug)]
pub enum ProviderSettings {
    /// MetalSoft JSON-RPC `resource_utilization_detailed`.
    Metalsoft(crate::providers::metalsoft::MetalsoftConfig),
    /// SoftLayer (IBM Cloud classic) REST v3.1 invoices.
    Softlayer(crate::providers::softlayer::SoftlayerConfig),
    /// Jelastic / Virtuozzo `GetAccountBillingHistoryByPeriod`.
    Jelastic(crate::providers::jelastic::JelasticConfig),
    /// SAKURA Cloud billing API (monthly bills and their details, JPY).
    Sakura(crate::providers::sakura::SakuraConfig),
}

/// One sink, by kind.
#[derive(Debug)]
pub enum SinkSettings {
    /// Lago `POST /api/v1/events/batch`.
    Lago(crate::sinks::lago::LagoConfig),
    /// Stripe Billing meter events (`POST /v1/billing/meter_events` or the v2 stream).
    Stripe(crate::sinks::stripe::StripeConfig),
    /// Signed JSON batches to an HTTP endpoint.
    Webhook(crate::sinks::webhook::WebhookConfig),
    /// JSON Lines files, one per batch.
    Jsonl(crate::sinks::jsonl::JsonlConfig),
    /// FOCUS cost-and-usage CSV files, one per batch.
    Focus(crate::sinks::focus::FocusConfig),
}

/// Read a `kind:`-tagged section. Not `#[serde(tag = "kind")]`: serde buffers such a section
/// before reading it, which loses the key of a bad field (an error said `sinks.lago`, not
/// `sinks.lago.batch_size`) and the `config` crate's reading of environment overrides (a
/// `BILLSYNC__SINKS__LAGO__BATCH_SIZE=50` string refused as "expected usize").
fn by_kind<'de, D: Deserializer<'de>, T>(
    d: D,
    kinds: &'static [&'static str],
    read: impl FnOnce(&str, config::Value) -> Result<T, config::ConfigError>,
) -> Result<T, D::Error> {
    use serde::de::Error;
    let mut table = config::Value::deserialize(d)?
        .into_table()
        .map_err(D::Error::custom)?;
    let kind = table
        .remove("kind")
        .ok_or_else(|| D::Error::missing_field("kind"))?
        .into_string()
        .map_err(D::Error::custom)?;
    if !kinds.contains(&kind.as_str()) {
        let expected: Vec<String> = kinds.iter().map(|k| format!("`{k}`")).collect();
        return Err(D::Error::custom(format!(
            "unknown variant `{kind}`, expected one of {} for key `kind`",
            expected.join(", ")
        )));
    }
    read(&kind, config::Value::new(None, table)).map_err(|e| match e {
        // Keep the field's key: `Settings::load` joins it to the section's.
        config::ConfigError::NotFound(key) => {
            D::Error::custom(format!("missing configuration field {key:?}"))
        }
        e => D::Error::custom(e),
    })
}

impl<'de> Deserialize<'de> for ProviderSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        by_kind(
            d,
            &["metalsoft", "softlayer", "jelastic", "sakura"],
            |kind, v| {
                Ok(match kind {
                    "metalsoft" => ProviderSettings::Metalsoft(v.try_deserialize()?),
                    "softlayer" => ProviderSettings::Softlayer(v.try_deserialize()?),
                    "jelastic" => ProviderSettings::Jelastic(v.try_deserialize()?),
                    _ => ProviderSettings::Sakura(v.try_deserialize()?),
                })
            },
        )
    }
}

impl<'de> Deserialize<'de> for SinkSettings {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        by_kind(
            d,
            &["lago", "stripe", "webhook", "jsonl", "focus"],
            |kind, v| {
                Ok(match kind {
                    "lago" => SinkSettings::Lago(v.try_deserialize()?),
                    "stripe" => SinkSettings::Stripe(v.try_deserialize()?),
                    "webhook" => SinkSettings::Webhook(v.try_deserialize()?),
                    "jsonl" => SinkSettings::Jsonl(v.try_deserialize()?),
                    _ => SinkSettings::Focus(v.try_deserialize()?),
                })
            },
        )
    }
}

/// A field's key inside a `kind:` section comes first (`… for key `batch_size``), the
/// section's after it (`… for key `sinks.lago``): one key, `sinks.lago.batch_size`.
fn join_keys(message: String) -> String {
    let missing = "missing configuration field \"";
    if let Some(rest) = message.strip_prefix(missing) {
        if let Some((field, section)) = rest.split_once("\" for key `") {
            if let Some(section) = section.strip_suffix('`') {
                return format!("{missing}{section}.{field}\"");
            }
        }
    }
    let mut parts: Vec<&str> = message.split(" for key `").collect();
    if parts.len() < 3 {
        return message;
    }
    let (Some(field), Some(section)) = (
        parts[parts.len() - 2].strip_suffix('`'),
        parts[parts.len() - 1].strip_suffix('`'),
    ) else {
        return message;
    };
    let key = format!("{section}.{field}`");
    parts.truncate(parts.len() - 2);
    parts.push(&key);
    parts.join(" for key `")
}

/// Errors reading the settings.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings file {path} does not exist (pass --config, or see billsync.example.yaml)")]
    Missing { path: PathBuf },
    #[error("settings {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The shortest `ledger.lock_ttl` that keeps runs apart: a run refreshes its lock every 30 s
/// (a third of the TTL when that is shorter), and a write may wait up to 10 s for SQLite's
/// lock. Shorter is accepted with a warning.
pub const MIN_LOCK_TTL: std::time::Duration = std::time::Duration::from_secs(30);

/// An environment variable meant as a settings override but written with one underscore after
/// the prefix (`BILLSYNC_LEDGER__PATH`): the `config` crate reads only `BILLSYNC__…`, so it
/// would be ignored without a word. Variables without a `__` (`BILLSYNC_CONFIG`,
/// `BILLSYNC_LOG`, a secret read through `env:BILLSYNC_…`) are not overrides.
fn mistyped_override(names: impl Iterator<Item = std::ffi::OsString>) -> Option<String> {
    // Only the settings' own sections: a secret may be named `BILLSYNC_LAGO__API_KEY` and read
    // through `env:`.
    const SECTIONS: [&str; 8] = [
        "LEDGER",
        "MAPPINGS",
        "PROVIDERS",
        "SINKS",
        "DEFAULT_SINK",
        "SHUTDOWN_DEADLINE",
        "PERIOD_CLOSE_DELAY",
        "METRICS",
    ];
    names.filter_map(|n| n.into_string().ok()).find_map(|name| {
        let rest = name.strip_prefix("BILLSYNC_")?;
        let section = rest.split("__").next().unwrap_or_default();
        (rest.contains("__") && SECTIONS.contains(&section.to_ascii_uppercase().as_str())).then(
            || {
                format!(
                    "environment variable {name} looks like a settings override but is ignored: \
                 overrides begin with BILLSYNC__ (two underscores), e.g. BILLSYNC__{rest}"
                )
            },
        )
    })
}

impl Settings {
    /// How late, after a billing period's end, each configured source's last records dated in
    /// it reach a sink (at worst), with a run every `run_interval`; and the same for the
    /// `period: month` adjustments. Per source: the largest delay after a period's end before
    /// its records are final and sent, plus one run interval (a run may have just missed them);
    /// for windowed sources that includes one window (the most a window dated in the period can
    /// reach past its end) and the look-back (a window is read again, and a line the provider
    /// added late sent, until the watermark is `look_back` past it).
    pub fn lateness(
        &self,
        run_interval: chrono::Duration,
    ) -> (
        Vec<crate::mapping::remote::Lateness>,
        crate::mapping::remote::Lateness,
    ) {
        use crate::mapping::remote::Lateness;
        let human = crate::sinks::stripe::human;
        let interval = format!("run interval {}", human(run_interval));
        let sources = self
            .providers
            .iter()
            .map(|(name, p)| {
                let (kind, delay, why) = match p {
                    // A window holding the period's end is dated before it and closes up to
                    // one window after it (exactly at it only when the customer's periods
                    // start on a window boundary, e.g. UTC days for 1d windows); it is read
                    // again until the watermark is `look_back` past it.
                    ProviderSettings::Metalsoft(c) => (
                        "metalsoft",
                        c.window + c.effective_look_back() + c.settle_delay,
                        format!(
                            "window {} + look_back {} + settle_delay {} + {interval}",
                            human(c.window),
                            human(c.effective_look_back()),
                            human(c.settle_delay)
                        ),
                    ),
                    ProviderSettings::Jelastic(c) => (
                        "jelastic",
                        chrono::Duration::seconds(c.period.seconds())
                            // As the provider bounds it.
                            * (c.look_back_buckets.min(100_000) as i32 + 1)
                            + c.settle_delay,
                        format!(
                            "bucket {} × (1 + look_back_buckets {}) + settle_delay {} + {interval}{}",
                            human(chrono::Duration::seconds(c.period.seconds())),
                            c.look_back_buckets,
                            human(c.settle_delay),
                            if c.final_requires_charge {
                                ", plus however long charging takes (final_requires_charge)"
                            } else {
                                ""
                            }
                        ),
                    ),
                    ProviderSettings::Sakura(c) => (
                        "sakura",
                        c.final_lag,
                        format!(
                            "a month is final on the 1st of the next, 00:00 JST, + final_lag {} + \
                             {interval}; a bill SAKURA lists later, found by the look-back or \
                             after a held month, comes later still and no grace period covers it",
                            human(c.final_lag)
                        ),
                    ),
                    ProviderSettings::Softlayer(_) => (
                        "softlayer",
                        chrono::Duration::zero(),
                        format!("an invoice's lines are final when read: {interval}"),
                    ),
                };
                Lateness {
                    source: name.clone(),
                    kind: kind.to_string(),
                    after_end: delay + run_interval,
                    why,
                }
            })
            .collect();
        let period = Lateness {
            source: "period pricing".to_string(),
            kind: String::new(),
            after_end: self.period_close_delay + run_interval,
            why: format!(
                "month adjustments settle period_close_delay {} after the month + {interval}",
                human(self.period_close_delay)
            ),
        };
        (sources, period)
    }

    /// Read the file, then apply `BILLSYNC__SECTION__KEY` environment overrides
    /// (e.g. `BILLSYNC__LEDGER__PATH=/data/ledger.db`).
    pub fn load(path: &std::path::Path) -> Result<Settings, SettingsError> {
        let settings: Settings = Self::read(path)?;
        settings.check().map_err(|message| SettingsError::Invalid {
            path: path.to_path_buf(),
            message,
        })?;
        if settings.ledger.lock_ttl < MIN_LOCK_TTL {
            // Allowed for tests that kill runs on purpose (a killed run's lock is free at
            // once), never right for a deployment.
            tracing::warn!(
                lock_ttl = %humantime::format_duration(settings.ledger.lock_ttl),
                minimum = %humantime::format_duration(MIN_LOCK_TTL),
                "ledger.lock_ttl is shorter than a run's lock refresh: a second run may take \
                 the ledger beside a live one"
            );
        }
        Ok(settings)
    }

    /// What the offline mapping commands (`mappings validate|test|explain`) need: read like
    /// [`Settings::load`] but without resolving a secret (a mapping repository's CI job has no
    /// API keys) nor judging the sections it does not use.
    pub fn load_for_mappings(path: &std::path::Path) -> Result<MappingSettings, SettingsError> {
        #[derive(Deserialize)]
        struct Only {
            #[serde(default = "default_mappings")]
            mappings: Vec<PathBuf>,
            #[serde(default)]
            sinks: std::collections::BTreeMap<String, serde::de::IgnoredAny>,
        }
        let only: Only = Self::read(path)?;
        Ok(MappingSettings {
            mappings: only.mappings,
            sinks: only.sinks.into_keys().collect(),
        })
    }

    /// What `reconcile` needs: the ledger and the sinks (their secrets resolved), read like
    /// [`Settings::load`] but without resolving the providers' secrets nor judging the sections
    /// it does not use: it pulls and maps nothing, so a shell with only the invoicing system's
    /// key can run it.
    pub fn load_for_reconcile(path: &std::path::Path) -> Result<ReconcileSettings, SettingsError> {
        #[derive(Deserialize)]
        struct Only {
            ledger: LedgerSettings,
            #[serde(default)]
            sinks: std::collections::BTreeMap<String, SinkSettings>,
        }
        let only: Only = Self::read(path)?;
        Ok(ReconcileSettings {
            ledger: only.ledger,
            sinks: only.sinks,
        })
    }

    /// What `status` and the `ledger` commands need: the ledger's settings and the Stripe
    /// sinks' `max_age`, read like [`Settings::load`] but without resolving a secret nor
    /// judging the sections they do not use: they only work on the ledger, so a shell without
    /// the providers' and sinks' keys can run them.
    pub fn load_for_ledger(path: &std::path::Path) -> Result<LedgerCommandSettings, SettingsError> {
        #[derive(Deserialize)]
        struct Sink {
            kind: String,
            #[serde(default)]
            max_age: Option<String>,
        }
        #[derive(Deserialize)]
        struct Only {
            ledger: LedgerSettings,
            #[serde(default)]
            sinks: std::collections::BTreeMap<String, Sink>,
        }
        let only: Only = Self::read(path)?;
        let mut stripe_max_age = std::collections::BTreeMap::new();
        for (name, sink) in only.sinks {
            if sink.kind != "stripe" {
                continue;
            }
            let max_age = match sink.max_age {
                None => crate::sinks::stripe::default_max_age(),
                Some(text) => {
                    humantime::parse_duration(&text).map_err(|e| SettingsError::Invalid {
                        path: path.to_path_buf(),
                        message: format!(
                            "invalid duration {text:?}: {e} for key `sinks.{name}.max_age`"
                        ),
                    })?
                }
            };
            stripe_max_age.insert(name, max_age);
        }
        Ok(LedgerCommandSettings {
            ledger: only.ledger,
            stripe_max_age,
        })
    }

    /// The file, then `BILLSYNC__SECTION__KEY` environment overrides, as `T`.
    fn read<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, SettingsError> {
        if !path.exists() {
            return Err(SettingsError::Missing {
                path: path.to_path_buf(),
            });
        }
        if path.is_dir() {
            return Err(SettingsError::Invalid {
                path: path.to_path_buf(),
                message:
                    "is a directory, not a settings file (pass --config FILE, e.g. billsync.yaml)"
                        .into(),
            });
        }
        let invalid = |e: config::ConfigError| SettingsError::Invalid {
            path: path.to_path_buf(),
            message: join_keys(e.to_string()),
        };
        if let Some(message) = mistyped_override(std::env::vars_os().map(|(k, _)| k)) {
            return Err(SettingsError::Invalid {
                path: path.to_path_buf(),
                message,
            });
        }
        config::Config::builder()
            .add_source(config::File::from(path).format(config::FileFormat::Yaml))
            .add_source(
                config::Environment::with_prefix("BILLSYNC")
                    .prefix_separator("__")
                    .separator("__"),
            )
            .build()
            .map_err(invalid)?
            .try_deserialize()
            .map_err(invalid)
    }

    fn check(&self) -> Result<(), String> {
        if self.sinks.is_empty() {
            return Err("no sink is configured (`sinks:`)".into());
        }
        match &self.default_sink {
            Some(name) if !self.sinks.contains_key(name) => Err(format!(
                "default_sink {name:?} is not one of the configured sinks ({})",
                self.sinks.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
            None if self.sinks.len() > 1 => Err(
                "several sinks are configured: say which is the default with `default_sink`".into(),
            ),
            _ => Ok(()),
        }
    }

    /// The default sink's name.
    pub fn default_sink_name(&self) -> Option<&str> {
        self.default_sink
            .as_deref()
            .or_else(|| self.sinks.keys().next().map(String::as_str))
    }
}
