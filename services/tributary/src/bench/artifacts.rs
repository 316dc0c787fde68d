//! `tributary bench exec`, artifact part: upload and download throughput with sha256 hashing,
//! through the object store exactly as an agent sharing the server's storage uses it
//! (`Objects::put_file` hashes while it uploads; `get_verified` hashes before the file
//! appears). Two shapes: one 64 MiB file, and 1000 files of 4 KiB (per-file overhead).

use std::path::Path;
use std::time::{Duration, Instant};

use tributary_objects::{Objects, Stored};

/// Prints MB/s for both shapes on a local-directory store under `dir`.
pub async fn bench_artifacts(dir: &Path) -> anyhow::Result<()> {
    let objects = Objects::local(&dir.join("objects"))?;
    println!(
        "artifacts through a local object store ({}):",
        objects.location()
    );
    println!(
        "{:<26} {:>10} {:>12} {:>12}",
        "shape", "bytes", "upload MB/s", "download MB/s"
    );
    let big = vec![(dir.join("src/big.bin"), 64usize << 20)];
    let small: Vec<_> = (0..1000)
        .map(|i| (dir.join(format!("src/small/{i:04}.bin")), 4096usize))
        .collect();
    for (name, files) in [("1 file of 64 MiB", big), ("1000 files of 4 KiB", small)] {
        let (bytes, up, down) = round_trip(&objects, dir, name, &files).await?;
        println!(
            "{name:<26} {bytes:>10} {:>12.1} {:>12.1}",
            mb_per_s(bytes, up),
            mb_per_s(bytes, down)
        );
    }
    Ok(())
}

/// Writes the files (pseudo-random bytes), uploads them all, downloads them all (verified).
async fn round_trip(
    objects: &Objects,
    dir: &Path,
    name: &str,
    files: &[(std::path::PathBuf, usize)],
) -> anyhow::Result<(u64, Duration, Duration)> {
    let mut bytes = 0u64;
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for (path, size) in files {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        // xorshift64: incompressible enough, and no time spent on a real RNG.
        let data: Vec<u8> = (0..*size)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        std::fs::write(path, data)?;
        bytes += *size as u64;
    }
    let prefix = name.replace(' ', "-");
    let started = Instant::now();
    let mut stored: Vec<(String, Stored)> = Vec::with_capacity(files.len());
    for (i, (path, _)) in files.iter().enumerate() {
        let key = format!("bench/{prefix}/{i}");
        let s = objects.put_file(&key, path).await?;
        stored.push((key, s));
    }
    let up = started.elapsed();
    let started = Instant::now();
    for (i, (key, expected)) in stored.iter().enumerate() {
        let dest = dir.join(format!("dst/{prefix}/{i}"));
        objects.get_verified(key, expected, &dest).await?;
    }
    let down = started.elapsed();
    Ok((bytes, up, down))
}

fn mb_per_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64().max(1e-9)
}
