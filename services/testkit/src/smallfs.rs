//! A small filesystem of a test's own: a tmpfs of a few MB mounted on a temporary directory,
//! so a test can fill a disk, see what breaks, and free it again. Unmounted (lazily, so a
//! process still holding a file there cannot keep it) when dropped. Mounting needs root: tests
//! start with `require!(SmallFs)`.

use std::path::Path;
use std::process::Command;

pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    /// Mounts a tmpfs of `mb` MB on a fresh temporary directory.
    pub fn mount(mb: u32) -> Result<SmallFs, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("tempdir: {e}"))?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mb}m,mode=0755"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "mount -t tmpfs failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(SmallFs { dir })
    }

    /// Where it is mounted.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .output();
    }
}
