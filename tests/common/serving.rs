//! A provider serving the records it is given, under one chunk: a source re-reading its lines.
//! Tests change what it serves between syncs to model a provider restating its data.

use std::sync::{Arc, Mutex};

use billsync::providers::{Chunk, Cursors, Page, Provider, ProviderError};
use billsync::record::UsageRecord;
use chrono::{DateTime, Utc};

pub struct Serving(pub Arc<Mutex<Vec<UsageRecord>>>);

#[async_trait::async_trait]
impl Provider for Serving {
    fn kind(&self) -> &'static str {
        "metalsoft"
    }
    fn name(&self) -> &str {
        "metalsoft"
    }
    async fn plan(
        &self,
        _cursors: &Cursors,
        now: DateTime<Utc>,
    ) -> Result<Vec<Chunk>, ProviderError> {
        Ok(vec![Chunk {
            stream: "lines".into(),
            window_start: now,
            window_end: now,
            detail: String::new(),
        }])
    }
    async fn fetch(&self, _chunk: &Chunk, _now: DateTime<Utc>) -> Result<Page, ProviderError> {
        Ok(Page {
            records: self.0.lock().unwrap().clone(),
            cursor: None,
            also: Vec::new(),
        })
    }
}
