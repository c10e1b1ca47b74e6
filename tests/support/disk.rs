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

/// An ext4 file system on a loop device, for power-cut tests. [`LoopDisk::cut_power`]
/// replaces it with what the device held at that instant: what was written to the disk
/// (by fsync, or by the kernel's writeback) survives, what sat in the page cache is lost,
/// exactly as when the power goes. Mounted with `commit=600`, so the file system's own
/// journal commits every 5 s do not save anything the program did not ask to be saved
/// (only fsync does), and none lands while the device is copied.
pub struct LoopDisk {
    dir: tempfile::TempDir,
    mount: PathBuf,
    device: String,
}

impl LoopDisk {
    pub fn create(size_mib: u32) -> LoopDisk {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("disk.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(u64::from(size_mib) * 1024 * 1024).unwrap();
        run(as_root("mkfs.ext4").args(["-q", "-F"]).arg(&image));
        let mount = dir.path().join("fs");
        std::fs::create_dir(&mount).unwrap();
        let device = attach(&image, &mount);
        run(as_root("chmod").arg("1777").arg(&mount));
        LoopDisk { dir, mount, device }
    }

    pub fn path(&self) -> &Path {
        &self.mount
    }

    /// The power goes now: the disk keeps what reached the device; the page cache is
    /// gone. Stop the program writing to it first (SIGSTOP), so nothing it does after the
    /// cut counts; then kill it and call [`LoopDisk::power_back`].
    pub fn cut_power(&self) {
        if std::env::var_os("POWER_CUT_SYNC").is_some() {
            // Not a power cut: the page cache is written first (what an OS crash after
            // `sync` leaves). For comparison with the real cut.
            run(Command::new("sync").arg("-f").arg(&self.mount));
        }
        copy_sparse(
            &self.dir.path().join("disk.img"),
            &self.dir.path().join("cut.img"),
        );
    }

    /// The machine starts again on what the disk held at the cut: the file system is
    /// mounted from that copy (ext4 replays its journal, as after a real power cut).
    pub fn power_back(&mut self) {
        let image = self.dir.path().join("disk.img");
        // Unmounting writes the page cache back, into the image thrown away next.
        run(as_root("umount").arg(&self.mount));
        run(as_root("losetup").args(["-d", &self.device]));
        std::fs::rename(self.dir.path().join("cut.img"), &image).unwrap();
        self.device = attach(&image, &self.mount);
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        let _ = as_root("umount").arg(&self.mount).status();
        let _ = as_root("losetup").args(["-d", &self.device]).status();
    }
}

/// Attaches `image` to a free loop device and mounts it on `mount`; returns the device.
fn attach(image: &Path, mount: &Path) -> String {
    let out = as_root("losetup")
        .args(["-f", "--show"])
        .arg(image)
        .output()
        .expect("cannot run losetup");
    assert!(
        out.status.success(),
        "power-cut tests need loop devices (root, as .ci/run runs): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
    run(as_root("mount")
        .args(["-t", "ext4", "-o", "commit=600", &device])
        .arg(mount));
    device
}

/// Copies a disk image block by block as it is now, keeping it sparse.
fn copy_sparse(from: &Path, to: &Path) {
    run(Command::new("cp").arg("--sparse=always").arg(from).arg(to));
}

fn run(command: &mut Command) {
    let out = command.output().expect("cannot run a disk command");
    assert!(
        out.status.success(),
        "{command:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
