//! Fixtures and helpers shared by the MetalSoft tests.
//!
//! The two fixtures are the copies the simulator embeds (`src/simulators/data/`), checked
//! byte for byte against `shared/fixtures/providers/metalsoft/` by `provider_metalsoft`.

#![allow(dead_code, unused_imports)]

pub use billsync::simulators::metalsoft::{FIXTURE_BIGSTEP_2020, FIXTURE_CURRENT};
use serde_json::Value;

/// Every line of a report, in the order the records come: detailed lines, then waypoints, then
/// reservation installments.
pub fn lines_of(report: &Value) -> Vec<Value> {
    let mut lines = Vec::new();
    let objects = |v: &Value| v.as_object().cloned().unwrap_or_default();
    for types in objects(&report["detailed_report"]).values() {
        for list in objects(types).values() {
            lines.extend(list.as_array().cloned().unwrap_or_default());
        }
    }
    for buckets in objects(&report["network_report"]).values() {
        for directions in objects(buckets).values() {
            for aggregate in objects(directions).values() {
                lines.extend(
                    aggregate["metered_waypoints"]
                        .as_array()
                        .cloned()
                        .unwrap_or_default(),
                );
            }
        }
    }
    lines.extend(
        report["reservation_installments"]["server_types"]
            .as_array()
            .cloned()
            .unwrap_or_default(),
    );
    lines
}
