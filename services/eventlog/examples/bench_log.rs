//! Benchmarks the SQLite event log on a fresh file.
//!
//! ```text
//! cargo run --release -p tributary-eventlog --example bench_log -- [EVENTS] [BATCH] [APPENDERS] [DIR]
//! ```
//!
//! Defaults: 1000000 events in batches of 1000 from 16 concurrent appenders, in a temporary
//! directory. The file is created with the default (durable, `synchronous=FULL`) options.

use std::sync::Arc;

use tributary_eventlog::bench::{bench_log_with, APPENDERS};
use tributary_eventlog::sqlite::SqliteLog;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let events: u64 = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(1_000_000);
    let batch: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let appenders: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(APPENDERS);
    let dir = match args.next() {
        Some(dir) => tempfile::tempdir_in(dir)?,
        None => tempfile::tempdir()?,
    };
    let log = Arc::new(SqliteLog::open(&dir.path().join("events.db")).await?);
    let report = bench_log_with(log.clone(), events, batch, appenders).await;
    print!("{report}");
    log.close().await;
    let size = std::fs::metadata(dir.path().join("events.db"))?.len();
    println!("  file size: {:.1} MiB", size as f64 / (1024.0 * 1024.0));
    Ok(())
}
