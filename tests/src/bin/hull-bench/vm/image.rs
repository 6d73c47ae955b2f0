//! The VM image's size: the kernel, the initramfs as built and compressed
//! (zstd, on both CPUs), and what the initramfs holds, by part. The base
//! image in it is busybox's: the Debian base image is never in the VM
//! image, so nothing is taken out for it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde_json::json;

/// Where the initramfs's files come from, by path prefix (vm-image's
/// BINARIES, MODULES, IMAGE_DIR; the rest is the host's tools, the C
/// library and the shell).
const PARTS: &[(&str, &str)] = &[
    ("init", "hull's binaries"),
    ("usr/bin/hulld", "hull's binaries"),
    ("usr/bin/hull", "hull's binaries"),
    ("usr/lib/modules/", "kernel modules"),
    ("usr/share/hull/images/", "busybox base image"),
];
const OTHER: &str = "tools and libraries (mkfs.btrfs, mount, bash, libc, ...)";

pub struct ImageSize {
    pub vmlinuz: u64,
    pub initramfs: u64,
    pub compressed: u64,
    pub level: i32,
    pub compress_secs: f64,
    /// Bytes of file data in the initramfs by part.
    pub parts: BTreeMap<&'static str, u64>,
    /// hull-init, hulld and hull as the bench runs them, and stripped
    /// of every symbol (`strip`), when strip is installed.
    pub binaries: u64,
    pub binaries_stripped: Option<u64>,
}

impl ImageSize {
    /// What the host ships: the kernel and the compressed initramfs.
    pub fn shipped(&self) -> u64 {
        self.vmlinuz + self.compressed
    }

    pub fn to_json(&self) -> serde_json::Value {
        json!({
            "vmlinuz_bytes": self.vmlinuz,
            "initramfs_bytes": self.initramfs,
            "initramfs_zstd_bytes": self.compressed,
            "zstd_level": self.level,
            "compress_s": self.compress_secs,
            "vmlinuz_plus_initramfs_zstd_bytes": self.shipped(),
            "initramfs_parts_bytes": self.parts,
            "hull_binaries_bytes": self.binaries,
            "hull_binaries_stripped_bytes": self.binaries_stripped,
        })
    }
}

pub fn measure(image: &Path, binaries: &Path, level: i32) -> Result<ImageSize> {
    let vmlinuz = std::fs::metadata(image.join("vmlinuz"))?.len();
    let initramfs_path = image.join("initramfs.img");
    let data = std::fs::read(&initramfs_path)
        .with_context(|| format!("read {}", initramfs_path.display()))?;
    let parts = parts(&data)?;
    let started = Instant::now();
    let mut encoder = zstd::Encoder::new(Vec::new(), level)?;
    // Both CPUs; zstd's workers split the input, which costs a little ratio.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    encoder.multithread(u32::try_from(workers).unwrap_or(1))?;
    std::io::Write::write_all(&mut encoder, &data)?;
    let compressed = encoder.finish()?.len() as u64;
    let compress_secs = started.elapsed().as_secs_f64();
    let (binaries_size, stripped) = binaries_sizes(binaries)?;
    Ok(ImageSize {
        vmlinuz,
        initramfs: data.len() as u64,
        compressed,
        level,
        compress_secs,
        parts,
        binaries: binaries_size,
        binaries_stripped: stripped,
    })
}

/// The sizes of hull-init, hulld and hull in `dir`, as they are and
/// stripped (into a temporary directory; None without `strip`).
fn binaries_sizes(dir: &Path) -> Result<(u64, Option<u64>)> {
    let temp = tempfile::tempdir()?;
    let mut size = 0;
    let mut stripped = Some(0);
    for name in ["hull-init", "hulld", "hull"] {
        let path = dir.join(name);
        size += std::fs::metadata(&path)
            .with_context(|| format!("{}", path.display()))?
            .len();
        let out = temp.path().join(name);
        let ran = std::process::Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(&out)
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        stripped = match (stripped, ran) {
            (Some(sum), true) => Some(sum + std::fs::metadata(&out)?.len()),
            _ => None,
        };
    }
    Ok((size, stripped))
}

/// File data in a newc cpio archive by part (`PARTS`), symlinks and
/// directories left out.
fn parts(archive: &[u8]) -> Result<BTreeMap<&'static str, u64>> {
    let mut sums: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut at = 0usize;
    let align = |n: usize| n.div_ceil(4) * 4;
    loop {
        let Some(header) = archive.get(at..at + 110) else {
            bail!("the initramfs ends inside a cpio header at {at}");
        };
        if !header.starts_with(b"070701") {
            bail!("no newc cpio header at {at}");
        }
        let field = |index: usize| -> Result<usize> {
            let hex = std::str::from_utf8(&header[6 + index * 8..14 + index * 8])?;
            Ok(usize::from_str_radix(hex, 16)?)
        };
        let (mode, size, name_size) = (field(1)?, field(6)?, field(11)?);
        let name_end = at + 110 + name_size;
        let name = archive
            .get(at + 110..name_end.saturating_sub(1))
            .map(String::from_utf8_lossy)
            .context("a cpio name past the end")?;
        if name == "TRAILER!!!" {
            return Ok(sums);
        }
        let regular = mode & 0o170_000 == 0o100_000;
        if regular {
            let part = PARTS
                .iter()
                .find(|(prefix, _)| match prefix.strip_suffix('/') {
                    Some(_) => name.starts_with(prefix),
                    None => name == *prefix,
                })
                .map_or(OTHER, |(_, part)| part);
            *sums.entry(part).or_default() += size as u64;
        }
        at = align(align(name_end) + size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hull_image::vm::cpio::{EntryKind, Tree};

    #[test]
    fn an_archives_files_are_summed_by_part() {
        let mut tree = Tree::default();
        tree.insert("init", EntryKind::Bytes(vec![0; 10]), 0o755);
        tree.insert("usr/bin/hull", EntryKind::Bytes(vec![0; 5]), 0o755);
        tree.insert("usr/bin/sh", EntryKind::Symlink("busybox".into()), 0o777);
        tree.insert("usr/bin/busybox", EntryKind::Bytes(vec![0; 7]), 0o755);
        tree.insert(
            "usr/lib/modules/6.1/kernel/fs/btrfs.ko",
            EntryKind::Bytes(vec![0; 3]),
            0o644,
        );
        tree.insert(
            "usr/share/hull/images/busybox/rootfs/bin/busybox",
            EntryKind::Bytes(vec![0; 2]),
            0o755,
        );
        let mut archive = Vec::new();
        tree.write(&mut archive).unwrap();
        let sums = parts(&archive).unwrap();
        assert_eq!(sums["hull's binaries"], 15);
        assert_eq!(sums[OTHER], 7);
        assert_eq!(sums["kernel modules"], 3);
        assert_eq!(sums["busybox base image"], 2);
    }
}
