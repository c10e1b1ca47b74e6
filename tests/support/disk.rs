//! A small file system for disk-full tests: a tmpfs of a given size mounted on a temporary
//! directory (unmounted on drop). Mounting needs root, as CI runs; a test that cannot mount
//! fails with the reason instead of skipping.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct SmallDisk {
    // Kept for its Drop (removes the mount point after the unmount).
    _dir: tempfile::TempDir,
    mount: PathBuf,
}

impl SmallDisk {
    pub fn mount(size_mib: u32) -> SmallDisk {
        let dir = tempfile::tempdir().unwrap();
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let out = as_root("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size_mib}m,mode=1777"),
                "tmpfs",
            ])
            .arg(&mount)
            .output()
            .expect("cannot run mount");
        assert!(
            out.status.success(),
            "disk-full tests mount a {size_mib} MiB tmpfs: they need root or password-less sudo, as .ci/run does: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        SmallDisk { _dir: dir, mount }
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// Fills the file system, leaving about `leave_kib` free, with a file that
    /// [`SmallDisk::free`] removes.
    pub fn fill(&self, leave_kib: u64) {
        let free = self.free_kib();
        let size = free.saturating_sub(leave_kib) * 1024;
        std::fs::write(self.mount.join("filler"), vec![0xA5; size as usize]).unwrap();
    }

    /// Takes the last free byte (after [`SmallDisk::fill`]).
    pub fn fill_completely(&self) {
        use std::io::Write;
        let mut f = std::fs::File::create(self.mount.join("filler-rest")).unwrap();
        let block = [0x5A; 4096];
        while f.write_all(&block).is_ok() {}
        while f.write_all(&block[..1]).is_ok() {}
    }

    /// Removes what [`SmallDisk::fill`] and [`SmallDisk::fill_completely`] wrote.
    pub fn free(&self) {
        for name in ["filler", "filler-rest"] {
            let _ = std::fs::remove_file(self.mount.join(name));
        }
    }

    pub fn free_kib(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-k"])
            .arg(&self.mount)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free space")
    }
}

impl Drop for SmallDisk {
    fn drop(&mut self) {
        let _ = as_root("umount").arg(&self.mount).status();
    }
}

/// `program`, through `sudo -n` unless the tests run as root.
fn as_root(program: &str) -> Command {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    if root {
        Command::new(program)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.args(["-n", program]);
        sudo
    }
}
