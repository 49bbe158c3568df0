//! Loading and validating mapping files into a [`MappingSet`].
//!
//! Errors are collected, not returned at the first problem: a billing engineer fixing a set of
//! files wants every mistake in one run. `serde_yaml_ng` stops at the first error inside one
//! file, so each file contributes at most one parse error, plus any semantic errors of the files
//! that did parse.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::schema::{Condition, Conversion, MappingFile, Rule, ValueSpec};
use super::units::Unit;
use super::{LoadedCustomer, LoadedRule, MappingSet};

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
    /// Number of customer-table entries.
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
    /// Parses and validates mapping files given as `(display name, YAML text)`, in load order.
    /// Pure: no I/O.
    pub fn from_sources(sources: &[(String, String)]) -> Result<MappingSet, MappingErrors> {
        let mut errors = Vec::new();
        let mut set = MappingSet::default();
        for (name, text) in sources {
            match serde_yaml_ng::from_str::<MappingFile>(text) {
                Ok(file) => {
                    let short = short_name(name);
                    for entry in file.customers {
                        set.customers.push(LoadedCustomer {
                            file: name.clone(),
                            entry,
                        });
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
        if errors.is_empty() {
            Ok(set)
        } else {
            Err(MappingErrors { errors })
        }
    }

    /// Reads and validates mapping files. A directory stands for every `*.yaml` / `*.yml` file
    /// directly inside it, sorted by name. Load order (and so rule order) is the order given.
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
        match MappingSet::from_sources(&sources) {
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
            customers: self.customers.len(),
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
    match std::fs::read_to_string(path) {
        Ok(text) => sources.push((path.display().to_string(), text)),
        Err(e) => errors.push(whole_file(path, &format!("cannot read: {e}"))),
    }
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
fn locate_rule(text: &str, name: &str, nth: usize) -> (usize, usize) {
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

/// Whether `wider` matches every record `narrow` matches (so a later `narrow` is dead).
/// Conservative: only reports certain cases.
fn shadows(
    wider: &[(super::schema::FieldName, Condition)],
    narrow: &[(super::schema::FieldName, Condition)],
) -> bool {
    wider
        .iter()
        .all(|(f, cw)| narrow.iter().any(|(g, cn)| f == g && cn.is_within(cw)))
}

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
            super::effective_round(rule),
        ),
        Some(ValueSpec::Cost(c)) => (
            match &c.markup_percent {
                Some(p) => format!("billed_cost + {}% markup", p.0),
                None => "billed_cost".to_string(),
            },
            super::effective_round(rule),
        ),
        None => ("?".to_string(), super::effective_round(rule)),
    };
    format!(
        "{metric}.{property} = {what}, rounded to {} places {}",
        round.scale.0,
        round.mode.name()
    )
}
