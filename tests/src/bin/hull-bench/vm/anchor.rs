//! The anchor under TCG: a busybox init making hull-init's mounts, booted
//! with the same kernel and the same QEMU arguments as the hull VM. A tiny
//! initramfs (a static busybox, a few applet links, /dev/console and
//! /dev/kmsg) whose /init is a shell script: it mounts proc, sysfs,
//! devtmpfs, /run, /tmp and cgroup2 with hull-init's flags, writes a line
//! to /dev/kmsg after each (the kernel stamps it to the microsecond on
//! the console), prints /proc/uptime and powers off.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_image::vm::cpio::{EntryKind, Tree};
use hull_image::vm::qemu::{self, HostToken, RunOptions, VmState};

/// hull-init's mounts (init/src/main.rs, MOUNTS), in its order, with its
/// flags, as busybox mount spells them.
const SCRIPT: &str = r#"#!/bin/sh
# hull-bench's anchor: hull-init's mounts by a busybox shell as PID 1.
PATH=/bin
log() { echo "<2>busybox-init: $*" > /dev/kmsg; }
log "started as pid $$"
mount -t proc -o nosuid,nodev,noexec proc /proc && log "mounted proc at /proc"
mount -t sysfs -o nosuid,nodev,noexec sysfs /sys && log "mounted sysfs at /sys"
mount -t devtmpfs -o nosuid,mode=0755 devtmpfs /dev && log "mounted devtmpfs at /dev"
mount -t tmpfs -o nosuid,nodev,mode=0755 tmpfs /run && log "mounted tmpfs at /run"
mount -t tmpfs -o nosuid,nodev,mode=1777 tmpfs /tmp && log "mounted tmpfs at /tmp"
mount -t cgroup2 -o nosuid,nodev,noexec,nsdelegate cgroup2 /sys/fs/cgroup && log "mounted cgroup2 at /sys/fs/cgroup"
echo "busybox-init: uptime $(cat /proc/uptime)"
poweroff -f
"#;

/// How long a boot of the anchor may take before QEMU is killed.
const TIMEOUT: Duration = Duration::from_secs(120);

/// What one boot of the anchor's console says, on the kernel's clock.
#[derive(Debug, Clone)]
pub struct AnchorBoot {
    /// The script's first line: the kernel has exec'd /init.
    pub init_start: f64,
    /// From the first line to the cgroup2 mount's.
    pub mounts_ms: f64,
    pub initramfs_bytes: u64,
    /// QEMU's start to its exit after the power-off (host clock).
    pub qemu_ms: f64,
}

/// Writes the anchor's initramfs with `busybox` (a static one) to `out`.
pub fn write_initramfs(busybox: &Path, out: &Path) -> Result<u64> {
    let mut tree = Tree::default();
    for dir in ["proc", "sys", "dev", "run", "tmp"] {
        tree.insert(dir, EntryKind::Dir, 0o755);
    }
    tree.insert(
        "dev/console",
        EntryKind::CharDevice { major: 5, minor: 1 },
        0o600,
    );
    tree.insert(
        "dev/kmsg",
        EntryKind::CharDevice {
            major: 1,
            minor: 11,
        },
        0o644,
    );
    tree.insert("bin/busybox", EntryKind::File(busybox.to_path_buf()), 0o755);
    for applet in ["sh", "mount", "cat", "poweroff"] {
        tree.insert(
            &format!("bin/{applet}"),
            EntryKind::Symlink("busybox".into()),
            0o777,
        );
    }
    tree.insert("init", EntryKind::Bytes(SCRIPT.as_bytes().to_vec()), 0o755);
    let mut file = std::io::BufWriter::new(
        std::fs::File::create(out).with_context(|| format!("create {}", out.display()))?,
    );
    let bytes = tree.write(&mut file)?;
    std::io::Write::flush(&mut file)?;
    Ok(bytes)
}

/// A static busybox: the busybox base image's (the one the VM image
/// carries), else the host's busybox-static.
pub fn busybox() -> Result<std::path::PathBuf> {
    let from_image = hull_tests::vm::build_cache().join("images/busybox/rootfs/bin/busybox");
    for path in [from_image, "/bin/busybox".into()] {
        if std::fs::read(&path).is_ok_and(|elf| is_static_elf(&elf)) {
            return Ok(path);
        }
    }
    bail!("no static busybox: apt-get install busybox-static")
}

/// A 64-bit little-endian ELF without a program interpreter (PT_INTERP).
fn is_static_elf(elf: &[u8]) -> bool {
    let u16_at = |at: usize| {
        elf.get(at..at + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]))
    };
    let u64_at = |at: usize| {
        elf.get(at..at + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    };
    if !elf.starts_with(b"\x7fELF\x02\x01") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u64_at(0x20), u16_at(0x36), u16_at(0x38))
    else {
        return false;
    };
    let Ok(phoff) = usize::try_from(phoff) else {
        return false;
    };
    (0..usize::from(phnum)).all(|i| {
        let at = phoff + i * usize::from(phentsize);
        elf.get(at..at + 4) != Some(&3u32.to_le_bytes()[..])
    })
}

/// Boots the anchor once from `dir` (which holds `vmlinuz`), with the
/// QEMU arguments `hull vm run` gave the VM described by `vm`.
pub fn boot(dir: &Path, busybox: &Path, vm: &VmState, append: &[String]) -> Result<AnchorBoot> {
    let initramfs_bytes = write_initramfs(busybox, &dir.join("initramfs.img"))?;
    for name in [qemu::CONSOLE_LOG, "qemu.pid", "qmp.sock"] {
        let _ = std::fs::remove_file(dir.join(name));
    }
    qemu::ensure_data_disk(dir, 256 << 20)?;
    let options = RunOptions {
        dir: dir.to_path_buf(),
        memory: vm.memory.clone(),
        cpus: vm.cpus,
        api_port: hull_tests::vm::free_port(),
        http_port: vm.http_port.map(|_| hull_tests::vm::free_port()),
        disk_size: 256 << 20,
        machine: vm.machine,
        ready_timeout: TIMEOUT,
        append: append.to_vec(),
        accel: hull_image::vm::accel::AccelChoice::Tcg,
        dhcp: false,
    };
    // The same accelerator as the VM it stands beside.
    let accel = if vm.accel == "kvm" {
        hull_image::vm::accel::Accel::Kvm
    } else {
        hull_image::vm::accel::Accel::Tcg
    };
    let args = qemu::qemu_args(&options, accel, &HostToken::generate()?, None);
    let log = std::fs::File::create(dir.join("qemu.log"))?;
    let started = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(&args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start qemu-system-x86_64")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the busybox anchor did not power off within {} s; console:\n{}",
                TIMEOUT.as_secs(),
                qemu::console_tail(dir, 30)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let qemu_ms = started.elapsed().as_secs_f64() * 1e3;
    let console =
        String::from_utf8_lossy(&std::fs::read(dir.join(qemu::CONSOLE_LOG))?).into_owned();
    let parsed = parse(&console).with_context(|| {
        format!(
            "the anchor's console has no stamped busybox-init lines (QEMU {status}):\n{}",
            qemu::console_tail(dir, 30)
        )
    })?;
    Ok(AnchorBoot {
        init_start: parsed.0,
        mounts_ms: parsed.1,
        initramfs_bytes,
        qemu_ms,
    })
}

/// The script's first line's kernel stamp and the time from it to the
/// cgroup2 mount's line, in ms.
fn parse(console: &str) -> Option<(f64, f64)> {
    let stamped = |what: &str| {
        console.lines().find_map(|line| {
            let at = line.find(&format!("busybox-init: {what}"))?;
            let stamp = line[..at].rsplit_once('[')?.1.split(']').next()?;
            stamp.trim().parse::<f64>().ok()
        })
    };
    let start = stamped("started as pid")?;
    let cgroup = stamped("mounted cgroup2")?;
    Some((start, (cgroup - start) * 1e3))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernels_stamps_give_the_mounts_time() {
        let console = "SeaBIOS\n\x1bc[    0.812345] busybox-init: started as pid 1\n[    0.815000] busybox-init: mounted proc at /proc\n[    0.832345] busybox-init: mounted cgroup2 at /sys/fs/cgroup\nbusybox-init: uptime 0.84 0.50\n";
        let (start, mounts) = parse(console).unwrap();
        assert!((start - 0.812345).abs() < 1e-9);
        assert!((mounts - 20.0).abs() < 1e-6);
        assert_eq!(parse("busybox-init: started as pid 1\n"), None);
    }

    #[test]
    fn the_script_makes_hull_inits_mounts() {
        for target in ["/proc", "/sys", "/dev", "/run", "/tmp", "/sys/fs/cgroup"] {
            assert!(SCRIPT.contains(&format!(" {target} && log")), "{target}");
        }
        assert!(SCRIPT.contains("nsdelegate"));
    }

    #[test]
    fn a_dynamic_elf_is_not_static() {
        assert!(!is_static_elf(&std::fs::read("/proc/self/exe").unwrap()));
        assert!(!is_static_elf(b"#!/bin/sh\n"));
    }
}
