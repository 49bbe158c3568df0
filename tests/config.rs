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

    // Every key the example shows commented out (an optional one at its default or an example
    // value) is a real key of its section with a valid value: uncommented, the file still
    // loads (provider sections refuse unknown keys).
    let text = std::fs::read_to_string(path).unwrap();
    let uncommented: Vec<String> = text
        .lines()
        .map(|l| match l.strip_prefix("    # ") {
            Some(rest)
                if rest.split(':').next().is_some_and(|k| {
                    !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_')
                }) =>
            {
                format!("    {rest}")
            }
            _ => l.to_string(),
        })
        .collect();
    let shown = uncommented
        .iter()
        .zip(text.lines())
        .filter(|(a, b)| a != b)
        .count();
    assert!(shown >= 20, "only {shown} optional keys shown");
    let all = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(all.path(), uncommented.join("\n")).unwrap();
    Settings::load(all.path()).expect("the example with every optional key shown loads");
    // And every key a provider kind has is shown: an unknown key makes the loader list the
    // kind's keys, each of which must be in that provider's section of the example.
    let mut probed = 0;
    for (at, line) in uncommented.iter().enumerate() {
        if !line.starts_with("    kind: ") || at < 1 || !uncommented[at - 1].starts_with("  ") {
            continue;
        }
        let section: Vec<&str> = uncommented[at..]
            .iter()
            .take_while(|l| l.starts_with("    ") || l.is_empty())
            .map(String::as_str)
            .collect();
        let mut probe = uncommented.clone();
        probe.insert(at + 1, "    zz_not_a_key: 1".to_string());
        std::fs::write(all.path(), probe.join("\n")).unwrap();
        let err = format!("{:?}", Settings::load(all.path()).unwrap_err());
        let Some(expected) = err.split("expected one of").nth(1) else {
            continue; // a sink kind without a closed key set
        };
        probed += 1;
        let expected = expected.split(" for key").next().unwrap_or_default();
        for key in expected.split('`').skip(1).step_by(2) {
            assert!(
                section
                    .iter()
                    .any(|l| l.starts_with(&format!("    {key}:"))),
                "key `{key}` of {} is not in billsync.example.yaml",
                uncommented[at - 1].trim()
            );
        }
    }
    assert!(probed >= 4, "only {probed} sections list their keys");

    // A key pasted into the file is refused, with the reason.
    let err = Secret::resolve("sk_live_pasted").unwrap_err();
    assert!(err.contains("env:VARIABLE"), "{err}");
    // A mounted file works, surrounding whitespace removed (as for `env:`): an editor's
    // newline or a pasted space is never part of a key.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("key");
    std::fs::write(&file, "from-a-file\n").unwrap();
    let s = Secret::resolve(&format!("file:{}", file.display())).unwrap();
    assert_eq!(s.expose(), "from-a-file");
    std::fs::write(&file, " from-a-file \t\r\n").unwrap();
    let s = Secret::resolve(&format!("file:{}", file.display())).unwrap();
    assert_eq!(s.expose(), "from-a-file");
    assert_eq!(format!("{s:?} {s}"), "Secret(***) ***");
}

/// A bad value inside a provider or sink section names its whole key (not only the section),
/// and an environment override of a number there is read as a number.
#[test]
fn a_bad_field_of_a_provider_or_sink_names_its_key_and_env_overrides_are_parsed() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, "k\n").unwrap();
    let settings = |sink_extra: &str, provider_extra: &str| {
        format!(
            "ledger: {{ path: {d}/ledger.db }}\nmappings: [{m}]\nproviders:\n  ms:\n    kind: metalsoft\n    endpoint: http://127.0.0.1:9\n    api_key: file:{k}\n{provider_extra}sinks:\n  lago:\n    kind: lago\n    api_url: http://127.0.0.1:9\n    api_key: file:{k}\n{sink_extra}",
            d = dir.path().display(),
            m = concat!(env!("CARGO_MANIFEST_DIR"), "/mappings"),
            k = key.display(),
        )
    };
    let load = |text: String| {
        let path = dir.path().join("billsync.yaml");
        std::fs::write(&path, text).unwrap();
        Settings::load(&path).map(|_| ()).map_err(|e| e.to_string())
    };
    for (sink, provider, key) in [
        (
            "    batch_size: \"ten\"\n",
            "    user_ids: [1]\n    start: 2026-10-01T00:00:00Z\n",
            "sinks.lago.batch_size",
        ),
        (
            "",
            "    user_ids: [one]\n    start: 2026-10-01T00:00:00Z\n",
            "providers.ms.user_ids[0]",
        ),
        (
            "",
            "    user_ids: [1]\n    window: abc\n    start: 2026-10-01T00:00:00Z\n",
            "providers.ms.window",
        ),
        (
            "",
            "    user_ids: [1]\n    start: yesterday\n",
            "providers.ms.start",
        ),
        (
            "",
            "    start: 2026-10-01T00:00:00Z\n",
            "providers.ms.user_ids",
        ),
        (
            "    retry: { max_retries: x }\n",
            "    user_ids: [1]\n    start: 2026-10-01T00:00:00Z\n",
            "sinks.lago.retry.max_retries",
        ),
        (
            "",
            "    user_ids: [1]\n    kind: metalsfot\n    start: 2026-10-01T00:00:00Z\n",
            "providers.ms.kind",
        ),
    ] {
        let text = settings(sink, provider).replace(
            "    kind: metalsoft\n",
            if provider.contains("kind:") {
                ""
            } else {
                "    kind: metalsoft\n"
            },
        );
        let err = load(text).expect_err(key);
        assert!(
            err.contains(&format!("{key}`")) || err.contains(&format!("\"{key}\"")),
            "{key}: {err}"
        );
    }
    load(settings(
        "",
        "    user_ids: [1]\n    start: 2026-10-01T00:00:00Z\n",
    ))
    .expect("loads");

    // `BILLSYNC__SINKS__LAGO__BATCH_SIZE=50`: a number (a child process: the environment is
    // the process's own).
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_billsync"))
        .args(["--config"])
        .arg(dir.path().join("billsync.yaml"))
        .args(["mappings", "validate"])
        .env("BILLSYNC__SINKS__LAGO__BATCH_SIZE", "50")
        .env_remove("BILLSYNC_CONFIG")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `status` and the `ledger` commands read the settings without resolving a secret: the
/// ledger's section and each Stripe sink's `max_age` (its default, 35 days, when not set),
/// whatever secrets the providers and sinks name; a `max_age` that is not a duration is an
/// error naming its key.
#[test]
fn the_ledger_commands_settings_need_no_secret_and_keep_each_stripe_sinks_max_age() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("billsync.yaml");
    let write = |stripe_max_age: &str| {
        std::fs::write(
            &cfg,
            format!(
                "ledger:\n  path: {}\nproviders:\n  ms:\n    kind: metalsoft\n    endpoint: http://127.0.0.1:9\n    api_key: env:BILLSYNC_TEST_UNSET_MS_KEY\n    user_ids: [1]\nsinks:\n  lago:\n    kind: lago\n    api_url: http://127.0.0.1:9\n    api_key: env:BILLSYNC_TEST_UNSET_LAGO_KEY\n  eu:\n    kind: stripe\n    api_key: env:BILLSYNC_TEST_UNSET_STRIPE_KEY\n{stripe_max_age}  us:\n    kind: stripe\n    api_key: file:/nonexistent/stripe-key\ndefault_sink: lago\n",
                dir.path().join("ledger.db").display()
            ),
        )
        .unwrap();
    };
    write("    max_age: 40d\n");
    assert!(
        Settings::load(&cfg).is_err(),
        "the full settings need the secrets"
    );
    let settings = Settings::load_for_ledger(&cfg).expect("no secret is resolved");
    let day = std::time::Duration::from_secs(86_400);
    assert_eq!(
        settings.stripe_max_age,
        [("eu".to_string(), day * 40), ("us".to_string(), day * 35)].into()
    );
    write("    max_age: forty days\n");
    let err = Settings::load_for_ledger(&cfg).unwrap_err().to_string();
    assert!(err.contains("sinks.eu.max_age"), "{err}");
}
