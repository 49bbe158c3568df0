//! Built-in simulators of the provider and sink APIs, on loopback.
//!
//! They behave like the real APIs as the reference describes them (string numbers, JSON-RPC
//! errors, Lago's 422 semantics) and are shared by `billsync demo`, the tests and the benchmarks.

pub mod jelastic;
pub mod lago;
pub mod metalsoft;
pub mod sakura;
pub mod softlayer;
pub mod stripe;
