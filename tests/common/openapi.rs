//! Lago's OpenAPI description as a test oracle: every batch body billsync sends must validate
//! against `#/components/schemas/EventBatchInput` of `shared/specs/lago-openapi.yaml`.

#![allow(dead_code)]

use serde_json::{json, Value};

/// A validator for `#/components/schemas/EventBatchInput`: the whole spec is the schema
/// root (so internal `$ref`s resolve) with a root `$ref` to the batch schema.
pub fn batch_validator() -> jsonschema::Validator {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../shared/specs/lago-openapi.yaml"
    );
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mut spec: Value = serde_yaml_ng::from_str(&text).expect("the spec is YAML");
    let root = spec.as_object_mut().expect("the spec is an object");
    root.insert("$ref".into(), json!("#/components/schemas/EventBatchInput"));
    root.insert(
        "$schema".into(),
        json!("https://json-schema.org/draft/2020-12/schema"),
    );
    jsonschema::options()
        .with_draft(jsonschema::Draft::Draft202012)
        .build(&spec)
        .expect("EventBatchInput compiles")
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
