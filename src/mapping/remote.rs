//! Comparing the mappings with what an invoicing system has (`billsync mappings check
//! --remote`). Pure: the caller fetches the metrics and subscriptions (see
//! [`crate::sinks::lago_admin`]) and this module decides what does not fit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::schema::ValueSpec;
use super::MappingSet;

/// A billable metric as the invoicing system describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteMetric {
    /// The metric code.
    pub code: String,
    /// Lago `aggregation_type`: `count_agg`, `sum_agg`, `max_agg`, `unique_count_agg`,
    /// `latest_agg`, `weighted_sum_agg`, `custom_agg`.
    pub aggregation_type: String,
    /// The property aggregated (`None` for `count_agg`).
    pub field_name: Option<String>,
}

/// One finding of the remote check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFinding {
    /// `true`: the mapping cannot work as is (exit non-zero); `false`: a warning.
    pub error: bool,
    /// What is wrong and where it comes from.
    pub message: String,
}

impl fmt::Display for RemoteFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let level = if self.error { "error" } else { "warning" };
        write!(f, "{level}: {}", self.message)
    }
}

impl MappingSet {
    /// Every metric code the rules send, with the rules (`file#name`, property, value kind).
    pub fn metric_uses(&self) -> BTreeMap<String, Vec<(String, String, &'static str)>> {
        let mut out: BTreeMap<String, Vec<(String, String, &'static str)>> = BTreeMap::new();
        for r in &self.rules {
            if let Some(m) = &r.rule.metric {
                let kind = match r.rule.value {
                    Some(ValueSpec::Cost(_)) => "cost",
                    _ => "quantity",
                };
                out.entry(m.0.clone()).or_default().push((
                    r.id.clone(),
                    r.rule
                        .property
                        .as_ref()
                        .map_or_else(|| "value".to_string(), |p| p.0.clone()),
                    kind,
                ));
            }
        }
        out
    }

    /// Every subscription the rules' targets, the customer entries and the directory name,
    /// with where each is named first (`file:line`).
    pub fn subscription_uses(&self) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        for r in &self.rules {
            if let Some(t) = &r.rule.target {
                out.entry(t.external_subscription_id.0.clone())
                    .or_insert_with(|| format!("{}:{} (rule target)", r.file, r.line));
            }
        }
        for c in &self.customers {
            out.entry(c.entry.external_subscription_id.0.clone())
                .or_insert_with(|| format!("{}:{} (customer entry)", c.file, c.line));
        }
        for row in self.directory.iter() {
            out.entry(row.subscription.to_string())
                .or_insert_with(|| format!("{}:{} (account directory)", row.file, row.line));
        }
        out
    }

    /// Compares the mappings with the remote metrics and subscription ids.
    pub fn check_remote(
        &self,
        metrics: &[RemoteMetric],
        subscriptions: &BTreeSet<String>,
    ) -> Vec<RemoteFinding> {
        let mut out = Vec::new();
        let by_code: BTreeMap<&str, &RemoteMetric> =
            metrics.iter().map(|m| (m.code.as_str(), m)).collect();
        for (code, uses) in self.metric_uses() {
            let Some(m) = by_code.get(code.as_str()) else {
                let rules: Vec<&str> = uses.iter().map(|u| u.0.as_str()).collect();
                out.push(RemoteFinding {
                    error: true,
                    message: format!(
                        "billable metric `{code}` (used by {}) does not exist in Lago; create it \
                         or fix the rule's `metric:`",
                        rules.join(", ")
                    ),
                });
                continue;
            };
            for (rule, property, _kind) in uses {
                match m.aggregation_type.as_str() {
                    "count_agg" => out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "metric `{code}` counts events (count_agg), so the value `{property}` \
                             that rule {rule} sends is ignored"
                        ),
                    }),
                    "sum_agg" | "max_agg" | "latest_agg" | "weighted_sum_agg" => {
                        if m.field_name.as_deref() != Some(property.as_str()) {
                            out.push(RemoteFinding {
                                error: true,
                                message: format!(
                                    "metric `{code}` ({}) aggregates the property `{}`, but rule \
                                     {rule} sends its value as `{property}`; set `property: {}` \
                                     in the rule",
                                    m.aggregation_type,
                                    m.field_name.as_deref().unwrap_or("<none>"),
                                    m.field_name.as_deref().unwrap_or("<none>")
                                ),
                            });
                        }
                    }
                    "unique_count_agg" => out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "metric `{code}` counts distinct values of `{}` (unique_count_agg); \
                             rule {rule} sends a number as `{property}`—check this is intended",
                            m.field_name.as_deref().unwrap_or("<none>")
                        ),
                    }),
                    other => out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "metric `{code}` has aggregation `{other}`, which this check does not \
                             know; rule {rule} sends `{property}`"
                        ),
                    }),
                }
            }
        }
        for (sub, origin) in self.subscription_uses() {
            if !subscriptions.contains(&sub) {
                out.push(RemoteFinding {
                    error: true,
                    message: format!(
                        "subscription `{sub}` (named at {origin}) does not exist in Lago; events \
                         for it would be refused"
                    ),
                });
            }
        }
        out
    }
}
