//! Opening a store's pool: the same pool settings on both engines, SQLite's pragmas, an
//! optional PostgreSQL schema of the store's own, and the store's migrations for its engine.

use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, AnyPool, Connection, Executor};

use crate::{Engine, Location, SqlStoreError};

/// A store's migrations, one directory per engine (`migrations/{sqlite,postgres}` of its
/// crate, embedded there with `sqlx::migrate!`). Schema changes are new files for both
/// engines, never edits of applied ones.
#[derive(Clone, Copy)]
pub struct Migrations {
    pub sqlite: &'static Migrator,
    pub postgres: &'static Migrator,
}

impl Migrations {
    fn of(&self, engine: Engine) -> &'static Migrator {
        match engine {
            Engine::Sqlite => self.sqlite,
            Engine::Postgres => self.postgres,
        }
    }
}

/// How SQLite syncs a store's commits (`PRAGMA synchronous`, in WAL mode).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Synchronous {
    /// No sync per commit: for a read model rebuilt from the log whose offsets commit with its
    /// rows (a power loss takes both back to an earlier consistent point).
    Normal,
    /// A sync per commit.
    Full,
}

/// What differs between stores when they open.
#[derive(Clone)]
pub struct Settings {
    /// The store's name in messages: "read-model", "metering".
    pub what: &'static str,
    pub migrations: Migrations,
    pub synchronous: Synchronous,
    /// On PostgreSQL, the schema of the store's tables (created if missing, and every
    /// connection's `search_path`); `None` for the URL's default schema. Ignored on SQLite.
    pub schema: Option<String>,
}

/// An open, migrated store.
#[derive(Clone, Debug)]
pub struct Store {
    pub pool: AnyPool,
    pub engine: Engine,
    /// The URL the pool connected to (a SQLite path's escaped URL), for connections of the
    /// store's own (e.g. metering's writer lock).
    pub url: String,
}

/// Opens the database at `location` with `settings` and runs its migrations.
pub async fn open(location: &Location, settings: &Settings) -> Result<Store, SqlStoreError> {
    sqlx::any::install_default_drivers();
    let engine = location.engine(settings.what)?;
    let url = location.url(settings.what)?;
    let mut options = AnyPoolOptions::new()
        .max_connections(4)
        .acquire_timeout(Duration::from_secs(30));
    match engine {
        Engine::Sqlite => {
            let synchronous = match settings.synchronous {
                Synchronous::Normal => "NORMAL",
                Synchronous::Full => "FULL",
            };
            let pragmas = format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {synchronous}; \
                 PRAGMA busy_timeout = 10000;"
            );
            // A file has no connection to lose: no ping (a round trip to sqlx's worker
            // thread) before every use.
            options = options
                .test_before_acquire(false)
                .after_connect(move |conn, _| {
                    let pragmas = pragmas.clone();
                    Box::pin(async move {
                        conn.execute(pragmas.as_str()).await?;
                        Ok(())
                    })
                });
        }
        Engine::Postgres => {
            if let Some(schema) = &settings.schema {
                check_schema(schema)?;
                create_schema(&url, schema).await?;
                let set = format!("SET search_path TO {schema}");
                options = options.after_connect(move |conn, _| {
                    let set = set.clone();
                    Box::pin(async move {
                        conn.execute(set.as_str()).await?;
                        Ok(())
                    })
                });
            }
        }
    }
    let pool = options.connect(&url).await?;
    settings.migrations.of(engine).run(&pool).await?;
    Ok(Store { pool, engine, url })
}

/// A schema name safe to write into SQL: lowercase letters, digits and `_`.
fn check_schema(schema: &str) -> Result<(), SqlStoreError> {
    let ok = !schema.is_empty()
        && schema
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if ok {
        Ok(())
    } else {
        Err(SqlStoreError::Schema(schema.to_owned()))
    }
}

/// Creates `schema` if missing, on a connection of its own (a replica racing another may see
/// it appear between the check and the create: retried once).
async fn create_schema(url: &str, schema: &str) -> Result<(), SqlStoreError> {
    let mut conn = AnyConnection::connect(url).await?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if let Err(e) = conn.execute(create.as_str()).await {
        tracing::debug!(error = %e, schema, "creating the schema (retrying once)");
        conn.execute(create.as_str()).await?;
    }
    conn.close().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use sqlx::Row;

    use super::*;

    static MIGRATIONS: Migrator = sqlx::migrate!("./testdata/migrations");

    fn settings(synchronous: Synchronous) -> Settings {
        Settings {
            what: "test",
            migrations: Migrations {
                sqlite: &MIGRATIONS,
                postgres: &MIGRATIONS,
            },
            synchronous,
            schema: None,
        }
    }

    #[tokio::test]
    async fn a_sqlite_file_under_an_odd_directory_opens_migrated_with_its_pragmas() {
        let dir = tempfile::tempdir().expect("tempdir");
        let odd = dir.path().join("a#b?c%d");
        std::fs::create_dir(&odd).expect("mkdir");
        let path = odd.join("x.db");
        for (synchronous, expected) in [(Synchronous::Full, 2), (Synchronous::Normal, 1)] {
            let store = open(&Location::SqliteFile(path.clone()), &settings(synchronous))
                .await
                .expect("open");
            assert_eq!(store.engine, Engine::Sqlite);
            sqlx::query("INSERT INTO things (n) VALUES (7)")
                .execute(&store.pool)
                .await
                .expect("the migrated table");
            let sync: i64 = sqlx::query("PRAGMA synchronous")
                .fetch_one(&store.pool)
                .await
                .expect("pragma")
                .try_get(0)
                .expect("number");
            assert_eq!(sync, expected);
            store.pool.close().await;
        }
        assert!(
            path.exists(),
            "the file is at the path given, not elsewhere"
        );
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("a#b?c%d")]);
    }

    #[tokio::test]
    async fn an_unsupported_url_says_what_to_use() {
        let e = open(
            &Location::Url("mysql://h/db".into()),
            &settings(Synchronous::Full),
        )
        .await
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sqlite://PATH") && e.contains("postgres://"),
            "{e}"
        );
    }

    #[test]
    fn schema_names_are_checked() {
        assert!(check_schema("metering_replay_1").is_ok());
        for bad in ["", "Metering", "a;drop", "a b", "a-b"] {
            assert!(check_schema(bad).is_err(), "{bad:?}");
        }
    }
}
