//! Reading a `resource_utilization_detailed` answer in one pass over its text.
//!
//! Why not a `serde_json::Value`: a parsed line is a tree of some forty small allocations (a map,
//! its keys, every string and, with exact numbers, every number) that the record only ever
//! writes back out as JSON, into its ledger body. Here the answer is walked once: the maps above
//! the lines are visited in place, and each line is kept as a slice of the text
//! ([`RawValue`]), whose fields are then read from the text and which becomes the record's raw
//! fields in one allocation.
//!
//! Shape problems (a map that is a string, a list that is a map, a key given twice) do not stop
//! the walk: the first is kept and reported once the walk is over, so that the order of checks
//! stays the one of the module doc (the JSON-RPC error first, then the report's window, then
//! its shape, then its lines).

use std::borrow::Cow;
use std::cell::RefCell;
use std::fmt;

use rust_decimal::Decimal;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::value::RawValue;

/// The key under which `serde_json` (with `arbitrary_precision`, as this crate builds it)
/// hands a number to `deserialize_any`: a one-entry map. Seen where a map is expected, the
/// value was a number.
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A JSON object key or string, borrowed from the text unless it had escapes.
pub type Text<'a> = Cow<'a, str>;

/// One list of lines: a resource type of one infrastructure, or one network aggregate's
/// waypoints.
pub struct Group<'a> {
    pub infra: Text<'a>,
    pub resource_type: Text<'a>,
    /// `(bucket, direction)` of a network aggregate.
    pub network: Option<(Text<'a>, Text<'a>)>,
    /// Where the list sits (`detailed_report.<infra>.<type>`), for errors.
    pub path: String,
    pub lines: Vec<&'a RawValue>,
    /// A network aggregate's stated totals, checked against its waypoints.
    pub aggregate: Option<Aggregate<'a>>,
}

/// A network aggregate's own `cost` and `quantity`.
pub struct Aggregate<'a> {
    pub path: String,
    pub cost: Option<&'a RawValue>,
    pub quantity: Option<&'a RawValue>,
}

/// What one walk over a report found, borrowed from its text.
#[derive(Default)]
pub struct Report<'a> {
    /// The result had a `detailed_report` or a `network_report` key (even `null`).
    pub has_report: bool,
    pub start_timestamp: Option<&'a RawValue>,
    pub end_timestamp: Option<&'a RawValue>,
    /// `infrastructures.<id>.infrastructure_label`, where it is a string.
    pub labels: Vec<(Text<'a>, Text<'a>)>,
    pub groups: Vec<Group<'a>>,
    pub installments: Vec<&'a RawValue>,
    /// The result was not an object: its kind (`a string`, ...).
    pub not_an_object: Option<&'static str>,
    /// The first shape problem met, as an error message.
    pub problem: Option<String>,
}

/// A JSON-RPC answer: its `error` member and its `result`, read as a [`Report`].
#[derive(Default)]
pub struct Answer<'a> {
    /// The body was an object.
    pub is_object: bool,
    pub error: Option<&'a RawValue>,
    pub result: Option<Report<'a>>,
}

/// Walk a JSON-RPC answer. Errs only when the text is not JSON.
pub fn read_answer(text: &str) -> Result<Answer<'_>, serde_json::Error> {
    let cell = RefCell::new(Answer::default());
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_any(Walker(AnswerVisitor { out: &cell }))?;
    de.end()?;
    Ok(cell.into_inner())
}

/// Walk a report (the JSON-RPC `result`). Errs only when the text is not JSON.
pub fn read_report(text: &str) -> Result<Report<'_>, serde_json::Error> {
    let cell = RefCell::new(Report::default());
    let mut de = serde_json::Deserializer::from_str(text);
    de.deserialize_any(Walker(RootVisitor { out: &cell }))?;
    de.end()?;
    Ok(cell.into_inner())
}

/// The fields of one line, in order, as slices of its text. A key given twice is read as its
/// last value (as a parsed object would keep it); the raw text keeps both.
pub struct Fields<'a>(Vec<(Text<'a>, &'a RawValue)>);

impl<'a> Fields<'a> {
    pub fn new() -> Self {
        Self(Vec::with_capacity(32))
    }

    /// Read `line`'s fields in place of the previous line's. Errs with the line's kind when it
    /// is not an object.
    pub fn read(&mut self, line: &'a RawValue) -> Result<(), &'static str> {
        self.0.clear();
        let text = line.get();
        if !text.starts_with('{') {
            return Err(kind_of(line));
        }
        let mut de = serde_json::Deserializer::from_str(text);
        // The text was read as one JSON value already, so this cannot fail.
        de.deserialize_map(FieldsVisitor { out: &mut self.0 })
            .map_err(|_| "unreadable")
    }

    pub fn get(&self, name: &str) -> Option<&'a RawValue> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }

    /// The value of `name`, unless absent or `null`.
    pub fn present(&self, name: &str) -> Option<&'a RawValue> {
        self.get(name).filter(|v| !is_null(v))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &'a RawValue)> + '_ {
        self.0.iter().map(|(k, v)| (k.as_ref(), *v))
    }
}

/// `a string`, `an object`, ... for messages.
pub fn kind_of(v: &RawValue) -> &'static str {
    match v.get().as_bytes().first() {
        Some(b'n') => "null",
        Some(b't' | b'f') => "a boolean",
        Some(b'"') => "a string",
        Some(b'[') => "an array",
        Some(b'{') => "an object",
        _ => "a number",
    }
}

pub fn is_null(v: &RawValue) -> bool {
    v.get() == "null"
}

fn is_number(v: &RawValue) -> bool {
    matches!(v.get().as_bytes().first(), Some(b'-' | b'0'..=b'9'))
}

/// A JSON string's value (unescaped only when it has escapes).
pub fn as_str<'a>(v: &'a RawValue) -> Option<Text<'a>> {
    let text = v.get();
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if inner.contains('\\') {
        serde_json::from_str::<String>(text).ok().map(Cow::Owned)
    } else {
        Some(Cow::Borrowed(inner))
    }
}

/// A string, a number or a boolean as text (numbers exactly as sent).
pub fn scalar_text<'a>(v: &'a RawValue) -> Option<Text<'a>> {
    match v.get().as_bytes().first() {
        Some(b'"') => as_str(v),
        Some(b't' | b'f') => Some(Cow::Borrowed(v.get())),
        _ if is_number(v) => Some(Cow::Borrowed(v.get())),
        _ => None,
    }
}

/// A decimal from a JSON number or string, read from its text (never through a float).
pub fn decimal(v: &RawValue) -> Option<Decimal> {
    let owned;
    let text = if is_number(v) {
        v.get()
    } else {
        owned = as_str(v)?;
        owned.trim()
    };
    crate::record::exact_decimal(text)
}

/// A non-negative integer from a JSON number or string (`3600` or `"3600"`).
pub fn integer(v: &RawValue) -> Option<u64> {
    if is_number(v) {
        v.get().parse().ok()
    } else {
        as_str(v)?.trim().parse().ok()
    }
}

// --- the walk -------------------------------------------------------------------------------

/// A key or string of the text, borrowed when it has no escapes.
struct TextSeed;

impl<'de> DeserializeSeed<'de> for TextSeed {
    type Value = Text<'de>;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(TextVisitor)
    }
}

struct TextVisitor;

impl<'de> Visitor<'de> for TextVisitor {
    type Value = Text<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(v))
    }

    fn visit_str<E>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v.to_owned()))
    }

    fn visit_string<E>(self, v: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(v))
    }
}

/// Keep the first problem.
fn note(problem: &mut Option<String>, message: impl FnOnce() -> String) {
    if problem.is_none() {
        *problem = Some(message());
    }
}

/// Read what is left of a map or list that will not be used, so the walk goes on after it.
fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

fn drain_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

/// What a value of the wrong kind is, having read it: a map may be a number in disguise.
fn kind_of_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<&'static str, A::Error> {
    let kind = match map.next_key_seed(TextSeed)? {
        Some(key) if key == NUMBER_TOKEN => "a number",
        Some(_) => {
            map.next_value::<IgnoredAny>()?;
            "an object"
        }
        None => "an object",
    };
    drain_map(map)?;
    Ok(kind)
}

/// The kinds a walker may meet where it wanted something else: each is read, then handed to
/// `wrong` (its kind), `empty` (`null` or `[]`) or `map`/`seq`.
trait Walk<'de>: Sized {
    type Out: Default;
    fn wrong(self, kind: &'static str) -> Self::Out;
    fn empty(self) -> Self::Out {
        Self::Out::default()
    }
    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        let kind = kind_of_map(map)?;
        Ok(self.wrong(kind))
    }
    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Out, A::Error> {
        if seq.next_element::<IgnoredAny>()?.is_none() {
            return Ok(self.empty());
        }
        drain_seq(seq)?;
        Ok(self.wrong("an array"))
    }
}

/// Drives a [`Walk`] as a serde visitor (`deserialize_any`).
struct Walker<W>(W);

impl<'de, W: Walk<'de>> Visitor<'de> for Walker<W> {
    type Value = W::Out;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E>(self, _: bool) -> Result<Self::Value, E> {
        Ok(self.0.wrong("a boolean"))
    }
    // Numbers where a map or a list was expected: only their kind is named, the value is
    // dropped unread. (With `arbitrary_precision` serde_json hands numbers over as maps, see
    // `NUMBER_TOKEN`; these are for completeness. Amounts are never read here: lines are kept
    // as text and their decimals read from it, `decimal`.)
    fn visit_i64<E>(self, _: i64) -> Result<Self::Value, E> {
        Ok(self.0.wrong("a number"))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self::Value, E> {
        Ok(self.0.wrong("a number"))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self::Value, E> {
        Ok(self.0.wrong("a number"))
    }
    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(self.0.wrong("a string"))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(self.0.empty())
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        self.0.map(map)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        self.0.seq(seq)
    }
}

impl<'de, W: Walk<'de>> DeserializeSeed<'de> for Walker<W> {
    type Value = W::Out;

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

/// The keys of one map, to refuse a key given twice (a parsed object would silently keep only
/// the last one's lines).
fn first_time<'de>(seen: &mut Vec<Text<'de>>, key: &Text<'de>) -> bool {
    if seen.contains(key) {
        return false;
    }
    seen.push(key.clone());
    true
}

fn twice(path: &str, key: &str) -> String {
    format!("{path} has the key {key:?} twice; the page is refused rather than read one way")
}

struct AnswerVisitor<'c, 'de> {
    out: &'c RefCell<Answer<'de>>,
}

impl<'de> Walk<'de> for AnswerVisitor<'_, 'de> {
    type Out = ();

    fn wrong(self, _: &'static str) {}

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let mut map = PeekNumber::new(map)?;
        if map.is_number {
            return drain_map(map);
        }
        self.out.borrow_mut().is_object = true;
        while let Some(key) = map.next_key_seed(TextSeed)? {
            match key.as_ref() {
                "error" => {
                    let error: &RawValue = map.next_value()?;
                    self.out.borrow_mut().error = Some(error);
                }
                "result" => {
                    let report = RefCell::new(Report::default());
                    map.next_value_seed(Walker(RootVisitor { out: &report }))?;
                    self.out.borrow_mut().result = Some(report.into_inner());
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// The result: an object whose known keys are walked, the rest skipped.
struct RootVisitor<'c, 'de> {
    out: &'c RefCell<Report<'de>>,
}

impl<'de> Walk<'de> for RootVisitor<'_, 'de> {
    type Out = ();

    fn wrong(self, kind: &'static str) {
        self.out.borrow_mut().not_an_object = Some(kind);
    }

    fn empty(self) {
        self.wrong("null");
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<(), A::Error> {
        drain_seq(seq)?;
        self.wrong("an array");
        Ok(())
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let mut map = PeekNumber::new(map)?;
        if map.is_number {
            drain_map(map)?;
            self.wrong("a number");
            return Ok(());
        }
        let out = self.out;
        let mut seen = Vec::new();
        while let Some(key) = map.next_key_seed(TextSeed)? {
            if !first_time(&mut seen, &key) {
                map.next_value::<IgnoredAny>()?;
                note(&mut out.borrow_mut().problem, || twice("the result", &key));
                continue;
            }
            match key.as_ref() {
                "detailed_report" => {
                    out.borrow_mut().has_report = true;
                    map.next_value_seed(Walker(Object {
                        path: "detailed_report".into(),
                        out,
                        entry: Nested(Types),
                    }))?;
                }
                "network_report" => {
                    out.borrow_mut().has_report = true;
                    map.next_value_seed(Walker(Object {
                        path: "network_report".into(),
                        out,
                        entry: Nested(|infra: Text<'de>| {
                            Nested(move |bucket| Directions(infra.clone(), bucket))
                        }),
                    }))?;
                }
                "infrastructures" => {
                    map.next_value_seed(Walker(Object {
                        path: "infrastructures".into(),
                        out,
                        entry: Label,
                    }))?;
                }
                "reservation_installments" => {
                    map.next_value_seed(Walker(Object {
                        path: "reservation_installments".into(),
                        out,
                        entry: Installments,
                    }))?;
                }
                "start_timestamp" => {
                    let v: &RawValue = map.next_value()?;
                    out.borrow_mut().start_timestamp = Some(v);
                }
                "end_timestamp" => {
                    let v: &RawValue = map.next_value()?;
                    out.borrow_mut().end_timestamp = Some(v);
                }
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(())
    }
}

/// A map's first key read ahead, to tell a number (a one-entry map under [`NUMBER_TOKEN`]) from
/// an object; the key is handed out again first.
struct PeekNumber<'de, A> {
    map: A,
    first: Option<Option<Text<'de>>>,
    is_number: bool,
}

impl<'de, A: MapAccess<'de>> PeekNumber<'de, A> {
    fn new(mut map: A) -> Result<Self, A::Error> {
        let first = map.next_key_seed(TextSeed)?;
        let is_number = first.as_deref() == Some(NUMBER_TOKEN);
        Ok(Self {
            map,
            first: Some(first),
            is_number,
        })
    }
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for PeekNumber<'de, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Self::Error> {
        match self.first.take() {
            None => self.map.next_key_seed(seed),
            Some(None) => Ok(None),
            Some(Some(Cow::Borrowed(key))) => seed
                .deserialize(de::value::BorrowedStrDeserializer::new(key))
                .map(Some),
            Some(Some(Cow::Owned(key))) => seed
                .deserialize(de::value::StringDeserializer::new(key))
                .map(Some),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(
        &mut self,
        seed: V,
    ) -> Result<V::Value, Self::Error> {
        self.map.next_value_seed(seed)
    }
}

/// What to do with each entry of an [`Object`].
trait Entry<'de>: Clone {
    /// Walk the value of `key`; `path` is the object's.
    fn walk<A: MapAccess<'de>>(
        self,
        map: &mut A,
        path: &str,
        key: Text<'de>,
        out: &RefCell<Report<'de>>,
    ) -> Result<(), A::Error>;
}

/// A map of the report: an object, or `null` or `[]` for none (PHP encodes an empty map as
/// `[]`). Each entry is handed to `entry`.
struct Object<'c, 'de, E> {
    path: Cow<'c, str>,
    out: &'c RefCell<Report<'de>>,
    entry: E,
}

impl<'de, E: Entry<'de>> Walk<'de> for Object<'_, 'de, E> {
    type Out = ();

    fn wrong(self, kind: &'static str) {
        let path = &self.path;
        note(&mut self.out.borrow_mut().problem, || {
            format!("{path} should be an object but is {kind}")
        });
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<(), A::Error> {
        let mut map = PeekNumber::new(map)?;
        if map.is_number {
            drain_map(map)?;
            self.wrong("a number");
            return Ok(());
        }
        let mut seen = Vec::new();
        while let Some(key) = map.next_key_seed(TextSeed)? {
            if !first_time(&mut seen, &key) {
                map.next_value::<IgnoredAny>()?;
                let path = &self.path;
                note(&mut self.out.borrow_mut().problem, || twice(path, &key));
                continue;
            }
            self.entry
                .clone()
                .walk(&mut map, &self.path, key, self.out)?;
        }
        Ok(())
    }
}

/// An entry whose value is a map of the report too, whose entries are walked by what `child`
/// makes of this entry's key: `detailed_report.<infra>.<type>`,
/// `network_report.<infra>.<bucket>.<direction>`.
#[derive(Clone)]
struct Nested<F>(F);

impl<'de, F, E> Entry<'de> for Nested<F>
where
    F: Fn(Text<'de>) -> E + Clone,
    E: Entry<'de>,
{
    fn walk<A: MapAccess<'de>>(
        self,
        map: &mut A,
        path: &str,
        key: Text<'de>,
        out: &RefCell<Report<'de>>,
    ) -> Result<(), A::Error> {
        map.next_value_seed(Walker(Object {
            path: format!("{path}.{key}").into(),
            out,
            entry: (self.0)(key),
        }))
    }
}

/// `detailed_report.<infra>`: resource types, each a list of lines.
#[derive(Clone)]
struct Types<'de>(Text<'de>);

impl<'de> Entry<'de> for Types<'de> {
    fn walk<A: MapAccess<'de>>(
        self,
        map: &mut A,
        path: &str,
        resource_type: Text<'de>,
        out: &RefCell<Report<'de>>,
    ) -> Result<(), A::Error> {
        let path = format!("{path}.{resource_type}");
        let lines = map.next_value_seed(Walker(Lines { path: &path, out }))?;
        out.borrow_mut().groups.push(Group {
            infra: self.0,
            resource_type,
            network: None,
            path,
            lines,
            aggregate: None,
        });
        Ok(())
    }
}

/// A list of lines (`null` for none), each kept as its text.
struct Lines<'c, 'de> {
    path: &'c str,
    out: &'c RefCell<Report<'de>>,
}

impl<'de> Walk<'de> for Lines<'_, 'de> {
    type Out = Vec<&'de RawValue>;

    fn wrong(self, kind: &'static str) -> Self::Out {
        let path = self.path;
        note(&mut self.out.borrow_mut().problem, || {
            format!("{path} should be an array but is {kind}")
        });
        Vec::new()
    }

    fn seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Out, A::Error> {
        let mut lines = Vec::with_capacity(seq.size_hint().unwrap_or(16));
        while let Some(line) = seq.next_element::<&RawValue>()? {
            lines.push(line);
        }
        Ok(lines)
    }
}

/// `network_report.<infra>.<bucket>`: directions, each an aggregate with its waypoints.
#[derive(Clone)]
struct Directions<'de>(Text<'de>, Text<'de>);

impl<'de> Entry<'de> for Directions<'de> {
    fn walk<A: MapAccess<'de>>(
        self,
        map: &mut A,
        path: &str,
        direction: Text<'de>,
        out: &RefCell<Report<'de>>,
    ) -> Result<(), A::Error> {
        let path = format!("{path}.{direction}");
        let group = map.next_value_seed(Walker(AggregateWalk { path: &path, out }))?;
        if let Some((lines, cost, quantity)) = group {
            let Directions(infra, bucket) = self;
            out.borrow_mut().groups.push(Group {
                infra,
                resource_type: format!("{bucket}_{direction}").into(),
                network: Some((bucket, direction)),
                path: format!("{path}.metered_waypoints"),
                lines,
                aggregate: Some(Aggregate {
                    path,
                    cost,
                    quantity,
                }),
            });
        }
        Ok(())
    }
}

type Waypoints<'de> = (
    Vec<&'de RawValue>,
    Option<&'de RawValue>,
    Option<&'de RawValue>,
);

/// One direction's aggregate: an object with `metered_waypoints` (a list, or `null`) and the
/// totals `cost` and `quantity`.
struct AggregateWalk<'c, 'de> {
    path: &'c str,
    out: &'c RefCell<Report<'de>>,
}

impl<'de> Walk<'de> for AggregateWalk<'_, 'de> {
    type Out = Option<Waypoints<'de>>;

    fn wrong(self, _: &'static str) -> Self::Out {
        let path = self.path;
        note(&mut self.out.borrow_mut().problem, || {
            format!("{path} is not an object")
        });
        None
    }

    fn empty(self) -> Self::Out {
        self.wrong("")
    }

    fn map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Out, A::Error> {
        let mut map = PeekNumber::new(map)?;
        if map.is_number {
            drain_map(map)?;
            return Ok(self.wrong("a number"));
        }
        let (mut lines, mut cost, mut quantity) = (Vec::new(), None, None);
        let waypoints_path = format!("{}.metered_waypoints", self.path);
        let mut seen = Vec::new();
        while let Some(key) = map.next_key_seed(TextSeed)? {
            if !first_time(&mut seen, &key) {
                map.next_value::<IgnoredAny>()?;
                note(&mut self.out.borrow_mut().problem, || {
                    twice(self.path, &key)
                });
                continue;
            }
            match key.as_ref() {
                "metered_waypoints" => {
                    lines = map.next_value_seed(Walker(Lines {
                        path: &waypoints_path,
                        out: self.out,
                    }))?;
                }
                "cost" => cost = Some(map.next_value::<&RawValue>()?),
                "quantity" => quantity = Some(map.next_value::<&RawValue>()?),
                _ => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some((lines, cost, quantity)))
    }
}

/// `infrastructures.<id>`: only a string `infrastructure_label` is read; anything else there is
/// no label.
#[derive(Clone)]
struct Label;

impl<'de> Entry<'de> for Label {
    fn walk<A: MapAccess<'de>>(
        self,
        map: &mut A,
        _: &str,
        id: Text<'de>,
        out: &RefCell<Report<'de>>,
    ) -> Result<(), A::Error> {
        if let Some(label) = map.next_value_seed(Walker(LabelWalk))? {
            out.borrow_mut().labels.push((id, label));
        }
        Ok(())
    }
}

struct LabelWalk;

impl<'de> Walk<'de> for LabelWalk {
    type Out = Option<Text<'de>>;

    fn wrong(self, _: &'static str) -> Self::Out {
        None
    }

    fn seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Out, A::Error> {
        drain_seq(seq)?;
        Ok(None)
    }

    fn map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Out, A::Error> {
        let mut label = None;
        while let Some(key) = map.next_key_seed(TextSeed)? {
            if key == "infrastructure_label" {
                let v: &RawValue = map.next_value()?;
                label = as_str(v);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(label)
    }
}

/// `reservation_installments`: its `server_types` list (`null` for none).
#[derive(Clone)]
struct Installments;

impl<'de> Entry<'de> for Installments {
    fn walk<A: MapAccess<'de>>(
        self,
        map: &mut A,
        path: &str,
        key: Text<'de>,
        out: &RefCell<Report<'de>>,
    ) -> Result<(), A::Error> {
        if key != "server_types" {
            map.next_value::<IgnoredAny>()?;
            return Ok(());
        }
        let path = format!("{path}.{key}");
        let lines = map.next_value_seed(Walker(Lines { path: &path, out }))?;
        out.borrow_mut().installments = lines;
        Ok(())
    }
}

/// A line's fields into a reused list.
struct FieldsVisitor<'v, 'de> {
    out: &'v mut Vec<(Text<'de>, &'de RawValue)>,
}

impl<'de> Visitor<'de> for FieldsVisitor<'_, 'de> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("an object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key_seed(TextSeed)? {
            let value: &RawValue = map.next_value()?;
            self.out.push((key, value));
        }
        Ok(())
    }
}
