//! Disk and database trouble: a full disk (the binary under `ulimit -f`), a read-only ledger,
//! a ledger deleted mid-run. Each ends with a clear error or a crash, and the next run leaves
//! every key in Lago exactly once. (A ledger from a newer billsync: `tests/ledger.rs`.)

#[path = "common/world.rs"]
mod world;

use std::process::{Command, Output, Stdio};

use billsync::mapping::MappingSet;
use billsync::simulators::lago::Behaviour;
use billsync::sync::SyncOptions;
use world::{now, World, LAGO_KEY, MS_KEY};

fn opts() -> SyncOptions {
    SyncOptions {
        now: Some(now()),
        ..Default::default()
    }
}

fn setup(world: &World) -> String {
    let dir = world.dir.path();
    let mappings = world::example_mappings_dir(dir);
    world::write_config(
        dir,
        &world.metalsoft.url,
        &world.lago.url,
        mappings.to_str().unwrap(),
        "",
    )
}

/// `billsync sync` through `sh`, with a shell prefix such as `ulimit -f 64;`.
async fn sync_binary(cfg: &str, prefix: &str) -> Output {
    // `prefix` ends with `;` or with a command that runs the binary (`exec timeout …`).
    let script = if prefix.trim_end().ends_with(';') || prefix.is_empty() {
        format!("{prefix} exec \"$0\" --config \"$1\" --output text sync")
    } else {
        format!("{prefix} \"$0\" --config \"$1\" --output text sync")
    };
    let mut cmd = Command::new("sh");
    cmd.args(["-c", &script, env!("CARGO_BIN_EXE_billsync"), cfg])
        .env("TEST_MS_KEY", MS_KEY)
        .env("TEST_LAGO_KEY", LAGO_KEY)
        .env_remove("BILLSYNC_CONFIG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap()
}

fn text(out: &Output) -> String {
    format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

async fn assert_each_key_once(world: &World) {
    let (totals, keys) = world.expected(&MappingSet::examples().unwrap()).await;
    let held = world.lago.counts();
    assert!(held.values().all(|&n| n == 1), "a key stored twice");
    assert_eq!(
        held.keys().collect::<Vec<_>>(),
        keys.keys().collect::<Vec<_>>()
    );
    assert_eq!(world.lago_totals(), totals);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_stops_the_run_and_the_next_run_delivers_each_key_once() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world);
    // 64 blocks: the ledger (schema, WAL) outgrows it while staging.
    let full = sync_binary(&cfg, "ulimit -f 64;").await;
    assert_ne!(
        full.status.code(),
        Some(0),
        "the run cannot succeed on a full disk: {}",
        text(&full)
    );
    let stored = world.lago.events().len();
    assert!(stored < 71, "the run stopped before delivering everything");
    // Room again: the next run completes, nothing is billed twice.
    let next = sync_binary(&cfg, "").await;
    assert_eq!(next.status.code(), Some(4), "{}", text(&next));
    assert_each_key_once(&world).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_ledger_deleted_mid_run_is_rebuilt_and_nothing_is_billed_twice() {
    for behaviour in [Behaviour::Postgres, Behaviour::ClickHouse] {
        let world = World::start(behaviour).await;
        // First run: stage and send part (the first batch fails for good, stays pending).
        world.lago.fail_next(4, 503);
        let p = world.pipeline().await;
        let first = p.sync(&opts()).await.unwrap();
        assert_eq!((first.sent, first.failed), (46, 25));
        // Runs are processes of their own: this one is over before the files go. Dropped
        // without `close`, its connections close on sqlx's worker threads meanwhile, and one
        // that began closing before the deletion ends by removing `ledger.db-wal` and
        // `-shm` *by name* — by then the new ledger's, with its schema (seen once in CI:
        // "no such table: locks").
        p.ledger.close().await;
        drop(p);
        // The ledger disappears (an operator, a wiped volume).
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(world.dir.path().join(format!("ledger.db{suffix}")));
        }
        // The next run starts a new ledger from `start`: every record is pulled and sent
        // again with the same keys; Lago recognises the 46 it has.
        let p = world.pipeline().await;
        let second = p.sync(&opts()).await.unwrap();
        assert_eq!(second.new, 80, "{behaviour:?}");
        assert_eq!(second.sent + second.already_delivered, 71, "{behaviour:?}");
        if behaviour == Behaviour::Postgres {
            assert_eq!(second.already_delivered, 46);
        }
        assert_eq!(
            p.ledger.undelivered().await.unwrap(),
            1,
            "only the held record"
        );
        assert_each_key_once(&world).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_read_only_ledger_is_a_clear_error_and_changes_nothing() {
    let world = World::start(Behaviour::Postgres).await;
    let cfg = setup(&world);
    // A first run creates the ledger.
    let first = sync_binary(&cfg, "").await;
    assert_eq!(first.status.code(), Some(4), "{}", text(&first));
    let ledger_dir = world.dir.path().join("ledger");
    // Tests run as root, where permissions do not stop writes: make the files immutable.
    let immutable = Command::new("chattr")
        .arg("+i")
        .arg(ledger_dir.join("ledger.db"))
        .status()
        .is_ok_and(|s| s.success());
    if !immutable {
        eprintln!("skipped: chattr +i is not available here (tests run as root, chmod does not stop writes)");
        return;
    }
    let ro = sync_binary(&cfg, "").await;
    let _ = Command::new("chattr")
        .arg("-i")
        .arg(ledger_dir.join("ledger.db"))
        .status();
    assert_eq!(ro.status.code(), Some(1), "{}", text(&ro));
    assert!(text(&ro).contains("ledger"), "{}", text(&ro));
    assert_each_key_once(&world).await;
}

/// The disk fills while windows are still being pulled ahead of the stager (`SIGXFSZ` ignored,
/// so writes fail with `EFBIG` instead of killing the process): the ledger error ends the run
/// with a clear error — it must not leave the puller waiting on a full channel — and the next
/// run delivers every key once.
#[tokio::test(flavor = "multi_thread")]
async fn a_disk_that_fills_mid_pull_is_an_error_not_a_hang() {
    let start = billsync::demo::demo_start();
    let dataset = billsync::simulators::metalsoft::MetalsoftDataset::generated(
        2,
        150,
        7,
        start,
        start + chrono::Duration::days(30),
    );
    let world = World::start_with(Behaviour::Postgres, dataset).await;
    let cfg = setup(&world);
    // 2 MB: the first transactions fit, a later one does not. A run that hangs is killed
    // after 90 s (exit 137) and fails the assertion below.
    let full = sync_binary(
        &cfg,
        "trap '' XFSZ; ulimit -f 4096; exec timeout -s KILL 90",
    )
    .await;
    let out = text(&full);
    assert_eq!(
        full.status.code(),
        Some(1),
        "a clear error, not a hang: {out}"
    );
    assert!(out.contains("ledger"), "the error names the ledger: {out}");
    let next = sync_binary(&cfg, "").await;
    assert!(
        matches!(next.status.code(), Some(0) | Some(4)),
        "{}",
        text(&next)
    );
    let held = world.lago.counts();
    assert!(!held.is_empty());
    assert!(held.values().all(|&n| n == 1), "a key stored twice");
}
