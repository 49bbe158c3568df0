//! billsync: provider → normalize → map → ledger (outbox) → sink → ledger (ack).
//!
//! Pulls billing and utilization data from cloud providers, maps it to customers and billable
//! metrics through declarative files, and pushes idempotent usage records to invoicing systems,
//! with a SQLite ledger that makes every run resumable and every failed push replayable.

pub mod bench;
pub mod cli;
pub mod config;
pub mod demo;
pub mod http;
pub mod ledger;
pub mod mapping;
pub mod observe;
pub mod providers;
pub mod reconcile;
pub mod record;
pub mod shutdown;
pub mod simulators;
pub mod sinks;
pub mod sync;
