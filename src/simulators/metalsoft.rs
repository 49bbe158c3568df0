//! A loopback simulator of MetalSoft's JSON-RPC `resource_utilization_detailed`.
//!
//! The real API computes the report **for the requested window**, so a simulator that replays a
//! canned answer cannot test windowing, look-back or re-reads. This one holds a dataset of
//! resources (each an interval of one product with its price) and computes every answer from
//! it: time-metered lines are clipped to `[start, end)` of the request, quantity = overlapped
//! seconds (a string), cost = quantity / measurement_period × cost_per_unit rounded to 8
//! decimals (a string with 8 decimals), exactly like the documentation's example
//! (`84301 s × 0.31 / 3600 = 7.25925278`). Network traffic is reported as waypoints under
//! `network_report` with string values and numeric per-direction aggregates; the wire keeps the
//! real examples' mixed types (`"3600"` next to `3600`, empty maps as `[]`).
//!
//! Behaviour choices (documented so tests can rely on them):
//! * a wrong or missing Bearer key answers **HTTP 401** with a JSON-RPC error object
//!   `{"code": -32001, "message": "Unauthorized"}` (MetalSoft's real status is unverified);
//! * an unknown method answers JSON-RPC `-32601`, bad params `-32602`, an unparseable body
//!   `-32700`, all with HTTP 200;
//! * an unknown user gets an empty report;
//! * a reservation installment is reported in the window that contains its
//!   `created_timestamp`.
//!
//! Fault injection and request recording go through [`MetalsoftSimHandle`].

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use chrono::{DateTime, Duration, NaiveDateTime, SecondsFormat, Utc};
use rust_decimal::{Decimal, RoundingStrategy};
use serde_json::{json, Map, Value};

/// The current MetalSoft documentation example (the JSON-RPC `result`), as the simulator's
/// demo data and the tests' fixture. Origin and repairs: `src/simulators/data/README.md`.
pub const FIXTURE_CURRENT: &str = include_str!("data/developer.resource_utilization_detailed.json");
/// The richer 2020 Bigstep documentation example (adds data lake, installments).
pub const FIXTURE_BIGSTEP_2020: &str =
    include_str!("data/developer.resource_utilization_detailed.bigstep-docs-2020.json");

/// What kind of line a resource produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResourceKind {
    /// A `detailed_report.<infra>.<resource_type>[]` line, metered in seconds.
    Metered {
        /// `instance`, `drive`, `shared_drive`, `subnet`, `data_lake`, …
        resource_type: String,
    },
    /// A `network_report.<infra>.<bucket>.<direction>.metered_waypoints[]` line, in gbytes.
    Traffic {
        /// `network` or `data_lake`.
        bucket: String,
        /// `download` or `upload`.
        direction: String,
        /// Traffic per hour of the interval, in gbytes (quantity = overlap × rate).
        gbytes_per_hour: Decimal,
    },
}

/// One billable resource of one user: an interval of one product with its price.
#[derive(Debug, Clone, PartialEq)]
pub struct SimResource {
    /// The infrastructure holding it (the map key in the report).
    pub infrastructure_id: u64,
    /// Metered by time, or traffic.
    pub kind: ResourceKind,
    /// `product_id`.
    pub product_id: u64,
    /// `product_label`.
    pub product_label: String,
    /// `product_subdomain`.
    pub product_subdomain: String,
    /// `cost_currency`.
    pub currency: String,
    /// `cost_per_unit`: price per `measurement_period` seconds (time) or per gbyte (traffic).
    pub cost_per_unit: Decimal,
    /// `measurement_period` in seconds.
    pub measurement_period: u64,
    /// Send `measurement_period` as a JSON number (`3600`) instead of a string (`"3600"`).
    pub period_as_number: bool,
    /// Start of the interval (inclusive).
    pub start: DateTime<Utc>,
    /// End of the interval (exclusive).
    pub end: DateTime<Utc>,
    /// `is_reservation`.
    pub is_reservation: bool,
    /// Further fields copied as they are (`drive_size_mbytes`, `server_type_id`, …).
    pub extras: Map<String, Value>,
}

/// A reservation installment (`reservation_installments.server_types[]`).
#[derive(Debug, Clone, PartialEq)]
pub struct SimInstallment {
    /// `server_type_reservation_id`.
    pub reservation_id: u64,
    /// `server_type_name`.
    pub server_type_name: String,
    /// `cost`, sent as a JSON number.
    pub cost: Decimal,
    /// `cost_currency`.
    pub currency: String,
    /// `created_timestamp`: the installment is reported in the window containing it.
    pub created: DateTime<Utc>,
    /// `start_timestamp`.
    pub start: DateTime<Utc>,
    /// `end_timestamp`.
    pub end: DateTime<Utc>,
}

/// Everything one user owns.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SimUser {
    /// Metered resources and traffic.
    pub resources: Vec<SimResource>,
    /// Reservation installments.
    pub installments: Vec<SimInstallment>,
}

/// The simulated world: resources per user.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MetalsoftDataset {
    /// Users by `user_id_owner`.
    pub users: BTreeMap<u64, SimUser>,
}

/// Errors building a dataset from a fixture.
#[derive(Debug, thiserror::Error)]
#[error("metalsoft simulator fixture: {0}")]
pub struct DatasetError(String);

/// Rounding of computed costs: 8 decimals, half away from zero.
fn money(d: Decimal) -> Decimal {
    let mut r = d.round_dp_with_strategy(8, RoundingStrategy::MidpointAwayFromZero);
    r.rescale(8);
    r
}

fn wire_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

fn parse_wire_time(text: &str) -> Option<DateTime<Utc>> {
    NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%SZ")
        .ok()
        .map(|n| n.and_utc())
}

fn decimal_of(v: &Value) -> Option<Decimal> {
    let text = match v {
        Value::String(s) => s.trim().to_string(),
        Value::Number(n) => n.to_string(),
        _ => return None,
    };
    Decimal::from_str_exact(&text).ok()
}

fn u64_of(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

fn pick_str<'a>(rng: &mut SplitMix, items: &[&'a str]) -> &'a str {
    items[rng.below(items.len() as u64) as usize]
}

/// A small deterministic generator (SplitMix64), so generated datasets never change with a
/// dependency upgrade.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// A JSON object written field by field into a byte buffer, in the order given.
///
/// The simulator answers every pull of the benchmark harness, on the same two cores as
/// billsync: building each report as a `serde_json::Value` (an ordered map and a string per
/// field of every line) and serialising it took a third of all CPU of a staging run. Writing
/// the same bytes directly takes a fraction of that; `report` parses them back for the tests.
struct JsonObject<'a> {
    out: &'a mut Vec<u8>,
    empty: bool,
}

impl<'a> JsonObject<'a> {
    fn open(out: &'a mut Vec<u8>) -> Self {
        out.push(b'{');
        JsonObject { out, empty: true }
    }

    /// Start field `name`; its value is written next into the returned buffer.
    fn key(&mut self, name: &str) -> &mut Vec<u8> {
        if !self.empty {
            self.out.push(b',');
        }
        self.empty = false;
        write_json(self.out, name);
        self.out.push(b':');
        self.out
    }

    fn field(&mut self, name: &str, value: &(impl serde::Serialize + ?Sized)) {
        write_json(self.key(name), value);
    }

    /// A field whose value is already JSON text.
    fn raw(&mut self, name: &str, json: &[u8]) {
        self.key(name).extend_from_slice(json);
    }

    fn close(self) {
        self.out.push(b'}');
    }
}

fn write_json(out: &mut Vec<u8>, value: &(impl serde::Serialize + ?Sized)) {
    // Writing into a Vec cannot fail, and these values (strings, numbers, JSON values)
    // always serialise.
    serde_json::to_writer(out, value).expect("JSON into memory");
}

/// A number as the report writes it: the decimal's shortest form, unquoted (what serde_json's
/// `arbitrary_precision` numbers keep).
fn write_number(out: &mut Vec<u8>, d: Decimal) {
    use std::io::Write as _;
    let _ = write!(out, "{}", d.normalize());
}

/// What a line reports for one window: its clipped interval, quantity and cost.
struct LineFigures {
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    quantity: Decimal,
    cost: Decimal,
}

impl SimResource {
    /// The figures of this resource's line for window `[s, e)`, or `None` when the resource
    /// does not overlap it.
    fn figures(&self, s: DateTime<Utc>, e: DateTime<Utc>) -> Option<LineFigures> {
        let start = self.start.max(s);
        let end = self.end.min(e);
        if end <= start {
            return None;
        }
        let seconds = Decimal::from((end - start).num_seconds());
        let (quantity, cost) = match &self.kind {
            ResourceKind::Metered { .. } => {
                let period = Decimal::from(self.measurement_period.max(1));
                (seconds, money(seconds / period * self.cost_per_unit))
            }
            ResourceKind::Traffic {
                gbytes_per_hour, ..
            } => {
                let mut gb = (seconds * gbytes_per_hour / Decimal::from(3600))
                    .round_dp_with_strategy(4, RoundingStrategy::MidpointAwayFromZero);
                gb.rescale(4);
                (gb, money(gb * self.cost_per_unit))
            }
        };
        Some(LineFigures {
            start,
            end,
            quantity,
            cost,
        })
    }

    /// Write the report line with these figures. An extra field named like a standard one
    /// replaces its value in place (as inserting it into the line's map would).
    fn write_line(&self, f: &LineFigures, out: &mut Vec<u8>) {
        let unit = match self.kind {
            ResourceKind::Metered { .. } => "seconds",
            ResourceKind::Traffic { .. } => "gbytes",
        };
        let mut cpu = self.cost_per_unit;
        cpu.rescale(8);
        let mut line = JsonObject::open(out);
        let mut put = |name: &str, value: &dyn Fn(&mut Vec<u8>)| match self.extras.get(name) {
            Some(v) => line.field(name, v),
            None => value(line.key(name)),
        };
        put("cost", &|o| write_json(o, &f.cost.to_string()));
        put("cost_currency", &|o| write_json(o, &self.currency));
        put("cost_per_unit", &|o| write_json(o, &cpu.to_string()));
        put("end_timestamp", &|o| write_json(o, &wire_time(f.end)));
        put("is_reservation", &|o| {
            write_json(o, if self.is_reservation { "1" } else { "0" })
        });
        put("measurement_period", &|o| {
            if self.period_as_number {
                write_json(o, &self.measurement_period)
            } else {
                write_json(o, &self.measurement_period.to_string())
            }
        });
        put("measurement_unit", &|o| write_json(o, unit));
        put("product_id", &|o| write_json(o, &self.product_id));
        put("product_label", &|o| write_json(o, &self.product_label));
        put("product_subdomain", &|o| {
            write_json(o, &self.product_subdomain)
        });
        put("quantity", &|o| write_json(o, &f.quantity.to_string()));
        put("start_timestamp", &|o| write_json(o, &wire_time(f.start)));
        for (k, v) in &self.extras {
            if !STANDARD_LINE_FIELDS.contains(&k.as_str()) {
                line.field(k, v);
            }
        }
        line.close();
    }

    /// `cost` and `quantity` as the line reports them (an extra field may replace either).
    fn reported(&self, name: &str, computed: Decimal) -> Decimal {
        match self.extras.get(name) {
            Some(v) => decimal_of(v).unwrap_or_default(),
            None => computed,
        }
    }
}

/// The fields every line has, in the order the server writes them.
const STANDARD_LINE_FIELDS: [&str; 12] = [
    "cost",
    "cost_currency",
    "cost_per_unit",
    "end_timestamp",
    "is_reservation",
    "measurement_period",
    "measurement_unit",
    "product_id",
    "product_label",
    "product_subdomain",
    "quantity",
    "start_timestamp",
];

impl MetalsoftDataset {
    /// An empty dataset.
    pub fn new() -> Self {
        Self::default()
    }

    /// Build a dataset from a fixture (the JSON-RPC `result` of the documentation examples):
    /// every detailed line and every network waypoint becomes a resource of `user_id` with the
    /// line's interval, price, period and extra fields; installments are kept. A waypoint's
    /// traffic rate is its quantity spread over its interval.
    pub fn from_fixture_json(text: &str, user_id: u64) -> Result<Self, DatasetError> {
        let root: Value =
            serde_json::from_str(text).map_err(|e| DatasetError(format!("not JSON: {e}")))?;
        let mut user = SimUser::default();
        let resource = |entry: &Value, infra: &str, kind: ResourceKind, path: &str| {
            let e = entry
                .as_object()
                .ok_or_else(|| DatasetError(format!("{path} is not an object")))?;
            let field = |name: &str| {
                e.get(name)
                    .ok_or_else(|| DatasetError(format!("{path}.{name} is missing")))
            };
            let time = |name: &str| {
                field(name)?
                    .as_str()
                    .and_then(parse_wire_time)
                    .ok_or_else(|| DatasetError(format!("{path}.{name} is not a timestamp")))
            };
            let period_value = field("measurement_period")?;
            let mut extras = Map::new();
            for (k, v) in e {
                if !STANDARD_LINE_FIELDS.contains(&k.as_str()) {
                    extras.insert(k.clone(), v.clone());
                }
            }
            let start = time("start_timestamp")?;
            let end = time("end_timestamp")?;
            let kind = match kind {
                ResourceKind::Traffic {
                    bucket, direction, ..
                } => {
                    let quantity = decimal_of(field("quantity")?).unwrap_or_default();
                    let hours =
                        Decimal::from((end - start).num_seconds().max(1)) / Decimal::from(3600);
                    ResourceKind::Traffic {
                        bucket,
                        direction,
                        gbytes_per_hour: quantity / hours,
                    }
                }
                metered => metered,
            };
            Ok::<_, DatasetError>(SimResource {
                infrastructure_id: infra
                    .parse()
                    .map_err(|_| DatasetError(format!("{path}: infrastructure id {infra:?}")))?,
                kind,
                product_id: u64_of(field("product_id")?)
                    .ok_or_else(|| DatasetError(format!("{path}.product_id")))?,
                product_label: field("product_label")?.as_str().unwrap_or_default().into(),
                product_subdomain: e
                    .get("product_subdomain")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                currency: field("cost_currency")?.as_str().unwrap_or("GBP").into(),
                cost_per_unit: decimal_of(field("cost_per_unit")?)
                    .ok_or_else(|| DatasetError(format!("{path}.cost_per_unit")))?,
                measurement_period: u64_of(period_value)
                    .ok_or_else(|| DatasetError(format!("{path}.measurement_period")))?,
                period_as_number: period_value.is_number(),
                start,
                end,
                is_reservation: e.get("is_reservation").and_then(Value::as_str) == Some("1"),
                extras,
            })
        };
        if let Some(detailed) = root.get("detailed_report").and_then(Value::as_object) {
            for (infra, types) in detailed {
                for (rt, entries) in types.as_object().into_iter().flatten() {
                    for (i, entry) in entries.as_array().into_iter().flatten().enumerate() {
                        let kind = ResourceKind::Metered {
                            resource_type: rt.clone(),
                        };
                        let path = format!("detailed_report.{infra}.{rt}[{i}]");
                        user.resources.push(resource(entry, infra, kind, &path)?);
                    }
                }
            }
        }
        if let Some(network) = root.get("network_report").and_then(Value::as_object) {
            for (infra, buckets) in network {
                for (bucket, dirs) in buckets.as_object().into_iter().flatten() {
                    for (direction, agg) in dirs.as_object().into_iter().flatten() {
                        let waypoints = agg.get("metered_waypoints").and_then(Value::as_array);
                        for (i, entry) in waypoints.into_iter().flatten().enumerate() {
                            let kind = ResourceKind::Traffic {
                                bucket: bucket.clone(),
                                direction: direction.clone(),
                                gbytes_per_hour: Decimal::ZERO,
                            };
                            let path = format!("network_report.{infra}.{bucket}.{direction}[{i}]");
                            user.resources.push(resource(entry, infra, kind, &path)?);
                        }
                    }
                }
            }
        }
        let installments = root
            .pointer("/reservation_installments/server_types")
            .and_then(Value::as_array);
        for (i, e) in installments.into_iter().flatten().enumerate() {
            let bad = |f: &str| DatasetError(format!("reservation_installments[{i}].{f}"));
            let time = |f: &str| {
                e.get(f)
                    .and_then(Value::as_str)
                    .and_then(parse_wire_time)
                    .ok_or_else(|| bad(f))
            };
            user.installments.push(SimInstallment {
                reservation_id: e
                    .get("server_type_reservation_id")
                    .and_then(u64_of)
                    .ok_or_else(|| bad("server_type_reservation_id"))?,
                server_type_name: e
                    .get("server_type_name")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .into(),
                cost: e
                    .get("cost")
                    .and_then(decimal_of)
                    .ok_or_else(|| bad("cost"))?,
                currency: e
                    .get("cost_currency")
                    .and_then(Value::as_str)
                    .unwrap_or("GBP")
                    .into(),
                created: time("created_timestamp")?,
                start: time("start_timestamp")?,
                end: time("end_timestamp")?,
            });
        }
        let mut dataset = MetalsoftDataset::new();
        dataset.users.insert(user_id, user);
        Ok(dataset)
    }

    /// The earliest start of any resource or installment.
    pub fn earliest(&self) -> Option<DateTime<Utc>> {
        self.users
            .values()
            .flat_map(|u| {
                u.resources
                    .iter()
                    .map(|r| r.start)
                    .chain(u.installments.iter().map(|i| i.start.min(i.created)))
            })
            .min()
    }

    /// Move every time by the same amount so the earliest start lands on `start` (e.g. to place
    /// the 2016 documentation resources in a recent period for the demo).
    pub fn shift_to(mut self, start: DateTime<Utc>) -> Self {
        let Some(earliest) = self.earliest() else {
            return self;
        };
        let delta = start - earliest;
        for user in self.users.values_mut() {
            for r in &mut user.resources {
                r.start += delta;
                r.end += delta;
            }
            for i in &mut user.installments {
                i.created += delta;
                i.start += delta;
                i.end += delta;
            }
        }
        self
    }

    /// A deterministic, realistic dataset: `users` users (ids 1..=users), each with
    /// `resources_per_user` metered resources (instances, drives, shared drives, subnets, data
    /// lakes) spread over one to three infrastructures, plus network traffic waypoints, with
    /// intervals inside `[period_start, period_end)`. The same seed always gives the same data.
    pub fn generated(
        users: u64,
        resources_per_user: usize,
        seed: u64,
        period_start: DateTime<Utc>,
        period_end: DateTime<Utc>,
    ) -> Self {
        let mut rng = SplitMix(seed);
        let span = (period_end - period_start).num_seconds().max(1) as u64;
        let mut dataset = MetalsoftDataset::new();
        let mut next_product = 1000u64;
        let dec = |text: &str| Decimal::from_str_exact(text).unwrap_or_default();
        for user_id in 1..=users {
            let mut user = SimUser::default();
            let infras: Vec<u64> = (0..1 + rng.below(3))
                .map(|i| 3000 + user_id * 10 + i)
                .collect();
            for _ in 0..resources_per_user {
                let infra = *rng.pick(&infras);
                next_product += 1;
                let pid = next_product;
                let (rt, prices, period, extras): (&str, &[&str], u64, Map<String, Value>) =
                    match rng.below(10) {
                        0..=3 => (
                            "instance",
                            &["0.31000000", "0.52000000", "1.20000000", "0.08500000"],
                            3600,
                            [(
                                "server_type_id".to_string(),
                                match rng.below(3) {
                                    0 => Value::Null,
                                    n => json!(10 + n),
                                },
                            )]
                            .into_iter()
                            .collect(),
                        ),
                        4..=6 => (
                            "drive",
                            &["0.01601563", "0.00347222"],
                            3600,
                            [(
                                "drive_size_mbytes".to_string(),
                                json!(40960 * (1 + rng.below(8))),
                            )]
                            .into_iter()
                            .collect(),
                        ),
                        7 => (
                            "shared_drive",
                            &["0.00347222"],
                            3600,
                            [("shared_drive_size_mbytes".to_string(), json!(51200))]
                                .into_iter()
                                .collect(),
                        ),
                        8 => (
                            "subnet",
                            &["0.00000000", "0.00138889"],
                            3600,
                            [
                                ("subnet_prefix_size".to_string(), json!(64)),
                                ("subnet_type".to_string(), json!("ipv6")),
                            ]
                            .into_iter()
                            .collect(),
                        ),
                        _ => (
                            "data_lake",
                            &["25.00000000"],
                            2_592_000,
                            [("resource_utilization_gbytes".to_string(), json!(0))]
                                .into_iter()
                                .collect(),
                        ),
                    };
                // Half the resources live through the whole period, the rest start/stop inside.
                let (start_off, end_off) = if rng.below(2) == 0 {
                    (0, span)
                } else {
                    let a = rng.below(span);
                    let b = rng.below(span);
                    (a.min(b), a.max(b).max(a.min(b) + 1))
                };
                user.resources.push(SimResource {
                    infrastructure_id: infra,
                    kind: ResourceKind::Metered {
                        resource_type: rt.to_string(),
                    },
                    product_id: pid,
                    product_label: format!("{rt}-{pid}").replace('_', "-"),
                    product_subdomain: format!("{rt}-{pid}.infra-{infra}.sim.metalsoft.test")
                        .replace('_', "-"),
                    currency: "GBP".into(),
                    cost_per_unit: dec(pick_str(&mut rng, prices)),
                    measurement_period: period,
                    period_as_number: rng.below(4) == 0,
                    start: period_start + Duration::seconds(start_off as i64),
                    end: period_start + Duration::seconds(end_off as i64),
                    is_reservation: rt == "instance" && rng.below(5) == 0,
                    extras,
                });
            }
            for &infra in &infras {
                next_product += 1;
                let wan = next_product;
                for direction in ["download", "upload"] {
                    let gb = Decimal::new(rng.below(50_000) as i64, 4);
                    user.resources.push(SimResource {
                        infrastructure_id: infra,
                        kind: ResourceKind::Traffic {
                            bucket: "network".into(),
                            direction: direction.into(),
                            gbytes_per_hour: gb,
                        },
                        product_id: wan,
                        product_label: "wan".into(),
                        product_subdomain: format!("wan.infra-{infra}.sim.metalsoft.test"),
                        currency: "GBP".into(),
                        cost_per_unit: if direction == "upload" {
                            dec("0.06000000")
                        } else {
                            Decimal::ZERO
                        },
                        measurement_period: 10800,
                        period_as_number: false,
                        start: period_start,
                        end: period_end,
                        is_reservation: false,
                        extras: Map::new(),
                    });
                }
            }
            dataset.users.insert(user_id, user);
        }
        dataset
    }

    /// The report (the JSON-RPC `result`) for `user_id` and window `[start, end)`, optionally
    /// restricted to some infrastructures: exactly what the server answers.
    pub fn report(
        &self,
        user_id: u64,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        infrastructure_ids: Option<&[u64]>,
    ) -> Value {
        let json = self.report_json(user_id, start, end, infrastructure_ids);
        serde_json::from_slice(&json).expect("the simulator writes valid JSON")
    }

    /// [`MetalsoftDataset::report`] as the JSON text the server sends, written directly.
    pub fn report_json(
        &self,
        user_id: u64,
        start: DateTime<Utc>,
        end: DateTime<Utc>,
        infrastructure_ids: Option<&[u64]>,
    ) -> Vec<u8> {
        // Lines are written as they are computed, each into the list of its group; groups are
        // ordered like the server's (PHP) maps: by key text.
        let mut detailed: BTreeMap<String, BTreeMap<&str, Vec<u8>>> = BTreeMap::new();
        struct Direction<'a> {
            waypoints: Vec<u8>,
            cost: Decimal,
            quantity: Decimal,
            currency: &'a str,
        }
        let mut network: BTreeMap<String, BTreeMap<&str, BTreeMap<&str, Direction>>> =
            BTreeMap::new();
        let mut out = Vec::with_capacity(256);
        let user = self.users.get(&user_id);
        for r in user.map(|u| u.resources.as_slice()).unwrap_or_default() {
            if infrastructure_ids.is_some_and(|ids| !ids.contains(&r.infrastructure_id)) {
                continue;
            }
            let Some(figures) = r.figures(start, end) else {
                continue;
            };
            let infra = r.infrastructure_id.to_string();
            let list = match &r.kind {
                ResourceKind::Metered { resource_type } => detailed
                    .entry(infra)
                    .or_default()
                    .entry(resource_type)
                    .or_default(),
                ResourceKind::Traffic {
                    bucket, direction, ..
                } => {
                    let dir = network
                        .entry(infra)
                        .or_default()
                        .entry(bucket)
                        .or_default()
                        .entry(direction)
                        .or_insert_with(|| Direction {
                            waypoints: Vec::new(),
                            cost: Decimal::ZERO,
                            quantity: Decimal::ZERO,
                            currency: &r.currency,
                        });
                    dir.cost += r.reported("cost", figures.cost);
                    dir.quantity += r.reported("quantity", figures.quantity);
                    &mut dir.waypoints
                }
            };
            list.push(if list.is_empty() { b'[' } else { b',' });
            r.write_line(&figures, list);
        }

        let mut report = JsonObject::open(&mut out);
        // PHP encodes an empty map as `[]`; keep that quirk.
        let o = report.key("detailed_report");
        if detailed.is_empty() {
            o.extend_from_slice(b"[]");
        } else {
            let mut infras = JsonObject::open(o);
            for (infra, types) in &detailed {
                let mut by_type = JsonObject::open(infras.key(infra));
                for (resource_type, lines) in types {
                    let o = by_type.key(resource_type);
                    o.extend_from_slice(lines);
                    o.push(b']');
                }
                by_type.close();
            }
            infras.close();
        }
        let o = report.key("network_report");
        if network.is_empty() {
            o.extend_from_slice(b"[]");
        } else {
            let mut infras = JsonObject::open(o);
            for (infra, buckets) in &network {
                let mut by_bucket = JsonObject::open(infras.key(infra));
                for (bucket, directions) in buckets {
                    let mut by_direction = JsonObject::open(by_bucket.key(bucket));
                    for (direction, d) in directions {
                        let mut total = JsonObject::open(by_direction.key(direction));
                        write_number(total.key("cost"), d.cost);
                        total.field("cost_currency", d.currency);
                        total.field("measurement_unit", "gbytes");
                        write_number(total.key("quantity"), d.quantity);
                        let o = total.key("metered_waypoints");
                        o.extend_from_slice(&d.waypoints);
                        o.push(b']');
                        total.close();
                    }
                    by_direction.close();
                }
                by_bucket.close();
            }
            infras.close();
        }
        report.field("start_timestamp", &wire_time(start));
        report.field("end_timestamp", &wire_time(end));
        let installments: Vec<&SimInstallment> = user
            .map(|u| u.installments.as_slice())
            .unwrap_or_default()
            .iter()
            .filter(|i| i.created >= start && i.created < end)
            .collect();
        if !installments.is_empty() {
            let mut reservations = JsonObject::open(report.key("reservation_installments"));
            let o = reservations.key("server_types");
            for (n, i) in installments.iter().enumerate() {
                o.push(if n == 0 { b'[' } else { b',' });
                let mut line = JsonObject::open(o);
                write_number(line.key("cost"), i.cost);
                line.field("cost_currency", &i.currency);
                line.field("created_timestamp", &wire_time(i.created));
                line.field("end_timestamp", &wire_time(i.end));
                line.field("server_type_name", &i.server_type_name);
                line.field("server_type_reservation_id", &i.reservation_id);
                line.field("start_timestamp", &wire_time(i.start));
                line.close();
            }
            o.push(b']');
            reservations.close();
        }
        report.close();
        out
    }

    /// The sum of every `cost` line (detailed lines, waypoints, installments) the server reports
    /// for this user and window: what a correct client must add up to.
    pub fn report_cost(&self, user_id: u64, start: DateTime<Utc>, end: DateTime<Utc>) -> Decimal {
        let report = self.report(user_id, start, end, None);
        let mut sum = Decimal::ZERO;
        let lines = |v: &Value| -> Vec<Decimal> {
            v.as_array()
                .into_iter()
                .flatten()
                .filter_map(|l| l.get("cost").and_then(decimal_of))
                .collect()
        };
        for types in report["detailed_report"].as_object().into_iter().flatten() {
            for entries in types.1.as_object().into_iter().flatten() {
                sum += lines(entries.1).into_iter().sum::<Decimal>();
            }
        }
        for buckets in report["network_report"].as_object().into_iter().flatten() {
            for dirs in buckets.1.as_object().into_iter().flatten() {
                for dir in dirs.1.as_object().into_iter().flatten() {
                    sum += lines(&dir.1["metered_waypoints"])
                        .into_iter()
                        .sum::<Decimal>();
                }
            }
        }
        if let Some(i) = report.pointer("/reservation_installments/server_types") {
            sum += lines(i).into_iter().sum::<Decimal>();
        }
        sum
    }
}

/// A failure the simulator answers instead of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// An HTTP status (e.g. 500, 503) with a plain-text body.
    Http(u16),
    /// HTTP 429 with `Retry-After: <secs>`.
    RateLimited {
        /// The `Retry-After` value, in seconds.
        retry_after_secs: u64,
    },
    /// HTTP 200 with a JSON-RPC error object.
    RpcError {
        /// JSON-RPC error code.
        code: i64,
        /// JSON-RPC error message.
        message: String,
    },
    /// HTTP 200 with the real answer cut in the middle (a connection closed mid-body by a
    /// proxy that still sent a full status line).
    Truncated,
    /// HTTP 200 with a body that is not JSON at all.
    Malformed,
    /// HTTP 200 with a well-formed JSON-RPC envelope whose `result` has the wrong shape.
    WrongShape,
    /// HTTP 200 with an empty report for the window (no lines at all), whatever the dataset.
    Empty,
    /// HTTP 200 with the real report in which every `detailed_report` line appears twice.
    DuplicateLines,
    /// HTTP 200 whose lines are those of the window just before the one asked for (a page
    /// that shifted between reads), stamped with the requested window's bounds.
    ShiftedBack,
    /// Wait this long, then answer normally (a response slower than the client's timeout).
    Slow(std::time::Duration),
}

/// One request the simulator received.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedCall {
    /// The JSON-RPC method (empty when the body was not JSON-RPC).
    pub method: String,
    /// The positional params as sent.
    pub params: Value,
    /// Whether the Bearer key was right.
    pub authorized: bool,
}

#[derive(Debug)]
struct SimState {
    dataset: MetalsoftDataset,
    api_key: String,
    faults: Mutex<VecDeque<Fault>>,
    requests: AtomicUsize,
    calls: Mutex<Vec<RecordedCall>>,
    reject_fifth_param: std::sync::atomic::AtomicBool,
    /// Wait this long before answering each request.
    delay: Mutex<std::time::Duration>,
    /// Faults answered to every request for one user's window (until cleared).
    window_faults: Mutex<Vec<(u64, DateTime<Utc>, Fault)>>,
}

/// Entry point of the simulator.
pub struct MetalsoftSim;

impl MetalsoftSim {
    /// Serve `dataset` on `127.0.0.1:<free port>` with Bearer key `api_key`, until the handle is
    /// dropped or shut down.
    pub async fn start(
        dataset: MetalsoftDataset,
        api_key: impl Into<String>,
    ) -> std::io::Result<MetalsoftSimHandle> {
        let state = Arc::new(SimState {
            dataset,
            api_key: api_key.into(),
            faults: Mutex::new(VecDeque::new()),
            requests: AtomicUsize::new(0),
            calls: Mutex::new(Vec::new()),
            reject_fifth_param: std::sync::atomic::AtomicBool::new(false),
            delay: Mutex::new(std::time::Duration::ZERO),
            window_faults: Mutex::new(Vec::new()),
        });
        let app = Router::new()
            .route("/api/developer/developer", post(rpc))
            .with_state(state.clone());
        let server = super::Server::start("metalsoft", app).await?;
        let addr = server.addr;
        Ok(MetalsoftSimHandle {
            url: format!("http://{addr}"),
            addr,
            state,
            server,
        })
    }
}

/// A running simulator. `url` is the `endpoint` to configure; dropping the handle stops it.
pub struct MetalsoftSimHandle {
    /// Base URL (`http://127.0.0.1:<port>`), without the RPC path.
    pub url: String,
    /// The bound address.
    pub addr: SocketAddr,
    state: Arc<SimState>,
    server: super::Server,
}

impl std::fmt::Debug for MetalsoftSimHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetalsoftSimHandle")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl MetalsoftSimHandle {
    /// The dataset being served.
    pub fn dataset(&self) -> &MetalsoftDataset {
        &self.state.dataset
    }

    /// Answer the next `n` requests with `fault` (queued after earlier faults).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.extend(std::iter::repeat_n(fault, n));
        }
    }

    /// Wait this long before answering each request (zero: no delay).
    pub fn set_delay(&self, delay: std::time::Duration) {
        if let Ok(mut d) = self.state.delay.lock() {
            *d = delay;
        }
    }

    /// Answer `fault` to every request for `user_id`'s window starting at `start`, until
    /// [`clear_faults`](Self::clear_faults): a window that keeps failing whatever the order
    /// of requests.
    pub fn fail_window(&self, user_id: u64, start: DateTime<Utc>, fault: Fault) {
        if let Ok(mut w) = self.state.window_faults.lock() {
            w.push((user_id, start, fault));
        }
    }

    /// Forget every queued and window fault.
    pub fn clear_faults(&self) {
        if let Ok(mut q) = self.state.faults.lock() {
            q.clear();
        }
        if let Ok(mut w) = self.state.window_faults.lock() {
            w.clear();
        }
    }

    /// Behave like an older server that rejects a fifth parameter (`-32602`).
    pub fn reject_fifth_param(&self, reject: bool) {
        self.state
            .reject_fifth_param
            .store(reject, Ordering::Relaxed);
    }

    /// Requests received so far (including failed and unauthorized ones).
    pub fn request_count(&self) -> usize {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Every request received so far, in order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.state
            .calls
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Forget the recorded calls and reset the request counter.
    pub fn clear_calls(&self) {
        if let Ok(mut c) = self.state.calls.lock() {
            c.clear();
        }
        self.state.requests.store(0, Ordering::Relaxed);
    }

    /// Stop serving and wait for the server task to end.
    pub async fn shutdown(self) {
        self.server.stop().await;
    }
}

fn rpc_error(id: &Value, code: i64, message: &str) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "error": {"code": code, "message": message}})
}

async fn rpc(State(state): State<Arc<SimState>>, headers: HeaderMap, body: Bytes) -> Response {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let authorized = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|k| k == state.api_key);
    let request: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let id = request.get("id").cloned().unwrap_or(Value::Null);
    let method = request
        .get("method")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let params = request.get("params").cloned().unwrap_or(Value::Null);
    if let Ok(mut calls) = state.calls.lock() {
        calls.push(RecordedCall {
            method: method.clone(),
            params: params.clone(),
            authorized,
        });
    }
    let delay = state.delay.lock().map(|d| *d).unwrap_or_default();
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let window_fault = check_params(&params, false)
        .ok()
        .and_then(|(user, start, _, _)| {
            let faults = state.window_faults.lock().ok()?;
            faults
                .iter()
                .find(|(u, s, _)| *u == user && *s == start)
                .map(|(_, _, f)| f.clone())
        });
    let fault = window_fault.or_else(|| state.faults.lock().ok().and_then(|mut q| q.pop_front()));
    let mut content_fault = None;
    match fault {
        Some(Fault::Http(status)) => {
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            return (status, "simulated failure").into_response();
        }
        Some(Fault::RateLimited { retry_after_secs }) => {
            let mut h = HeaderMap::new();
            h.insert("retry-after", HeaderValue::from(retry_after_secs));
            return (StatusCode::TOO_MANY_REQUESTS, h, "rate limited").into_response();
        }
        Some(Fault::RpcError { code, message }) => {
            return Json(rpc_error(&id, code, &message)).into_response();
        }
        Some(Fault::Malformed) => {
            return (
                [("content-type", "application/json")],
                "{\"jsonrpc\": \"2.0\", \"id\": 1, \"result\": {\"detailed_report\": [}} <html>",
            )
                .into_response();
        }
        Some(Fault::WrongShape) => {
            return Json(json!({"jsonrpc": "2.0", "id": id, "result": [1, "two", {"three": 3}]}))
                .into_response();
        }
        Some(Fault::Slow(d)) => tokio::time::sleep(d).await,
        Some(other) => content_fault = Some(other),
        None => {}
    }
    if !authorized {
        return (
            StatusCode::UNAUTHORIZED,
            Json(rpc_error(&id, -32001, "Unauthorized")),
        )
            .into_response();
    }
    if request.is_null() || !request.is_object() {
        return Json(rpc_error(&id, -32700, "Parse error")).into_response();
    }
    if method != "resource_utilization_detailed" {
        return Json(rpc_error(
            &id,
            -32601,
            &format!("Method not found: {method}"),
        ))
        .into_response();
    }
    match check_params(&params, state.reject_fifth_param.load(Ordering::Relaxed)) {
        Ok((user, start, end, infra)) => {
            let result = match content_fault {
                Some(Fault::Empty) => MetalsoftDataset::new().report_json(user, start, end, None),
                Some(Fault::ShiftedBack) => {
                    let mut r =
                        state
                            .dataset
                            .report(user, start - (end - start), start, infra.as_deref());
                    r["start_timestamp"] = json!(wire_time(start));
                    r["end_timestamp"] = json!(wire_time(end));
                    r.to_string().into_bytes()
                }
                Some(Fault::DuplicateLines) => {
                    let mut r = state.dataset.report(user, start, end, infra.as_deref());
                    if let Some(infras) = r["detailed_report"].as_object_mut() {
                        for types in infras.values_mut() {
                            for lines in types
                                .as_object_mut()
                                .into_iter()
                                .flat_map(|m| m.values_mut())
                            {
                                if let Some(list) = lines.as_array_mut() {
                                    let copy = list.clone();
                                    list.extend(copy);
                                }
                            }
                        }
                    }
                    r.to_string().into_bytes()
                }
                _ => state
                    .dataset
                    .report_json(user, start, end, infra.as_deref()),
            };
            let mut body = Vec::with_capacity(result.len() + 40);
            let mut envelope = JsonObject::open(&mut body);
            envelope.field("jsonrpc", "2.0");
            envelope.field("id", &id);
            envelope.raw("result", &result);
            envelope.close();
            if content_fault == Some(Fault::Truncated) {
                let body = String::from_utf8_lossy(&body);
                let cut = body.len() / 2;
                let cut = (0..=cut)
                    .rev()
                    .find(|&i| body.is_char_boundary(i))
                    .unwrap_or(0);
                return (
                    [("content-type", "application/json")],
                    body[..cut].to_string(),
                )
                    .into_response();
            }
            ([("content-type", "application/json")], body).into_response()
        }
        Err(message) => Json(rpc_error(&id, -32602, &message)).into_response(),
    }
}

type Params = (u64, DateTime<Utc>, DateTime<Utc>, Option<Vec<u64>>);

fn check_params(params: &Value, reject_fifth: bool) -> Result<Params, String> {
    let p = params
        .as_array()
        .ok_or_else(|| "Invalid params: params must be an array".to_string())?;
    let max = if reject_fifth { 4 } else { 5 };
    if p.len() < 3 || p.len() > max {
        return Err(format!(
            "Invalid params: expected 3 to {max} parameters, got {}",
            p.len()
        ));
    }
    let user = p[0]
        .as_u64()
        .ok_or_else(|| "Invalid params: user_id_owner must be an integer".to_string())?;
    let time = |i: usize, name: &str| {
        p[i].as_str()
            .and_then(parse_wire_time)
            .ok_or_else(|| format!("Invalid params: {name} must be a YYYY-MM-DDTHH:MM:SSZ string"))
    };
    let start = time(1, "start_timestamp")?;
    let end = time(2, "end_timestamp")?;
    if end <= start {
        return Err("Invalid params: end_timestamp must be after start_timestamp".into());
    }
    let infra = match p.get(3) {
        None | Some(Value::Null) => None,
        Some(Value::Array(ids)) => Some(
            ids.iter()
                .map(|v| v.as_u64())
                .collect::<Option<Vec<u64>>>()
                .ok_or_else(|| "Invalid params: infrastructure_ids must be integers".to_string())?,
        ),
        Some(_) => return Err("Invalid params: infrastructure_ids must be an array".into()),
    };
    match p.get(4) {
        None | Some(Value::Null) | Some(Value::Array(_)) => {}
        Some(_) => return Err("Invalid params: datacenter_names must be an array".into()),
    }
    Ok((user, start, end, infra))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn day(d: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 10, d, 0, 0, 0).unwrap()
    }

    #[test]
    fn the_written_report_is_compact_json_in_the_servers_key_order() {
        let ds = MetalsoftDataset::generated(5, 100, 42, day(1), day(8));
        for user in 1..=5 {
            let json = ds.report_json(user, day(2), day(3), None);
            let text = String::from_utf8(json).unwrap();
            assert_eq!(text, ds.report(user, day(2), day(3), None).to_string());
            assert!(text.starts_with(r#"{"detailed_report":{"#), "{text:.40}");
            assert!(text.contains(r#"{"cost":"#));
        }
        let empty = String::from_utf8(ds.report_json(99, day(2), day(3), None)).unwrap();
        assert_eq!(
            empty,
            r#"{"detailed_report":[],"network_report":[],"start_timestamp":"2026-10-02T00:00:00Z","end_timestamp":"2026-10-03T00:00:00Z"}"#
        );
    }

    #[test]
    fn an_extra_field_named_like_a_standard_one_replaces_it_in_place() {
        let mut ds = MetalsoftDataset::generated(1, 0, 42, day(1), day(8));
        let user = ds.users.get_mut(&1).unwrap();
        let wan = user
            .resources
            .iter_mut()
            .find(|r| matches!(&r.kind, ResourceKind::Traffic { direction, .. } if direction == "upload"))
            .unwrap();
        wan.extras.insert("quantity".into(), json!("2.5000"));
        wan.extras.insert("zone".into(), json!("eu"));
        let report = ds.report(1, day(2), day(3), None);
        let infra = wan_infra(&report);
        let upload = &report["network_report"][&infra]["network"]["upload"];
        let line = upload["metered_waypoints"][0].as_object().unwrap();
        let keys: Vec<&str> = line.keys().map(String::as_str).collect();
        assert_eq!(keys[..STANDARD_LINE_FIELDS.len()], STANDARD_LINE_FIELDS);
        assert_eq!(keys[STANDARD_LINE_FIELDS.len()..], ["zone"]);
        assert_eq!(line["quantity"], "2.5000");
        // The direction's aggregate adds up what the lines report.
        assert_eq!(upload["quantity"].to_string(), "2.5");
    }

    fn wan_infra(report: &Value) -> String {
        report["network_report"]
            .as_object()
            .and_then(|m| m.keys().next().cloned())
            .expect("traffic")
    }
}
