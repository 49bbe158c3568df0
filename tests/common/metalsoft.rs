//! Fixtures and helpers shared by the MetalSoft tests.
//!
//! The two fixtures are the copies the simulator embeds (`src/simulators/data/`), checked
//! byte for byte against `shared/fixtures/providers/metalsoft/` by `provider_metalsoft`.

#![allow(dead_code)]

pub use billsync::simulators::metalsoft::{FIXTURE_BIGSTEP_2020, FIXTURE_CURRENT};
