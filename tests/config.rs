//! Settings: the shipped example loads, environment overrides apply, secrets come only from the
//! environment or a file and never show in `Debug`.

use billsync::config::{Secret, Settings};

#[test]
fn the_example_settings_load_with_secrets_from_the_environment_and_env_overrides() {
    // One test touches the process environment, so the variables cannot race other tests.
    std::env::set_var("METALSOFT_API_KEY", "ms-secret-value-1234");
    std::env::set_var("LAGO_API_KEY", "lago-secret-value-5678");
    std::env::set_var("SOFTLAYER_API_KEY", "sl-secret-value-9012");
    std::env::set_var("SAKURA_ACCESS_TOKEN", "sakura-token-3456");
    std::env::set_var("SAKURA_ACCESS_TOKEN_SECRET", "sakura-secret-7890");
    std::env::set_var("JELASTIC_TOKEN", "jelastic-token-1234");
    std::env::set_var("BILLSYNC__LEDGER__PATH", "/data/ledger.db");
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/billsync.example.yaml");
    let settings = Settings::load(std::path::Path::new(path)).expect("the example loads");
    std::env::remove_var("BILLSYNC__LEDGER__PATH");
    assert_eq!(
        settings.ledger.path,
        std::path::PathBuf::from("/data/ledger.db")
    );
    assert_eq!(settings.default_sink_name(), Some("lago"));
    assert_eq!(
        settings.providers.len(),
        4,
        "every provider kind has an example"
    );
    let debug = format!("{settings:?}");
    assert!(debug.contains("Secret(***)"), "{debug}");
    assert!(!debug.contains("ms-secret-value-1234"), "{debug}");
    for secret in [
        "lago-secret-value-5678",
        "sl-secret-value-9012",
        "sakura-token-3456",
        "sakura-secret-7890",
        "jelastic-token-1234",
    ] {
        assert!(!debug.contains(secret), "{debug}");
    }

    // A key pasted into the file is refused, with the reason.
    let err = Secret::resolve("sk_live_pasted").unwrap_err();
    assert!(err.contains("env:VARIABLE"), "{err}");
    // A mounted file works, trailing newline removed.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let s = Secret::resolve(&format!("file:{}", file.display())).unwrap();
    assert_eq!(s.expose(), "from-a-file");
    assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
}
