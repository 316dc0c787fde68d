//! The last test binary of a workspace `cargo test`: prints one line naming every test of this
//! run that was skipped for want of an engine, and the scripts that start them
//! (`tributary_testkit::engines`). Not a test of its own (`harness = false`): it always passes.

use tributary_testkit::engines::{skip_file, summary};

fn main() {
    // Our parent is the `cargo test` process the skipped tests recorded themselves under.
    let Some(file) = skip_file(std::os::unix::process::parent_id()) else {
        return;
    };
    let text = std::fs::read_to_string(&file).unwrap_or_default();
    println!("{}", summary(&text));
    let _ = std::fs::remove_file(&file);
    // Runs that never reached this binary (narrow `cargo test -p X --test Y`) leave files: drop
    // those older than a day.
    let day = std::time::Duration::from_secs(24 * 3600);
    if let Some(Ok(entries)) = file.parent().map(std::fs::read_dir) {
        for entry in entries.flatten() {
            let old = entry
                .metadata()
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > day);
            if old {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }
}
