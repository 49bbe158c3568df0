//! Lago's OpenAPI description as a test oracle: every batch body billsync sends must validate
//! against `#/components/schemas/EventBatchInput` of Lago's `lago-openapi.yaml` (AGPL-3.0, not
//! copied into this repository: see `tests/fixtures/specs/README.md` for where it is read from).

#![allow(dead_code)]

use serde_json::{json, Value};

/// Where Lago's OpenAPI description is: `$BILLSYNC_LAGO_OPENAPI`, else
/// `../shared/specs/lago-openapi.yaml` beside the clone. `None` (said on standard error) when
/// neither exists, so that a checkout without it skips the checks against it; with
/// `BILLSYNC_REQUIRE_SPECS` set (CI) a missing file fails the test instead.
pub fn lago_spec_path() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("BILLSYNC_LAGO_OPENAPI")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/specs/lago-openapi.yaml")
        });
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("BILLSYNC_REQUIRE_SPECS").is_some() {
        panic!(
            "Lago's OpenAPI description is not at {} and BILLSYNC_REQUIRE_SPECS is set",
            path.display()
        );
    }
    eprintln!(
        "Lago's OpenAPI description is not at {}: the checks against it are skipped \
         (set BILLSYNC_LAGO_OPENAPI to its path)",
        path.display()
    );
    None
}

/// Lago's OpenAPI description, parsed ([`lago_spec_path`]).
pub fn lago_spec() -> Option<Value> {
    let path = lago_spec_path()?;
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    Some(serde_yaml_ng::from_str(&text).expect("the spec is YAML"))
}

/// A validator for `#/components/schemas/EventBatchInput`: the whole spec is the schema
/// root (so internal `$ref`s resolve) with a root `$ref` to the batch schema. `None` without
/// the spec ([`lago_spec`]).
pub fn batch_validator() -> Option<jsonschema::Validator> {
    let mut spec = lago_spec()?;
    let root = spec.as_object_mut().expect("the spec is an object");
    root.insert("$ref".into(), json!("#/components/schemas/EventBatchInput"));
    root.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    Some(
        jsonschema::options()
            .with_draft(jsonschema::Draft::Draft202012)
            .build(&spec)
            .expect("EventBatchInput compiles"),
    )
}

/// Validate any request body the sink sends; the error lists every violation.
pub fn check_batch_body(validator: &jsonschema::Validator, body: &str) -> Result<(), String> {
    let value: Value = serde_json::from_str(body).map_err(|e| format!("not JSON: {e}"))?;
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("\n"))
    }
}
