//! Loading and validating mapping files into a [`MappingSet`].
//!
//! Errors are collected, not returned at the first problem: a billing engineer fixing a set of
//! files wants every mistake in one run. `serde_yaml_ng` stops at the first error inside one
//! file, so each file contributes at most one parse error, plus any semantic errors of the files
//! that did parse.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use chrono::{DateTime, NaiveDate, Utc};
use rust_decimal::Decimal;

use thiserror::Error;

use super::schema::{Condition, Conversion, Currency, MappingFile, Rule, ValueSpec};
use super::units::Unit;
use super::{LoadedCustomer, LoadedRule, MappingSet, Rates};

/// One problem in a mapping file, with its position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingError {
    /// The file's display name (as given to the loader).
    pub file: String,
    /// 1-based line; 0 when the problem concerns the whole file (e.g. it cannot be read).
    pub line: usize,
    /// 1-based column; 0 when the problem concerns the whole file.
    pub column: usize,
    /// What is wrong, for a human.
    pub message: String,
}

impl fmt::Display for MappingError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file, self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        }
    }
}

/// Every problem found while loading a set of mapping files; displays one per line.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", join_lines(.errors))]
pub struct MappingErrors {
    /// The problems, in file order.
    pub errors: Vec<MappingError>,
}

fn join_lines(errors: &[MappingError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Counts for `billsync mappings validate`, and one line per rule showing what it computes
/// (including the rounding, so nobody has to guess the default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappingSummary {
    /// Number of files loaded.
    pub files: usize,
    /// Number of customer-table entries plus account-directory rows.
    pub customers: usize,
    /// Number of rules (including `ignore` rules).
    pub rules: usize,
    /// Number of `ignore: true` rules.
    pub ignore_rules: usize,
    /// `file#rule: description`, in evaluation order.
    pub rule_lines: Vec<String>,
}

impl fmt::Display for MappingSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{} file(s), {} customer(s), {} rule(s) ({} ignore)",
            self.files, self.customers, self.rules, self.ignore_rules
        )?;
        for line in &self.rule_lines {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

impl MappingSet {
    /// Parses and validates mapping files given as `(display name, text)`, in load order.
    /// Pure: no I/O. Sources whose name ends in `.csv` are lookup tables (`customers_csv`,
    /// `rates_csv`), found by the path a mapping file names, relative to that file's name.
    pub fn from_sources(sources: &[(String, String)]) -> Result<MappingSet, MappingErrors> {
        MappingSet::build(sources, false)
    }

    /// [`from_sources`](MappingSet::from_sources), reading a CSV that is not among the sources
    /// from disk when `disk` is true.
    fn build(sources: &[(String, String)], disk: bool) -> Result<MappingSet, MappingErrors> {
        let mut errors = Vec::new();
        let mut set = MappingSet::default();
        let tables: HashMap<String, &str> = sources
            .iter()
            .filter(|(n, _)| is_csv(n))
            .map(|(n, t)| (normalize(n), t.as_str()))
            .collect();
        // Err(Ok(e)): an error of the table itself, at its own line; Err(Err(e)): at the key.
        let read_table = |path: &str| -> Result<String, Result<MappingError, String>> {
            if let Some(t) = tables.get(&normalize(path)) {
                return Ok((*t).to_string());
            }
            if disk {
                read_utf8(Path::new(path)).map_err(|e| e.map_err(|e| format!("cannot read: {e}")))
            } else {
                Err(Err("not among the given sources".into()))
            }
        };
        for (name, text) in sources.iter().filter(|(n, _)| !is_csv(n)) {
            match serde_yaml_ng::from_str::<MappingFile>(text) {
                Ok(file) => {
                    let short = short_name(name);
                    let positions = locate_list_items(text, "customers");
                    for (i, entry) in file.customers.into_iter().enumerate() {
                        let (line, column) = positions.get(i).copied().unwrap_or((1, 1));
                        set.customers.push(LoadedCustomer {
                            file: name.clone(),
                            line,
                            column,
                            entry,
                        });
                    }
                    if let Some(csv) = &file.customers_csv {
                        let path = relative_to(name, &csv.0);
                        match read_table(&path) {
                            Ok(t) => load_directory(&path, &t, &mut set.directory, &mut errors),
                            Err(Ok(e)) => errors.push(e),
                            Err(Err(e)) => {
                                errors.push(at_key(name, text, "customers_csv", e, &path))
                            }
                        }
                    }
                    if let Some(csv) = &file.rates_csv {
                        let path = relative_to(name, &csv.0);
                        match read_table(&path) {
                            Ok(t) => load_rates(&path, &t, &mut set.rates, &mut errors),
                            Err(Ok(e)) => errors.push(e),
                            Err(Err(e)) => errors.push(at_key(name, text, "rates_csv", e, &path)),
                        }
                    }
                    // `period` of each pricing, at the position of the key concerned.
                    let ends: Vec<usize> = positions.iter().skip(1).map(|p| p.0).collect();
                    for (i, c) in set.customers.iter().filter(|c| c.file == *name).enumerate() {
                        if let Some(p) = &c.entry.pricing {
                            let end = ends
                                .get(i)
                                .copied()
                                .unwrap_or(usize::MAX)
                                .min(block_end(text, c.line));
                            check_period_fields(
                                name,
                                text,
                                "customer pricing",
                                p,
                                (c.line, end),
                                (c.line, c.column),
                                &mut errors,
                            );
                        }
                    }
                    let mut rule_lines: Vec<usize> = Vec::new();
                    {
                        let mut seen: Vec<&str> = Vec::new();
                        for rule in &file.rules {
                            let nth = seen.iter().filter(|n| **n == rule.name.0).count();
                            seen.push(&rule.name.0);
                            rule_lines.push(locate_rule(text, &rule.name.0, nth).0);
                        }
                    }
                    for (i, rule) in file.rules.iter().enumerate() {
                        if let Some(ValueSpec::Cost(c)) = &rule.value {
                            let end = rule_lines
                                .iter()
                                .filter(|l| **l > rule_lines[i])
                                .min()
                                .copied()
                                .unwrap_or(usize::MAX)
                                .min(block_end(text, rule_lines[i]));
                            let (line, column) = locate_rule(
                                text,
                                &rule.name.0,
                                file.rules[..i]
                                    .iter()
                                    .filter(|r| r.name == rule.name)
                                    .count(),
                            );
                            check_period_fields(
                                name,
                                text,
                                &format!("rule `{}`", rule.name.0),
                                &c.pricing(),
                                (line, end),
                                (line, column),
                                &mut errors,
                            );
                        }
                    }
                    // Same-named rules in one file: the nth rule is the nth `name:` line.
                    let mut seen_in_file: Vec<String> = Vec::new();
                    for rule in file.rules {
                        let nth = seen_in_file.iter().filter(|n| **n == rule.name.0).count();
                        let (line, column) = locate_rule(text, &rule.name.0, nth);
                        seen_in_file.push(rule.name.0.clone());
                        set.rules.push(LoadedRule {
                            id: format!("{short}#{}", rule.name.0),
                            file: name.clone(),
                            line,
                            column,
                            rule,
                        });
                    }
                    set.files.push(name.clone());
                }
                Err(e) => errors.push(yaml_error(name, &e)),
            }
        }
        check_rules(&set, &mut errors);
        super::check::check_set(&mut set, &mut errors);
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(MappingErrors { errors })
        }
    }

    /// Reads and validates mapping files. A directory stands for every `*.yaml` / `*.yml` file
    /// directly inside it, sorted by name. Load order (and so rule order) is the order given.
    /// CSV tables named by the files are read relative to each file.
    pub fn load(paths: &[PathBuf]) -> Result<MappingSet, MappingErrors> {
        let mut errors = Vec::new();
        let mut sources = Vec::new();
        for path in paths {
            if path.is_dir() {
                match yaml_files_in(path) {
                    Ok(files) if files.is_empty() => errors.push(whole_file(
                        path,
                        "directory contains no *.yaml or *.yml files",
                    )),
                    Ok(files) => {
                        for f in files {
                            read_into(&f, &mut sources, &mut errors);
                        }
                    }
                    Err(e) => errors.push(whole_file(path, &format!("cannot read directory: {e}"))),
                }
            } else {
                read_into(path, &mut sources, &mut errors);
            }
        }
        if paths.is_empty() {
            errors.push(MappingError {
                file: "(none)".into(),
                line: 0,
                column: 0,
                message: "no mapping files given".into(),
            });
        }
        match MappingSet::build(&sources, true) {
            Ok(set) if errors.is_empty() => Ok(set),
            Ok(_) => Err(MappingErrors { errors }),
            Err(more) => {
                errors.extend(more.errors);
                Err(MappingErrors { errors })
            }
        }
    }

    /// Counts and per-rule descriptions.
    pub fn summary(&self) -> MappingSummary {
        MappingSummary {
            files: self.files.len(),
            customers: self.customers.len() + self.directory.len(),
            rules: self.rules.len(),
            ignore_rules: self.rules.iter().filter(|r| r.rule.ignore).count(),
            rule_lines: self
                .rules
                .iter()
                .map(|r| format!("{}: {}", r.id, describe(&r.rule)))
                .collect(),
        }
    }
}

/// The last path component: rule ids stay stable when the mapping directory moves.
fn short_name(name: &str) -> &str {
    name.rsplit(['/', '\\']).next().unwrap_or(name)
}

fn whole_file(path: &Path, message: &str) -> MappingError {
    MappingError {
        file: path.display().to_string(),
        line: 0,
        column: 0,
        message: message.to_string(),
    }
}

fn yaml_files_in(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| e.eq_ignore_ascii_case("yaml") || e.eq_ignore_ascii_case("yml"));
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn read_into(path: &Path, sources: &mut Vec<(String, String)>, errors: &mut Vec<MappingError>) {
    match read_utf8(path) {
        Ok(text) => sources.push((path.display().to_string(), text)),
        Err(Ok(e)) => errors.push(e),
        Err(Err(e)) => errors.push(whole_file(path, &format!("cannot read: {e}"))),
    }
}

/// A text file; a byte that is not UTF-8 is an error at its line and column (Err(Ok)), a
/// file that cannot be read an I/O error (Err(Err)).
fn read_utf8(path: &Path) -> Result<String, Result<MappingError, std::io::Error>> {
    let bytes = std::fs::read(path).map_err(Err)?;
    String::from_utf8(bytes).map_err(|e| {
        let good = &e.as_bytes()[..e.utf8_error().valid_up_to()];
        let line_start = good.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        Ok(MappingError {
            file: path.display().to_string(),
            line: good.iter().filter(|&&b| b == b'\n').count() + 1,
            column: good.len() - line_start + 1,
            message: "not valid UTF-8 (save the file as UTF-8)".into(),
        })
    })
}

/// Turns a parser error into `file:line:column: message`, dropping the parser's own
/// " at line L column C" so the position is stated once.
fn yaml_error(file: &str, e: &serde_yaml_ng::Error) -> MappingError {
    let (line, column) = e
        .location()
        .map(|l| (l.line(), l.column()))
        .unwrap_or((1, 1));
    let message = e
        .to_string()
        .replace(&format!(" at line {line} column {column}"), "");
    MappingError {
        file: file.to_string(),
        line,
        column,
        message,
    }
}

/// Finds the `nth` (0-based) `name: <name>` line in `text`; returns its 1-based line and the
/// column of the `name` key. Falls back to the first line mentioning the name, then to 1:1.
pub(crate) fn locate_rule(text: &str, name: &str, nth: usize) -> (usize, usize) {
    let mut count = 0;
    for (i, line) in text.lines().enumerate() {
        let mut rest = line.trim_start();
        let mut col = line.len() - rest.len();
        if let Some(r) = rest.strip_prefix('-') {
            let r2 = r.trim_start();
            col += rest.len() - r2.len();
            rest = r2;
        }
        let Some(value) = rest.strip_prefix("name:") else {
            continue;
        };
        let value = value.split(" #").next().unwrap_or(value).trim();
        let value = value.trim_matches(|c| c == '"' || c == '\'');
        if value == name {
            if count == nth {
                return (i + 1, col + 1);
            }
            count += 1;
        }
    }
    text.lines()
        .position(|l| l.contains(name))
        .map_or((1, 1), |i| (i + 1, 1))
}

fn rule_error(r: &LoadedRule, message: String) -> MappingError {
    MappingError {
        file: r.file.clone(),
        line: r.line,
        column: r.column,
        message,
    }
}

/// Checks that need the whole rule or several rules.
fn check_rules(set: &MappingSet, errors: &mut Vec<MappingError>) {
    for (j, r) in set.rules.iter().enumerate() {
        let rule = &r.rule;
        let name = &rule.name.0;
        if let Some(first) = set.rules[..j].iter().find(|p| p.rule.name == rule.name) {
            errors.push(rule_error(
                r,
                format!(
                    "duplicate rule name `{name}` (first defined at {}:{}:{})",
                    first.file, first.line, first.column
                ),
            ));
            continue;
        }
        for msg in check_one_rule(rule) {
            errors.push(rule_error(r, format!("rule `{name}`: {msg}")));
        }
        if let Some(wider) = set.rules[..j]
            .iter()
            .find(|p| shadows(&p.rule.conditions.0, &rule.conditions.0))
        {
            errors.push(rule_error(
                r,
                format!(
                    "rule `{name}` can never match: rule `{}` at {}:{} comes first and matches \
                     every record this one does (first match wins; move the narrower rule up)",
                    wider.rule.name.0, wider.file, wider.line
                ),
            ));
        }
    }
}

use super::check::shadows;

fn check_one_rule(rule: &Rule) -> Vec<String> {
    let mut out = Vec::new();
    if rule.ignore {
        let mut extra = Vec::new();
        if rule.metric.is_some() {
            extra.push("metric");
        }
        if rule.value.is_some() {
            extra.push("value");
        }
        if rule.property.is_some() {
            extra.push("property");
        }
        if rule.target.is_some() {
            extra.push("target");
        }
        if rule.sink.is_some() {
            extra.push("sink");
        }
        if rule.round.is_some() {
            extra.push("round");
        }
        if !rule.properties.is_empty() {
            extra.push("properties");
        }
        if !extra.is_empty() {
            out.push(format!(
                "`ignore: true` sends nothing, so `{}` would have no effect; remove it or the `ignore`",
                extra.join("`, `")
            ));
        }
        return out;
    }
    if rule.metric.is_none() {
        out.push(
            "has neither `metric` nor `ignore: true`; say which billable metric it feeds, \
             or that the records are deliberately not billed"
                .into(),
        );
        return out;
    }
    let Some(value) = &rule.value else {
        out.push("has `metric` but no `value` (`quantity: {...}` or `cost: {...}`)".into());
        return out;
    };
    let property = rule.property.as_ref().map_or("value", |p| p.0.as_str());
    for key in rule.properties.keys() {
        if key.trim().is_empty() {
            out.push("a property name must not be empty".into());
        } else if key == property {
            out.push(format!(
                "property `{key}` collides with the value property `{property}`"
            ));
        }
    }
    if let ValueSpec::Quantity(q) = value {
        if let Conversion::Unit(to) = q.conversion {
            for from in pinned_units(rule) {
                match Unit::parse(&from) {
                    None => out.push(format!(
                        "matches consumed_unit `{from}`, which is not a known unit, so it cannot \
                         be converted to `{to}` (use `factor:` instead)"
                    )),
                    Some(u) if u.dimension() != to.dimension() => out.push(format!(
                        "matches consumed_unit `{from}` ({}) but converts to `{to}` ({})",
                        u.dimension(),
                        to.dimension()
                    )),
                    Some(_) => {}
                }
            }
        }
    }
    out
}

/// The `consumed_unit` values a rule's match pins exactly (none for a glob or no condition).
fn pinned_units(rule: &Rule) -> Vec<String> {
    rule.conditions
        .0
        .iter()
        .filter(|(f, _)| f.as_str() == "consumed_unit")
        .flat_map(|(_, c)| match c {
            Condition::Exact(x) => vec![x.clone()],
            Condition::OneOf(xs) => xs.clone(),
            Condition::Glob(_) => Vec::new(),
        })
        .collect()
}

/// The first line after `line` (1-based) that starts a new top-level key: where the block
/// list holding `line` ends.
fn block_end(text: &str, line: usize) -> usize {
    text.lines()
        .enumerate()
        .skip(line)
        .find(|(_, l)| !l.is_empty() && !l.starts_with([' ', '\t', '#', '-']))
        .map_or(usize::MAX, |(i, _)| i + 1)
}

/// The first `key:` (as a YAML key) on lines `span.0 ..< span.1` (1-based): its line and column.
fn locate_key(text: &str, span: (usize, usize), key: &str) -> Option<(usize, usize)> {
    let pattern = format!("{key}:");
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        if n < span.0 {
            continue;
        }
        if n >= span.1 {
            break;
        }
        let code = line.split(" #").next().unwrap_or(line);
        let mut from = 0;
        while let Some(pos) = code[from..].find(&pattern) {
            let at = from + pos;
            let before = code[..at].chars().next_back();
            if before.is_none_or(|c| c.is_whitespace() || matches!(c, '{' | ',' | '-')) {
                return Some((n, at + 1));
            }
            from = at + pattern.len();
        }
    }
    None
}

/// `minimum` and `tiers` need an explicit `period`, and `period` needs one of them: a minimum
/// "per record" and one "per month" are different invoices, so the file must say which.
fn check_period_fields(
    file: &str,
    text: &str,
    what: &str,
    p: &super::schema::Pricing,
    span: (usize, usize),
    fallback: (usize, usize),
    errors: &mut Vec<MappingError>,
) {
    let mut push = |key: &str, message: String| {
        let (line, column) = locate_key(text, span, key).unwrap_or(fallback);
        errors.push(MappingError {
            file: file.to_string(),
            line,
            column,
            message: format!("{what}: {message}"),
        });
    };
    let has = |k: &str| match k {
        "minimum" => p.minimum.is_some(),
        _ => p.tiers.is_some(),
    };
    match p.period {
        None => {
            // Report at whichever of the two keys comes first in the file.
            let mut keys: Vec<&str> = ["minimum", "tiers"]
                .into_iter()
                .filter(|k| has(k))
                .collect();
            keys.sort_by_key(|k| locate_key(text, span, k).unwrap_or((usize::MAX, 0)));
            if let Some(key) = keys.first() {
                let what_it_does = if *key == "minimum" {
                    "the minimum applies to the month's total of a subscription's metric"
                } else {
                    "the tiers apply to the month's total of a subscription's metric"
                };
                push(
                    key,
                    format!(
                        "`{key}` needs an explicit `period`: `period: month` ({what_it_does}, \
                        settled by one adjustment event when the month closes) or \
                        `period: record` (each record on its own)"
                    ),
                );
            }
        }
        Some(kind) if !has("minimum") && !has("tiers") => push(
            "period",
            format!(
                "`period: {}` says what `minimum` and `tiers` apply to, but this pricing has \
                        neither; remove `period` or add the minimum or tiers it is meant for",
                kind.name()
            ),
        ),
        _ => {}
    }
    if p.period_utc_offset.is_some() && !p.is_monthly() {
        push(
            "period_utc_offset",
            "`period_utc_offset` sets where months begin and needs `period: month`".into(),
        );
    }
}

/// One line saying what a rule computes.
pub(crate) fn describe(rule: &Rule) -> String {
    if rule.ignore {
        return "ignore (not billed)".into();
    }
    let metric = rule.metric.as_ref().map_or("?", |m| m.0.as_str());
    let property = rule.property.as_ref().map_or("value", |p| p.0.as_str());
    let (what, round) = match &rule.value {
        Some(ValueSpec::Quantity(q)) => (
            match &q.conversion {
                Conversion::AsReported => "consumed_quantity as reported".to_string(),
                Conversion::Unit(u) => format!("consumed_quantity converted to {u}"),
                Conversion::Factor(f) => format!("consumed_quantity × {f}"),
            },
            super::effective_round(rule, None),
        ),
        Some(ValueSpec::Cost(c)) => {
            let mut what = "billed_cost".to_string();
            if let Some(cur) = &c.currency {
                what.push_str(&format!(" in {}", cur.0));
            }
            what.push_str(&describe_pricing(&c.pricing()));
            let currency = c.currency.as_ref().map(|c| c.0.as_str());
            let round = super::effective_round(rule, currency);
            if currency.is_none() && rule.round.is_none_or(|r| r.scale.is_none()) {
                return format!(
                    "{metric}.{property} = {what}, rounded to 2 places {} (default: the \
                     record currency's minor unit; 0 places for JPY)",
                    round.1.name()
                );
            }
            (what, round)
        }
        None => ("?".to_string(), super::effective_round(rule, None)),
    };
    format!(
        "{metric}.{property} = {what}, rounded to {} places {}",
        round.0,
        round.1.name()
    )
}

/// ` + 20% markup + 1.00 fixed …`: the pricing steps in the order they apply.
pub(crate) fn describe_pricing(p: &super::schema::Pricing) -> String {
    let mut out = String::new();
    if let Some(t) = &p.tiers {
        let parts: Vec<String> =
            t.0.iter()
                .map(|t| match t.up_to {
                    Some(b) => format!("{}% up to {}", t.markup_percent.0, b.0),
                    None => format!("{}% above", t.markup_percent.0),
                })
                .collect();
        out.push_str(&format!(" + tiered markup ({})", parts.join(", ")));
    }
    if let Some(m) = p.markup_percent {
        out.push_str(&format!(" + {}% markup", m.0));
    }
    if let Some(c) = p.commission_percent {
        out.push_str(&format!(" ÷ (1 − {}% commission)", c.0));
    }
    if let Some(f) = p.markup_fixed {
        out.push_str(&format!(" + {} fixed", f.0));
    }
    if let Some(m) = p.minimum {
        out.push_str(&format!(", at least {}", m.0));
    }
    match p.period {
        Some(super::schema::PeriodKind::Month) => {
            let offset = p.month_offset();
            out.push_str(&format!(
                " (tiers and minimum per calendar month{}, settled by one adjustment per \
                        subscription, metric and month)",
                if offset.local_minus_utc() == 0 {
                    " UTC".to_string()
                } else {
                    format!(" at {offset}")
                }
            ));
        }
        Some(super::schema::PeriodKind::Record) => out.push_str(" (tiers and minimum per record)"),
        None => {}
    }
    out
}

fn is_csv(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".csv")
}

/// A path with `\` as `/`, `./` segments dropped and `a/../` folded, for comparing names.
fn normalize(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split(['/', '\\']) {
        match part {
            "" | "." => {}
            ".." if parts.last().is_some_and(|p| *p != "..") => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let joined = parts.join("/");
    if path.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

/// `relative` resolved against the directory of the mapping file `file`.
fn relative_to(file: &str, relative: &str) -> String {
    if Path::new(relative).is_absolute() {
        return relative.to_string();
    }
    match Path::new(file).parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(relative).display().to_string(),
        _ => relative.to_string(),
    }
}

/// An error about a top-level key of a file (`customers_csv: …`), at that key's line.
fn at_key(file: &str, text: &str, key: &str, problem: String, path: &str) -> MappingError {
    let line = text
        .lines()
        .position(|l| l.starts_with(&format!("{key}:")))
        .map_or(1, |i| i + 1);
    MappingError {
        file: file.to_string(),
        line,
        column: 1,
        message: format!("`{key}`: {path}: {problem}; the path is relative to this file"),
    }
}

/// The (line, column) of each item of the top-level block list `key:` (`- ` items at the
/// block's first item indentation). Used to give customer entries a position.
pub(crate) fn locate_list_items(text: &str, key: &str) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut inside = false;
    let mut indent: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let trimmed = line.trim_start();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let col = line.len() - trimmed.len();
        if col == 0 && !trimmed.starts_with('-') {
            inside = trimmed.starts_with(&format!("{key}:"));
            continue;
        }
        if inside && (trimmed.starts_with("- ") || trimmed == "-") {
            let item_indent = *indent.get_or_insert(col);
            if col == item_indent {
                out.push((i + 1, col + 1));
            }
        }
    }
    out
}

/// Caps the number of errors one table contributes, so 50,000 bad rows do not flood the
/// terminal; the last message says how many were left out.
const MAX_TABLE_ERRORS: usize = 50;

struct TableErrors<'a> {
    file: &'a str,
    errors: &'a mut Vec<MappingError>,
    count: usize,
}

impl TableErrors<'_> {
    fn push(&mut self, line: usize, column: usize, message: String) {
        self.count += 1;
        if self.count <= MAX_TABLE_ERRORS {
            self.errors.push(MappingError {
                file: self.file.to_string(),
                line,
                column,
                message,
            });
        }
    }

    fn finish(self) {
        if self.count > MAX_TABLE_ERRORS {
            self.errors.push(MappingError {
                file: self.file.to_string(),
                line: 0,
                column: 0,
                message: format!(
                    "… and {} more problems in this table",
                    self.count - MAX_TABLE_ERRORS
                ),
            });
        }
    }
}

/// Checks the header: required columns present, no unknown or repeated column.
fn check_header(
    table: &super::csv::Table,
    required: &[&str],
    optional: &[&str],
    errs: &mut TableErrors<'_>,
) -> bool {
    let mut ok = true;
    for (i, h) in table.header.iter().enumerate() {
        let known = required.contains(&h.as_str()) || optional.contains(&h.as_str());
        if !known || table.header[..i].contains(h) {
            ok = false;
            errs.push(
                table.header_line,
                1,
                format!(
                    "{} column `{h}` in the header; expected {}{}",
                    if known { "repeated" } else { "unknown" },
                    required.join(","),
                    if optional.is_empty() {
                        String::new()
                    } else {
                        format!(" and optionally {}", optional.join(","))
                    }
                ),
            );
        }
    }
    for r in required {
        if !table.header.iter().any(|h| h == r) {
            ok = false;
            errs.push(
                table.header_line,
                1,
                format!(
                    "the header lacks the column `{r}`; expected {}",
                    required.join(",")
                ),
            );
        }
    }
    ok
}

/// Loads an account directory (`customers_csv`) into `dir`, checking every row.
fn load_directory(
    file: &str,
    text: &str,
    dir: &mut super::Directory,
    errors: &mut Vec<MappingError>,
) {
    let mut errs = TableErrors {
        file,
        errors,
        count: 0,
    };
    let table = match super::csv::parse(text) {
        Ok(t) => t,
        Err(p) => {
            errs.push(p.line, p.column, p.message);
            errs.finish();
            return;
        }
    };
    if !check_header(
        &table,
        &["provider", "sub_account_id", "external_subscription_id"],
        &["external_customer_id", "priority"],
        &mut errs,
    ) {
        errs.finish();
        return;
    }
    dir.rows.reserve(table.rows.len());
    let file_number = dir.file_number(file);
    for row in &table.rows {
        let mut get = |name: &str, required: bool| -> Option<&str> {
            let (col, v) = table.cell(row, name)?;
            if v.is_empty() {
                if required {
                    errs.push(
                        row.line,
                        col,
                        format!("`{name}` is empty; every row needs provider, sub_account_id and external_subscription_id"),
                    );
                }
                return None;
            }
            Some(v)
        };
        let provider = get("provider", true);
        let account = get("sub_account_id", true);
        let subscription = get("external_subscription_id", true);
        let customer = get("external_customer_id", false);
        let priority = match table.cell(row, "priority") {
            Some((_, "")) | None => Some(0),
            Some((col, v)) => match v.parse::<i64>() {
                Ok(p) => Some(p),
                Err(_) => {
                    errs.push(
                        row.line,
                        col,
                        format!("invalid priority `{v}`, expected a whole number"),
                    );
                    None
                }
            },
        };
        let (Some(provider), Some(account), Some(subscription), Some(priority)) =
            (provider, account, subscription, priority)
        else {
            continue;
        };
        let added = dir.insert(
            file_number,
            row.line,
            provider,
            account,
            subscription,
            customer,
            priority,
        );
        match added {
            Ok(Ok(())) => {}
            Ok(Err(first)) => {
                let message = format!(
                    "duplicate account provider={provider} sub_account_id={account} (first at \
                     {}:{}); an account belongs to one subscription—remove one of the rows",
                    first.file, first.line
                );
                errs.push(row.line, 1, message);
            }
            Err(super::DirectoryFull) => {
                errs.push(
                    row.line,
                    1,
                    "the account directories hold more than 4 GB of ids, more than billsync \
                     keeps in memory; this row and the rest of the file are not loaded"
                        .to_string(),
                );
                break;
            }
        }
    }
    dir.shrink_to_fit();
    errs.finish();
}

/// Parses `2026-01-01` (midnight UTC) or an RFC 3339 time.
fn parse_effective(text: &str) -> Option<DateTime<Utc>> {
    if let Ok(d) = NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return d.and_hms_opt(0, 0, 0).map(|t| t.and_utc());
    }
    DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Loads an exchange-rate table (`rates_csv`) into `rates`, checking every row.
fn load_rates(file: &str, text: &str, rates: &mut Rates, errors: &mut Vec<MappingError>) {
    let mut errs = TableErrors {
        file,
        errors,
        count: 0,
    };
    let table = match super::csv::parse(text) {
        Ok(t) => t,
        Err(p) => {
            errs.push(p.line, p.column, p.message);
            errs.finish();
            return;
        }
    };
    if !check_header(
        &table,
        &["from", "to", "rate", "effective_from"],
        &[],
        &mut errs,
    ) {
        errs.finish();
        return;
    }
    let mut seen: HashMap<(String, String, DateTime<Utc>), usize> = HashMap::new();
    for row in &table.rows {
        let mut ok = true;
        let mut currency = |name: &str| -> Option<String> {
            let (col, v) = table.cell(row, name)?;
            match Currency::parse(v) {
                Ok(c) => Some(c.0),
                Err(e) => {
                    errs.push(row.line, col, format!("`{name}`: {e}"));
                    None
                }
            }
        };
        let from = currency("from");
        let to = currency("to");
        let rate = match table.cell(row, "rate") {
            Some((col, v)) => match v.parse::<Decimal>() {
                Ok(r) if r > Decimal::ZERO => Some(r),
                _ => {
                    errs.push(
                        row.line,
                        col,
                        format!("invalid rate `{v}`, expected a decimal number > 0 (1 `from` = rate `to`)"),
                    );
                    None
                }
            },
            None => None,
        };
        let when = match table.cell(row, "effective_from") {
            Some((col, v)) => match parse_effective(v) {
                Some(t) => Some(t),
                None => {
                    errs.push(
                        row.line,
                        col,
                        format!("invalid effective_from `{v}`, expected a date such as 2026-01-01 (UTC)"),
                    );
                    None
                }
            },
            None => None,
        };
        if let (Some(from), Some(to)) = (&from, &to) {
            if from == to {
                ok = false;
                errs.push(
                    row.line,
                    1,
                    format!("a rate from {from} to itself is always 1; remove the row"),
                );
            }
        }
        let (Some(from), Some(to), Some(rate), Some(when), true) = (from, to, rate, when, ok)
        else {
            continue;
        };
        if let Some(first) = seen.insert((from.clone(), to.clone(), when), row.line) {
            errs.push(
                row.line,
                1,
                format!(
                    "duplicate rate {from}→{to} effective {} (first at line {first})",
                    when.date_naive()
                ),
            );
            continue;
        }
        let list = rates.by_pair.entry((from.clone(), to.clone())).or_default();
        // Another rates file gave this pair and date: all files make one table, so two rates
        // for one day would leave the conversion to the order the files load in.
        if let Some((_, other)) = list.iter().find(|(d, _)| *d == when) {
            if *other != rate {
                errs.push(
                    row.line,
                    1,
                    format!(
                        "rate {from}→{to} effective {} is {rate} here but {other} in another \
                         rates file: one date needs one rate",
                        when.date_naive()
                    ),
                );
            }
            continue;
        }
        list.push((when, rate));
        list.sort_by_key(|(d, _)| *d);
    }
    errs.finish();
}
