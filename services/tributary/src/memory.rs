//! Giving freed memory back to the system.
//!
//! glibc's allocator keeps what a burst freed (a restart's catch-up of the log, a backlog of
//! queued builds) in its per-thread arenas: the process's RSS stays at its high-water mark
//! while its live state is a fraction of it. `malloc_trim` returns the free pages of every
//! arena. Called after start-up and then every [`TRIM_EVERY`]: a cheap call (microseconds to
//! a few milliseconds) against RSS that follows live work (`tributary bench history`).

use std::time::Duration;

/// How often the server trims.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Returns the allocator's free memory to the system now.
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Trims now and then every [`TRIM_EVERY`], in a task of the current runtime.
pub fn trim_periodically() {
    trim();
    tokio::spawn(async {
        let mut every = tokio::time::interval(TRIM_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            every.tick().await;
            trim();
        }
    });
}
