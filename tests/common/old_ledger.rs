//! Ledgers as older billsync releases left them, for upgrade and refusal tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

/// A ledger at `path` with schema 0001 only, as the first release created it (the migration
/// applied from a directory holding only that file): a pool on it.
pub async fn at_schema_0001(path: &Path) -> sqlx::SqlitePool {
    let first_only = path.with_extension("first-migration");
    std::fs::create_dir_all(&first_only).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/0001_ledger.sql"),
        first_only.join("0001_ledger.sql"),
    )
    .unwrap();
    let pool = sqlx::SqlitePool::connect_with(
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true),
    )
    .await
    .unwrap();
    sqlx::migrate::Migrator::new(first_only.as_path())
        .await
        .unwrap()
        .run(&pool)
        .await
        .unwrap();
    pool
}

/// The newest schema migration the ledger at `path` records as applied.
pub async fn newest_migration(path: &Path) -> i64 {
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap();
    let n: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&pool)
        .await
        .unwrap();
    pool.close().await;
    n
}

/// `dir/ledger.db` at schema 0001 ([`at_schema_0001`]): its path and a pool on it.
pub async fn in_dir_at_schema_0001(dir: &Path) -> (PathBuf, sqlx::SqlitePool) {
    let path = dir.join("ledger.db");
    let pool = at_schema_0001(&path).await;
    (path, pool)
}

/// Apply the migrations up to `version` (inclusive) to the ledger at `path` (open as `pool`),
/// as the release whose newest migration that was would have left it.
pub async fn upgrade_to(pool: &sqlx::SqlitePool, path: &Path, version: i64) {
    let upto = path.with_extension(format!("migrations-{version}"));
    std::fs::create_dir_all(&upto).unwrap();
    let all = Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/migrations"));
    for entry in std::fs::read_dir(all).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().into_string().unwrap();
        let number: i64 = name.split('_').next().unwrap().parse().unwrap();
        if number <= version {
            std::fs::copy(entry.path(), upto.join(&name)).unwrap();
        }
    }
    sqlx::migrate::Migrator::new(upto.as_path())
        .await
        .unwrap()
        .run(pool)
        .await
        .unwrap();
}
