//! Units a quantity rule can convert between.
//!
//! Conversions are exact [`Decimal`] arithmetic through a base unit per dimension (seconds for
//! time, bytes for data). Data units are **decimal (SI)**: `kb`/`kbytes` = 1000 bytes,
//! `gb`/`gbytes` = 10^9 bytes, as cloud billing usually states traffic. The binary units are
//! available under their IEC names (`kib`, `mib`, `gib`, `tib`, 1024-based) so a rule that needs
//! them says so explicitly instead of relying on a reader guessing what "GB" meant.

use std::fmt;

use rust_decimal::Decimal;

/// What a unit measures. Converting across dimensions (seconds to gigabytes) is an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    /// Duration; base unit: second.
    Time,
    /// Amount of data; base unit: byte.
    Data,
}

impl fmt::Display for Dimension {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Dimension::Time => "time",
            Dimension::Data => "data",
        })
    }
}

/// A known unit: its canonical name, dimension and size in the dimension's base unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unit {
    name: &'static str,
    dimension: Dimension,
    base: i64,
}

/// Every accepted spelling, lower-case, with its unit. Aliases map to the same unit.
const UNITS: &[(&str, Unit)] = &[
    ("seconds", Unit::new("seconds", Dimension::Time, 1)),
    ("second", Unit::new("seconds", Dimension::Time, 1)),
    ("s", Unit::new("seconds", Dimension::Time, 1)),
    ("minutes", Unit::new("minutes", Dimension::Time, 60)),
    ("minute", Unit::new("minutes", Dimension::Time, 60)),
    ("hours", Unit::new("hours", Dimension::Time, 3600)),
    ("hour", Unit::new("hours", Dimension::Time, 3600)),
    ("h", Unit::new("hours", Dimension::Time, 3600)),
    ("days", Unit::new("days", Dimension::Time, 86_400)),
    ("day", Unit::new("days", Dimension::Time, 86_400)),
    ("bytes", Unit::new("bytes", Dimension::Data, 1)),
    ("byte", Unit::new("bytes", Dimension::Data, 1)),
    ("kbytes", Unit::new("kbytes", Dimension::Data, 1_000)),
    ("kb", Unit::new("kbytes", Dimension::Data, 1_000)),
    ("mbytes", Unit::new("mbytes", Dimension::Data, 1_000_000)),
    ("mb", Unit::new("mbytes", Dimension::Data, 1_000_000)),
    (
        "gbytes",
        Unit::new("gbytes", Dimension::Data, 1_000_000_000),
    ),
    ("gb", Unit::new("gbytes", Dimension::Data, 1_000_000_000)),
    (
        "tbytes",
        Unit::new("tbytes", Dimension::Data, 1_000_000_000_000),
    ),
    (
        "tb",
        Unit::new("tbytes", Dimension::Data, 1_000_000_000_000),
    ),
    ("kib", Unit::new("kib", Dimension::Data, 1 << 10)),
    ("mib", Unit::new("mib", Dimension::Data, 1 << 20)),
    ("gib", Unit::new("gib", Dimension::Data, 1 << 30)),
    ("tib", Unit::new("tib", Dimension::Data, 1 << 40)),
];

impl Unit {
    const fn new(name: &'static str, dimension: Dimension, base: i64) -> Unit {
        Unit {
            name,
            dimension,
            base,
        }
    }

    /// Looks a unit up by name, case-insensitively (`GB`, `gbytes` and `gb` are the same unit).
    pub fn parse(name: &str) -> Option<Unit> {
        let lower = name.trim().to_ascii_lowercase();
        UNITS.iter().find(|(n, _)| *n == lower).map(|(_, u)| *u)
    }

    /// The accepted spellings, for error messages.
    pub fn known_names() -> String {
        UNITS.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
    }

    /// The canonical name (`hours`, `gbytes`, ...).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// What the unit measures.
    pub fn dimension(&self) -> Dimension {
        self.dimension
    }

    /// Converts `quantity` from `self` to `to`, exactly (up to `Decimal`'s 28 digits).
    /// Multiplies before dividing so that `84301 seconds → hours` is `84301 / 3600`, not
    /// `84301 × 0.000277…`. Errors on a dimension mismatch or on overflow.
    pub fn convert(&self, quantity: Decimal, to: Unit) -> Result<Decimal, String> {
        if self.dimension != to.dimension {
            return Err(format!(
                "cannot convert {} ({}) to {} ({})",
                self.name, self.dimension, to.name, to.dimension
            ));
        }
        if self.base == to.base {
            return Ok(quantity);
        }
        quantity
            .checked_mul(Decimal::from(self.base))
            .and_then(|q| q.checked_div(Decimal::from(to.base)))
            .ok_or_else(|| {
                format!(
                    "converting {quantity} {} to {} overflows",
                    self.name, to.name
                )
            })
    }
}

impl fmt::Display for Unit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name)
    }
}
