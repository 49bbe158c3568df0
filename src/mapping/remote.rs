//! Comparing the mappings with what an invoicing system has (`billsync mappings check
//! --remote`). Pure: the caller fetches the metrics and subscriptions (see
//! [`crate::sinks::lago_admin`]) and this module decides what does not fit.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use super::check::may_overlap;
use super::schema::{Condition, FieldName, Rule, ValueSpec};
use super::{LoadedRule, MappingSet};

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

/// A subscription as Lago lists it (`GET /api/v1/subscriptions`). One external id may be
/// listed twice: after a plan change, terminated on the old plan and active on the new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSubscription {
    /// `external_id`: what the events name.
    pub external_id: String,
    /// `external_customer_id` (empty when absent).
    pub external_customer_id: String,
    /// `status`: `active`, `pending` or `terminated` (the ones the check lists).
    pub status: String,
    /// `plan_code` (`None`: not given).
    pub plan_code: Option<String>,
    /// `terminated_at`, as Lago writes it.
    pub terminated_at: Option<String>,
}

impl RemoteSubscription {
    /// An active subscription on no known plan.
    pub fn active(external_id: &str) -> RemoteSubscription {
        RemoteSubscription {
            external_id: external_id.to_string(),
            external_customer_id: String::new(),
            status: "active".to_string(),
            plan_code: None,
            terminated_at: None,
        }
    }
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

/// Whether `rule` sends its events to the sink `sink`: the one it names, else the settings'
/// `default_sink`.
fn sends_to(rule: &Rule, sink: &str, default_sink: &str) -> bool {
    match &rule.sink {
        Some(s) => s.0 == sink,
        None => sink == default_sink,
    }
}

/// What a metric's aggregation makes of the values of one period, for the findings.
fn aggregates(aggregation_type: &str) -> &'static str {
    match aggregation_type {
        "max_agg" => "bills the largest value of the billing period",
        "latest_agg" => "bills the last value of the billing period",
        "weighted_sum_agg" => "bills a time-weighted sum (each value held until the next event)",
        "count_agg" => "bills the number of events, whatever their values",
        "unique_count_agg" => "bills the number of distinct values",
        _ => "is not known to this check to add the values up",
    }
}

impl MappingSet {
    /// Every metric code the rules sending to `sink` use (rules without `sink:` send to
    /// `default_sink`), with the rules (`file#name`, property, value kind).
    pub fn metric_uses(
        &self,
        sink: &str,
        default_sink: &str,
    ) -> BTreeMap<String, Vec<(String, String, &'static str)>> {
        let mut out: BTreeMap<String, Vec<(String, String, &'static str)>> = BTreeMap::new();
        for r in &self.rules {
            if r.rule.ignore || !sends_to(&r.rule, sink, default_sink) {
                continue;
            }
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

    /// Every subscription the rules sending to `sink` may bill (rules without `sink:` send to
    /// `default_sink`), with where each is named first (`file:line`): their targets, and the
    /// customer entries and account-directory rows that can match a record of one of them
    /// without a target (judged on the conditions both name, erring towards yes). Entries and
    /// rows name no sink: the rules they meet decide where their subscriptions are billed.
    pub fn subscription_uses(&self, sink: &str, default_sink: &str) -> BTreeMap<String, String> {
        self.reach(sink, default_sink)
            .into_iter()
            .map(|(sub, (origin, _))| (sub, origin))
            .collect()
    }

    /// [`Self::subscription_uses`], each with the metric codes the rules may send it.
    fn reach(&self, sink: &str, default_sink: &str) -> BTreeMap<String, (String, BTreeSet<&str>)> {
        fn metric_of(r: &LoadedRule) -> Option<&str> {
            r.rule.metric.as_ref().map(|m| m.0.as_str())
        }
        let mut out: BTreeMap<String, (String, BTreeSet<&str>)> = BTreeMap::new();
        let rules: Vec<&LoadedRule> = self
            .rules
            .iter()
            .filter(|r| !r.rule.ignore && sends_to(&r.rule, sink, default_sink))
            .collect();
        for r in &rules {
            if let Some(t) = &r.rule.target {
                out.entry(t.external_subscription_id.0.clone())
                    .or_insert_with(|| {
                        (
                            format!("{}:{} (rule target)", r.file, r.line),
                            BTreeSet::new(),
                        )
                    })
                    .1
                    .extend(metric_of(r));
            }
        }
        let looked_up: Vec<&LoadedRule> = rules
            .into_iter()
            .filter(|r| r.rule.target.is_none())
            .collect();
        let meeting = |conds: &[(FieldName, Condition)]| -> Option<BTreeSet<&str>> {
            let met: Vec<&LoadedRule> = looked_up
                .iter()
                .copied()
                .filter(|r| may_overlap(&r.rule.conditions.0, conds))
                .collect();
            (!met.is_empty()).then(|| met.into_iter().filter_map(metric_of).collect())
        };
        for c in &self.customers {
            if let Some(metrics) = meeting(&c.entry.conditions.0) {
                out.entry(c.entry.external_subscription_id.0.clone())
                    .or_insert_with(|| {
                        (
                            format!("{}:{} (customer entry)", c.file, c.line),
                            BTreeSet::new(),
                        )
                    })
                    .1
                    .extend(metrics);
            }
        }
        for row in self.directory.iter() {
            let conds = [
                (
                    FieldName("provider".into()),
                    Condition::Exact(row.provider.to_string()),
                ),
                (
                    FieldName("sub_account_id".into()),
                    Condition::Exact(row.sub_account_id.to_string()),
                ),
            ];
            if let Some(metrics) = meeting(&conds) {
                out.entry(row.subscription.to_string())
                    .or_insert_with(|| {
                        (
                            format!("{}:{} (account directory)", row.file, row.line),
                            BTreeSet::new(),
                        )
                    })
                    .1
                    .extend(metrics);
            }
        }
        out
    }

    /// Compares what the rules sending to the Lago sink `sink` use (rules without `sink:`
    /// send to `default_sink`) with its metrics, subscriptions and the plans read of them
    /// (`plans`: plan code → the metric codes it has a charge for; a plan not in it is not
    /// judged). The rules of other sinks are not looked at: a Stripe meter's `event_name` or
    /// a `cus_…` id is not missing from Lago.
    pub fn check_remote(
        &self,
        sink: &str,
        default_sink: &str,
        metrics: &[RemoteMetric],
        subscriptions: &[RemoteSubscription],
        plans: &BTreeMap<String, BTreeSet<String>>,
    ) -> Vec<RemoteFinding> {
        let mut out = Vec::new();
        let by_code: BTreeMap<&str, &RemoteMetric> =
            metrics.iter().map(|m| (m.code.as_str(), m)).collect();
        for (code, uses) in self.metric_uses(sink, default_sink) {
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
            let agg = m.aggregation_type.as_str();
            let field = m.field_name.as_deref().unwrap_or("<none>");
            for (rule, property, kind) in uses {
                // Costs are one amount per record (a window, a bill line): the period's charge
                // is their sum, and only `sum_agg` adds them up. Any other aggregation bills a
                // part of them (or their count) while `reconcile` finds every event stored.
                if kind == "cost" && agg != "sum_agg" {
                    out.push(RemoteFinding {
                        error: true,
                        message: format!(
                            "metric `{code}` ({agg}) {}, but rule {rule} sends costs (one amount \
                             per record, to be added up): the rest of the period's amounts are \
                             not billed; make the metric `sum_agg` on `{property}`, or send the \
                             rule to a `sum_agg` metric",
                            aggregates(agg)
                        ),
                    });
                }
                match agg {
                    "count_agg" if kind == "quantity" => out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "metric `{code}` counts events (count_agg), so the value `{property}` \
                             that rule {rule} sends is ignored"
                        ),
                    }),
                    "unique_count_agg" if kind == "quantity" => out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "metric `{code}` counts distinct values of `{field}` \
                             (unique_count_agg); rule {rule} sends a number as `{property}`—check \
                             this is intended"
                        ),
                    }),
                    "max_agg" | "latest_agg" | "weighted_sum_agg" if kind == "quantity" => {
                        // A level (peak or last storage GB) is billed so on purpose; usage per
                        // window (hours, GB transferred) must be summed.
                        out.push(RemoteFinding {
                            error: false,
                            message: format!(
                                "metric `{code}` ({agg}) {}, not the sum of the quantities rule \
                                 {rule} sends as `{property}`: right for a level (e.g. the peak \
                                 or last storage GB), wrong for usage per record (hours, GB \
                                 transferred), which needs `sum_agg`",
                                aggregates(agg)
                            ),
                        })
                    }
                    "sum_agg" | "max_agg" | "latest_agg" | "weighted_sum_agg" => {}
                    other if kind == "quantity" => out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "metric `{code}` has aggregation `{other}`, which this check does not \
                             know; rule {rule} sends `{property}`"
                        ),
                    }),
                    _ => {}
                }
                if matches!(
                    agg,
                    "sum_agg" | "max_agg" | "latest_agg" | "weighted_sum_agg"
                ) && m.field_name.as_deref() != Some(property.as_str())
                {
                    out.push(RemoteFinding {
                        error: true,
                        message: format!(
                            "metric `{code}` ({agg}) aggregates the property `{field}`, but rule \
                             {rule} sends its value as `{property}`; set `property: {field}` in \
                             the rule"
                        ),
                    });
                }
            }
        }
        let mut listed: BTreeMap<&str, Vec<&RemoteSubscription>> = BTreeMap::new();
        for s in subscriptions {
            listed.entry(s.external_id.as_str()).or_default().push(s);
        }
        // (plan, metric) → the subscriptions on that plan the rules may send the metric to
        let mut uncharged: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
        for (sub, (origin, sent)) in self.reach(sink, default_sink) {
            let Some(entries) = listed.get(sub.as_str()) else {
                out.push(RemoteFinding {
                    error: true,
                    message: format!(
                        "subscription `{sub}` (named at {origin}) does not exist in Lago; events \
                         for it would be refused"
                    ),
                });
                continue;
            };
            let live: Vec<&&RemoteSubscription> = entries
                .iter()
                .filter(|s| s.status != "terminated")
                .collect();
            if live.is_empty() {
                let since = entries
                    .iter()
                    .filter_map(|s| s.terminated_at.as_deref())
                    .max()
                    .map_or_else(String::new, |t| format!(" since {t}"));
                out.push(RemoteFinding {
                    error: false,
                    message: format!(
                        "subscription `{sub}` (named at {origin}) is terminated in Lago{since}: \
                         Lago bills no event dated after its termination; bill that usage to \
                         the subscription that replaces it"
                    ),
                });
                continue;
            }
            for s in live {
                let Some((plan, charged)) =
                    s.plan_code.as_ref().and_then(|p| plans.get_key_value(p))
                else {
                    continue;
                };
                for m in sent.iter().filter(|m| !charged.contains(**m)) {
                    let subs = uncharged.entry((plan.as_str(), *m)).or_default();
                    if subs.last() != Some(&sub) {
                        subs.push(sub.clone());
                    }
                }
            }
        }
        for ((plan, metric), subs) in uncharged {
            let mut names: Vec<String> = subs.iter().take(5).map(|s| format!("`{s}`")).collect();
            if subs.len() > 5 {
                names.push(format!("and {} more", subs.len() - 5));
            }
            out.push(RemoteFinding {
                error: false,
                message: format!(
                    "plan `{plan}` has no charge for billable metric `{metric}`, which the rules \
                     send to its subscription(s) {}: Lago stores those events and bills nothing \
                     for them; add a charge for `{metric}` to the plan",
                    names.join(", ")
                ),
            });
        }
        out
    }
}

// --- invoicing periods: grace period and timezone ------------------------------------------

/// How long after the end of a billing period the last records a source dates in it reach the
/// invoicing system (at worst), and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lateness {
    /// The source name (`providers.<name>`), or `period pricing` for the month adjustments.
    pub source: String,
    /// The provider kind (`sakura`, `metalsoft`, …); empty for period pricing.
    pub kind: String,
    /// From the period's end to the last records' arrival.
    pub after_end: chrono::Duration,
    /// How `after_end` is made up, e.g. `final_lag 1 day + run interval 1h`.
    pub why: String,
}

/// A Lago customer as far as its invoicing periods go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteCustomer {
    /// `external_id`.
    pub external_id: String,
    /// `applicable_timezone` (else `timezone`): the timezone of its billing periods.
    pub timezone: Option<String>,
    /// `billing_configuration.invoice_grace_period` (days): its own, `None` when it follows
    /// its billing entity.
    pub grace_days: Option<i64>,
    /// `billing_entity_code`.
    pub billing_entity: Option<String>,
}

/// A Lago billing entity (`GET /api/v1/billing_entities`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteBillingEntity {
    /// `code`.
    pub code: String,
    /// `invoice_grace_period` (days).
    pub grace_days: i64,
    /// `timezone`.
    pub timezone: Option<String>,
    /// `is_default`: the entity of customers that name none.
    pub is_default: bool,
}

/// Timezones of Lago's `Timezone` list whose offset is +09:00 or more all year: the start of a
/// SAKURA month (the 1st, 00:00 JST) falls on the 1st there too, inside the month. Everywhere
/// else (UTC, Europe, the Americas, the rest of Asia) it is still the last day of the month
/// before. (Computed from the IANA database for each zone of the spec's enum.)
pub const JST_MONTH_START_INSIDE: &[&str] = &[
    "Asia/Kamchatka",
    "Asia/Magadan",
    "Asia/Seoul",
    "Asia/Srednekolymsk",
    "Asia/Tokyo",
    "Asia/Vladivostok",
    "Asia/Yakutsk",
    "Australia/Adelaide",
    "Australia/Brisbane",
    "Australia/Darwin",
    "Australia/Hobart",
    "Australia/Melbourne",
    "Australia/Sydney",
    "Pacific/Apia",
    "Pacific/Auckland",
    "Pacific/Chatham",
    "Pacific/Fakaofo",
    "Pacific/Fiji",
    "Pacific/Guadalcanal",
    "Pacific/Guam",
    "Pacific/Majuro",
    "Pacific/Noumea",
    "Pacific/Port_Moresby",
    "Pacific/Tongatapu",
];

/// `2 days`, `1day 1h`: whole days when whole days.
fn human(d: chrono::Duration) -> String {
    let secs = d.num_seconds().max(0);
    if secs > 0 && secs % 86_400 == 0 {
        let days = secs / 86_400;
        return format!("{days} day{}", if days == 1 { "" } else { "s" });
    }
    humantime::format_duration(std::time::Duration::from_secs(secs as u64)).to_string()
}

fn days(n: i64) -> String {
    format!("{n} day{}", if n == 1 { "" } else { "s" })
}

/// Whether `conditions` can accept a record of source `name` of provider `kind` (only their
/// `provider` and `source` conditions are looked at: conservative, it may say yes wrongly).
fn admits(conditions: &super::schema::Conditions, name: &str, kind: &str) -> bool {
    conditions
        .0
        .iter()
        .all(|(field, c)| match field.0.as_str() {
            "provider" => c.matches(Some(kind)),
            "source" => c.matches(Some(name)),
            _ => true,
        })
}

impl MappingSet {
    /// For each subscription the rules, customer entries and account directory bill, the
    /// sources (`(name, kind)`) whose records may reach it, judged on their `provider` and
    /// `source` conditions only (so it may name a source that never does, never miss one).
    pub fn sources_by_subscription(
        &self,
        sources: &[(String, String)],
    ) -> BTreeMap<String, BTreeSet<String>> {
        let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let billing = |name: &str, kind: &str| {
            self.rules.iter().any(|r| {
                !r.rule.ignore && r.rule.target.is_none() && admits(&r.rule.conditions, name, kind)
            })
        };
        for (name, kind) in sources {
            for r in &self.rules {
                if let Some(t) = &r.rule.target {
                    if !r.rule.ignore && admits(&r.rule.conditions, name, kind) {
                        out.entry(t.external_subscription_id.0.clone())
                            .or_default()
                            .insert(name.clone());
                    }
                }
            }
            if !billing(name, kind) {
                continue;
            }
            for c in &self.customers {
                if admits(&c.entry.conditions, name, kind) {
                    out.entry(c.entry.external_subscription_id.0.clone())
                        .or_default()
                        .insert(name.clone());
                }
            }
            for row in self.directory.iter() {
                if row.provider == kind {
                    out.entry(row.subscription.to_string())
                        .or_default()
                        .insert(name.clone());
                }
            }
        }
        out
    }

    /// The subscriptions some `period: month` pricing (a rule's or a customer entry's) may
    /// settle by an adjustment event after the month's end.
    pub fn month_priced_subscriptions(&self, sources: &[(String, String)]) -> BTreeSet<String> {
        use super::schema::PeriodKind;
        let by_sub = self.sources_by_subscription(sources);
        let mut out = BTreeSet::new();
        for c in &self.customers {
            if c.entry.pricing.as_ref().and_then(|p| p.period) == Some(PeriodKind::Month) {
                out.insert(c.entry.external_subscription_id.0.clone());
            }
        }
        for r in &self.rules {
            let monthly = matches!(&r.rule.value, Some(ValueSpec::Cost(c)) if c.period == Some(PeriodKind::Month));
            if !monthly || r.rule.ignore {
                continue;
            }
            if let Some(t) = &r.rule.target {
                out.insert(t.external_subscription_id.0.clone());
                continue;
            }
            let fed: BTreeSet<&String> = sources
                .iter()
                .filter(|(n, k)| admits(&r.rule.conditions, n, k))
                .map(|(n, _)| n)
                .collect();
            for (sub, srcs) in &by_sub {
                if srcs.iter().any(|s| fed.contains(s)) {
                    out.insert(sub.clone());
                }
            }
        }
        out
    }

    /// Compares how late the sources' records reach Lago with each billed customer's invoice
    /// grace period (its own, else its billing entity's, else Lago's default 0), and SAKURA
    /// sources with the customer's timezone. Warnings only: `subscriptions` maps each Lago
    /// subscription to its customer; customers missing from `customers` are not judged.
    pub fn check_periods(
        &self,
        sources: &[Lateness],
        period_pricing: Option<&Lateness>,
        subscriptions: &BTreeMap<String, String>,
        customers: &BTreeMap<String, RemoteCustomer>,
        entities: &[RemoteBillingEntity],
    ) -> Vec<RemoteFinding> {
        let pairs: Vec<(String, String)> = sources
            .iter()
            .map(|l| (l.source.clone(), l.kind.clone()))
            .collect();
        let by_source: BTreeMap<&str, &Lateness> =
            sources.iter().map(|l| (l.source.as_str(), l)).collect();
        let monthly = self.month_priced_subscriptions(&pairs);
        // customer → the needs of the subscriptions billed to it
        let mut needs: BTreeMap<&str, BTreeMap<&str, &Lateness>> = BTreeMap::new();
        for (sub, srcs) in self.sources_by_subscription(&pairs) {
            let Some(customer) = subscriptions.get(&sub) else {
                continue;
            };
            let entry = needs.entry(customer.as_str()).or_default();
            for s in &srcs {
                if let Some(l) = by_source.get(s.as_str()) {
                    entry.insert(l.source.as_str(), l);
                }
            }
            if let Some(p) = period_pricing.filter(|_| monthly.contains(&sub)) {
                entry.insert(p.source.as_str(), p);
            }
        }
        let default_entity = entities
            .iter()
            .find(|e| e.is_default)
            .or(if entities.len() == 1 {
                entities.first()
            } else {
                None
            });
        // (whose grace period, its days, the source) → the customers
        let mut short: BTreeMap<(String, i64, &str), Vec<&str>> = BTreeMap::new();
        let mut out = Vec::new();
        for (customer, wants) in &needs {
            let Some(c) = customers.get(*customer) else {
                continue;
            };
            let entity = c
                .billing_entity
                .as_deref()
                .and_then(|code| entities.iter().find(|e| e.code == code))
                .or(default_entity);
            let (whose, grace) = match (c.grace_days, entity) {
                (Some(d), _) => (format!("customer `{customer}`"), d),
                (None, Some(e)) => (format!("billing entity `{}`", e.code), e.grace_days),
                (None, None) => (format!("customer `{customer}` (no billing entity read)"), 0),
            };
            for l in wants.values() {
                if chrono::Duration::days(grace.max(0)) < l.after_end {
                    short
                        .entry((whose.clone(), grace, l.source.as_str()))
                        .or_default()
                        .push(customer);
                }
            }
            let timezone = c
                .timezone
                .clone()
                .or_else(|| entity.and_then(|e| e.timezone.clone()))
                .unwrap_or_else(|| "UTC".to_string());
            for l in wants.values().filter(|l| l.kind == "sakura") {
                if !JST_MONTH_START_INSIDE.contains(&timezone.as_str()) {
                    out.push(RemoteFinding {
                        error: false,
                        message: format!(
                            "customer `{customer}` is billed in timezone {timezone} but SAKURA \
                             source `{}` feeds it: a SAKURA month's records are dated at its \
                             start, the 1st 00:00 JST, which in {timezone} is still the last day \
                             of the month before, so Lago puts them in the previous billing \
                             period, whose invoice was finalized before the month is final and \
                             sent: they are not billed. Bill SAKURA usage to a customer in \
                             Asia/Tokyo (or another timezone at +09:00 or east of it)",
                            l.source
                        ),
                    });
                }
            }
        }
        for ((whose, grace, source), fed) in short {
            let l = by_source
                .get(source)
                .copied()
                .or(period_pricing)
                .expect("a need comes from a source or the period pricing");
            let needed = (l.after_end.num_seconds() + 86_399) / 86_400;
            let of = if whose.starts_with("billing entity") {
                let mut names: Vec<String> = fed.iter().take(5).map(|c| format!("`{c}`")).collect();
                if fed.len() > 5 {
                    names.push(format!("and {} more", fed.len() - 5));
                }
                format!(
                    " (of customer(s) {} without a grace period of their own)",
                    names.join(", ")
                )
            } else {
                String::new()
            };
            out.push(RemoteFinding {
                error: false,
                message: format!(
                    "{whose}{of}: invoice grace period {} is shorter than the {} after a \
                     period's end that `{source}` needs ({}) before its last records of the \
                     period reach Lago: those arrive after the period's invoice is finalized \
                     and are never billed; set invoice_grace_period to at least {}",
                    days(grace),
                    human(l.after_end),
                    l.why,
                    days(needed)
                ),
            });
        }
        out
    }
}
