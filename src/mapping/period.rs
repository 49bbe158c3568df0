//! Period pricing: `minimum` and `tiers` over a month's total (`period: month`).
//!
//! A billing engineer writes "at least 50 EUR a month for this customer's metric" or "20 % on
//! the first 1,000 EUR of the month, 10 % above"; records arrive hourly over the month. The
//! design keeps mapping pure and sending exactly-once:
//!
//! * **Per record** the value carries everything but the period parts: monthly `tiers` at
//!   their *lowest* rate, no monthly `minimum`. Every part of a non-negative total is marked up
//!   at least at the lowest rate, so what the sink holds during the month never exceeds what the
//!   month finally costs, comes as close to it as a per-record price can, and does not depend on
//!   the other records (a re-read or a replay prices a record the same way).
//! * **Per period** — one (sink, subscription, metric, month) — the ledger keeps each record's
//!   *share*: its value at the input of the monthly tiers (`base`) and the period rule
//!   ([`PeriodSpec`]). When the month closes, [`settle`] computes the month's price from the
//!   sum of the bases and the sum of what the records carry, and the sync stages **one**
//!   adjustment event for the difference, under a key derived from the group only. A change
//!   after that (a correction, a late record) settles the group again; the existing correction
//!   machinery sends the exact remaining difference as `<key>.r<n>`.
//!
//! The month's price: `R` = what the records carry (originals plus corrections), `S` = the sum
//! of their bases. Tiers add `F × (tiered(S) − lowest% × S)`, where `F` is the product of the
//! percentage steps that follow the tiers (a later markup or commission; a fixed markup adds
//! per record and is already in `R`). The minimum then raises a non-negative total to at least
//! `minimum`. The result is rounded once with the rule's rounding; the adjustment is that total
//! minus `R`. Records keep their own rounding, so the adjustment carries only the month's parts.
//! When the records of one month were staged under different period rules (the mapping changed
//! during the month), the monthly parts (tiers on the month's base beyond *their* lowest rate,
//! minimum) are those of the rule of the month's latest record, and every record keeps the
//! price it was sent with: `R` is what the sink holds, never re-priced. A record sent at another
//! per-record rate than the latest rule's lowest (flat before monthly tiers were added, or
//! under other tiers) therefore keeps that rate for its part; the month's tiers add only what
//! they charge beyond their own lowest rate.

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, TimeZone, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

use super::schema::RoundMode;

/// One tier of a monthly tiered markup.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TierSpec {
    /// Upper bound of the tier (`None`: the open last tier).
    pub up_to: Option<Decimal>,
    /// Markup in percent of the part inside the tier.
    pub markup_percent: Decimal,
}

/// The period rule every record of one group must share; stored with each record's share.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeriodSpec {
    /// `month`.
    pub period: String,
    /// The offset of the month boundaries, `+00:00` for UTC.
    pub utc_offset: String,
    /// The invoice currency.
    pub currency: String,
    /// Monthly tiers (empty: none).
    pub tiers: Vec<TierSpec>,
    /// The lowest tier rate, which records already carry.
    pub lowest_percent: Decimal,
    /// The product of the percentage steps after the monthly tiers (1 when none).
    pub factor: Decimal,
    /// Monthly minimum, in `currency`.
    pub minimum: Option<Decimal>,
    /// Rounding of the month's total (the rule's).
    pub scale: u32,
    pub mode: RoundMode,
}

/// A record's part of its period: which month, its base and the rule.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PeriodShare {
    /// Start of the month (inclusive), UTC.
    pub start: DateTime<Utc>,
    /// End of the month (exclusive), UTC.
    pub end: DateTime<Utc>,
    /// `2026-10`, or `2026-10 (+09:00)` at another offset.
    pub label: String,
    /// The record's value at the input of the monthly tiers (0 without monthly tiers).
    pub base: Decimal,
    pub spec: PeriodSpec,
}

/// The month's price of one group.
#[derive(Debug, Clone, PartialEq)]
pub struct PeriodPrice {
    /// What the records carry (`R`).
    pub records_total: Decimal,
    /// The sum of the bases (`S`).
    pub tier_base: Decimal,
    /// What the monthly tiers add beyond the lowest rate the records carry (unrounded).
    pub tier_extra: Decimal,
    /// The month's total, rounded (`P`).
    pub total: Decimal,
    /// `P − R`: what the adjustment events of the month must add up to.
    pub adjustment: Decimal,
    /// How, step by step, for `explain`, `mappings test` and the ledger.
    pub steps: Vec<String>,
}

/// The calendar month containing `at` at `offset`: (start, end) in UTC and its label.
pub fn month_of(at: DateTime<Utc>, offset: FixedOffset) -> (DateTime<Utc>, DateTime<Utc>, String) {
    let local = at.with_timezone(&offset);
    let (y, m) = (local.year(), local.month());
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let midnight = |y: i32, m: u32| -> DateTime<Utc> {
        let day = NaiveDate::from_ymd_opt(y, m, 1).unwrap_or(NaiveDate::MIN);
        // A fixed offset has no gaps: local midnight always exists exactly once.
        offset
            .from_local_datetime(&day.and_hms_opt(0, 0, 0).unwrap_or_default())
            .single()
            .map_or(at, |t| t.with_timezone(&Utc))
    };
    let label = if offset.local_minus_utc() == 0 {
        format!("{y:04}-{m:02}")
    } else {
        format!("{y:04}-{m:02} ({offset})")
    };
    (midnight(y, m), midnight(ny, nm), label)
}

/// The markup tiers add to a non-negative `magnitude`: each tier's percentage of the part of
/// the magnitude inside it. Returns the amount added and one `part × p% = x` text per tier used.
pub(crate) fn tiered_markup(
    magnitude: Decimal,
    tiers: &[TierSpec],
) -> Result<(Decimal, Vec<String>), String> {
    let mut lower = Decimal::ZERO;
    let mut added = Decimal::ZERO;
    let mut parts = Vec::new();
    for t in tiers {
        let top = t.up_to.map_or(magnitude, |u| magnitude.min(u));
        let part = top
            .checked_sub(lower)
            .ok_or("tiered markup overflows")?
            .max(Decimal::ZERO);
        if part > Decimal::ZERO {
            let extra = part
                .checked_mul(t.markup_percent / Decimal::ONE_HUNDRED)
                .ok_or("tiered markup overflows")?;
            added = added.checked_add(extra).ok_or("tiered markup overflows")?;
            parts.push(format!("{part} × {}% = {extra}", t.markup_percent));
        }
        if let Some(u) = t.up_to {
            lower = u;
        }
    }
    Ok((added, parts))
}

/// The month's price of a group whose members have `(base, value)`: see the module docs.
pub fn settle(spec: &PeriodSpec, members: &[(Decimal, Decimal)]) -> Result<PeriodPrice, String> {
    let overflow = || "the period total overflows".to_string();
    let (mut r, mut s) = (Decimal::ZERO, Decimal::ZERO);
    for (base, value) in members {
        r = r.checked_add(*value).ok_or_else(overflow)?;
        s = s.checked_add(*base).ok_or_else(overflow)?;
    }
    let cur = &spec.currency;
    let mut steps = vec![format!(
        "{} record(s) carry {r} {cur} (per-record prices)",
        members.len()
    )];
    let mut priced = r;
    let mut tier_extra = Decimal::ZERO;
    if !spec.tiers.is_empty() {
        let (added, parts) = tiered_markup(s.abs(), &spec.tiers)?;
        let signed = if s.is_sign_negative() { -added } else { added };
        let at_lowest = s
            .checked_mul(spec.lowest_percent / Decimal::ONE_HUNDRED)
            .ok_or_else(overflow)?;
        tier_extra = signed
            .checked_sub(at_lowest)
            .and_then(|d| d.checked_mul(spec.factor))
            .ok_or_else(overflow)?;
        priced = priced.checked_add(tier_extra).ok_or_else(overflow)?;
        let factor = if spec.factor == Decimal::ONE {
            String::new()
        } else {
            format!(" × {} (the percentage steps after the tiers)", spec.factor)
        };
        steps.push(format!(
            "monthly tiers on the month's base {s} {cur}: {}; the records carry the lowest rate \
             {}% ({at_lowest}); tiers add ({signed} − {at_lowest}){factor} = {tier_extra}",
            if parts.is_empty() {
                "nothing".to_string()
            } else {
                parts.join(", ")
            },
            spec.lowest_percent
        ));
    }
    if let Some(min) = spec.minimum {
        if priced >= Decimal::ZERO && priced < min {
            steps.push(format!(
                "monthly minimum {min} {cur}: {priced} is raised to {min}"
            ));
            priced = min;
        } else {
            steps.push(format!(
                "monthly minimum {min} {cur}: no effect on {priced}"
            ));
        }
    }
    let total = priced.round_dp_with_strategy(spec.scale, spec.mode.strategy());
    let adjustment = total.checked_sub(r).ok_or_else(overflow)?;
    steps.push(format!(
        "month total {total} {cur} ({} to {} places); adjustment {total} − {r} = {adjustment}",
        spec.mode.name(),
        spec.scale
    ));
    Ok(PeriodPrice {
        records_total: r,
        tier_base: s,
        tier_extra,
        total,
        adjustment,
        steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::str::FromStr;

    fn d(s: &str) -> Decimal {
        Decimal::from_str(s).unwrap()
    }

    fn spec(tiers: Vec<TierSpec>, minimum: Option<&str>) -> PeriodSpec {
        let lowest = tiers
            .iter()
            .map(|t| t.markup_percent)
            .min()
            .unwrap_or_default();
        PeriodSpec {
            period: "month".into(),
            utc_offset: "+00:00".into(),
            currency: "EUR".into(),
            tiers,
            lowest_percent: lowest,
            factor: Decimal::ONE,
            minimum: minimum.map(d),
            scale: 2,
            mode: RoundMode::HalfUp,
        }
    }

    #[test]
    fn month_bounds_in_utc_and_at_an_offset() {
        let t = Utc.with_ymd_and_hms(2026, 10, 31, 15, 30, 0).unwrap();
        let (s, e, l) = month_of(t, FixedOffset::east_opt(0).unwrap());
        assert_eq!(s, Utc.with_ymd_and_hms(2026, 10, 1, 0, 0, 0).unwrap());
        assert_eq!(e, Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
        assert_eq!(l, "2026-10");
        // 15:30 UTC on 31 October is 00:30 on 1 November in JST.
        let (s, e, l) = month_of(t, FixedOffset::east_opt(9 * 3600).unwrap());
        assert_eq!(s, Utc.with_ymd_and_hms(2026, 10, 31, 15, 0, 0).unwrap());
        assert_eq!(e, Utc.with_ymd_and_hms(2026, 11, 30, 15, 0, 0).unwrap());
        assert_eq!(l, "2026-11 (+09:00)");
        let dec = Utc.with_ymd_and_hms(2026, 12, 5, 0, 0, 0).unwrap();
        let (_, e, _) = month_of(dec, FixedOffset::east_opt(0).unwrap());
        assert_eq!(e, Utc.with_ymd_and_hms(2027, 1, 1, 0, 0, 0).unwrap());
    }

    #[test]
    fn a_minimum_raises_the_month_and_the_adjustment_is_the_rest() {
        let p = settle(
            &spec(vec![], Some("50")),
            &[(d("0"), d("10.10")), (d("0"), d("7"))],
        )
        .unwrap();
        assert_eq!(
            (p.records_total, p.total, p.adjustment),
            (d("17.10"), d("50"), d("32.90"))
        );
        let p = settle(&spec(vec![], Some("50")), &[(d("0"), d("60"))]).unwrap();
        assert_eq!(p.adjustment, d("0"));
        // A net credit is left alone, as a per-record minimum leaves a credit alone.
        let p = settle(&spec(vec![], Some("50")), &[(d("0"), d("-5"))]).unwrap();
        assert_eq!(p.adjustment, d("0"));
    }

    #[test]
    fn tiers_apply_to_the_month_sum() {
        let tiers = vec![
            TierSpec {
                up_to: Some(d("1000")),
                markup_percent: d("20"),
            },
            TierSpec {
                up_to: None,
                markup_percent: d("10"),
            },
        ];
        // Three records of 600: base 1800; records carry 10 % (660 each, 1980 in all).
        let members = vec![(d("600"), d("660")); 3];
        let p = settle(&spec(tiers, None), &members).unwrap();
        // 1000 × 20 % + 800 × 10 % = 280; the records carry 180; the month adds 100.
        assert_eq!((p.total, p.adjustment), (d("2080"), d("100")));
    }
}
