//! The hull VM image: Debian's cloud kernel, and an initramfs holding
//! hull-init as /init, hulld, the `hull` client, the tools hulld runs
//! (mkfs.btrfs, mount, ldd), the C library they link, the kernel modules
//! hull needs and the busybox base image for the inner; then booting it
//! under QEMU ([`qemu`]). hull's binaries go in stripped of their symbols
//! (with binutils' strip, when installed): the initramfs becomes a tmpfs
//! root in the guest's memory.
//!
//! A build is keyed by the SHA-256 of its inputs (hull's binaries, the
//! kernel package's version, the tools and the base image): the same
//! inputs give the same bytes, and a rebuild with them reuses the cached
//! result.

pub mod accel;
pub mod cpio;
pub mod kmod;
pub mod qemu;

use std::collections::BTreeMap;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{ImageKind, ImageStore};
use cpio::{EntryKind, Tree};

/// The Debian package whose dependency is the kernel.
pub const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
/// Modules hull needs at boot (those built into the kernel are skipped):
/// the virtio transports and devices, loop and btrfs for hulld's volume,
/// overlay for the inner's root, and the sock_diag dumps hulld finds the
/// inner's listening ports with.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_mmio",
    "virtio_net",
    "virtio_blk",
    "loop",
    "btrfs",
    "overlay",
    "inet_diag",
    "tcp_diag",
    // The guest's hardware RNG (QEMU's virtio-rng): its pool is ready as
    // the driver loads.
    "virtio_rng",
    // hulld's API on vsock, when the VM has a vsock device.
    "vmw_vsock_virtio_transport",
];
/// hull's binaries, by file name in the binaries' directory, and where
/// the image puts them.
const BINARIES: &[(&str, &str)] = &[
    ("hull-init", "init"),
    ("hulld", "usr/bin/hulld"),
    ("hull", "usr/bin/hull"),
];
/// Host tools hulld runs (mkfs.btrfs and mount for its volume, ldd to
/// hand the inner the client); bash runs ldd.
const TOOLS: &[&str] = &["mkfs.btrfs", "mount", "umount", "ldd", "bash"];
/// Where the base images go in the VM (hull-init's config names it).
const IMAGE_DIR: &str = "usr/share/hull/images";
/// Bumped when the layout of the image changes, so old cache entries are
/// not taken for new ones.
const FORMAT: &str = "hull-vm-image 3";

#[derive(Debug, thiserror::Error)]
pub enum VmBuildError {
    #[error("cannot create {path}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is missing: build hull's binaries first (cargo build --workspace --bins)")]
    MissingBinary { path: PathBuf },
    #[error("cannot run {program} (install it with: apt-get install {package})")]
    Spawn {
        program: String,
        package: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("apt knows no {KERNEL_META_PACKAGE} with a kernel dependency (apt-get update?)")]
    NoKernelPackage,
    #[error("the kernel package {package} has no {what}")]
    KernelContents { package: String, what: String },
    #[error("{tool} is not installed on this host (needed in the VM)")]
    MissingTool { tool: String },
    #[error("cannot select the kernel modules")]
    Modules(#[source] kmod::KmodError),
    #[error("cannot build the busybox base image")]
    Image(#[source] crate::ImageError),
    #[error("{path} has a kind of file the image cannot hold")]
    UnsupportedFile { path: PathBuf },
    #[error("cannot write the initramfs {path}")]
    Initramfs {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot publish the build into {path}")]
    Publish {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

type Result<T> = std::result::Result<T, VmBuildError>;

/// What a build takes.
#[derive(Debug, Clone)]
pub struct BuildSpec {
    /// Where `vmlinuz`, `initramfs.img` and `manifest.json` go.
    pub out: PathBuf,
    /// Downloads, the extracted kernel, the base image and finished builds.
    pub cache: PathBuf,
    /// The directory holding hull-init, hulld and hull.
    pub binaries: PathBuf,
}

/// `manifest.json`: what went into a build, with hashes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// SHA-256 of the inputs: the cache key.
    pub key: String,
    pub kernel: KernelInfo,
    /// hull's binaries by name, with their SHA-256.
    pub binaries: BTreeMap<String, String>,
    /// The host tools copied in, by path in the VM, with their SHA-256.
    pub tools: BTreeMap<String, String>,
    pub image: ImageInfo,
    /// The modules in the initramfs, relative to /lib/modules/RELEASE.
    pub modules: Vec<String>,
    pub initramfs: FileInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelInfo {
    pub package: String,
    pub version: String,
    pub release: String,
    pub vmlinuz: FileInfo,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    pub kind: String,
    /// SHA-256 over the image's tree (paths, modes, contents, links).
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileInfo {
    pub sha256: String,
    pub bytes: u64,
}

/// The result of [`build`].
#[derive(Debug, Clone)]
pub struct Built {
    pub out: PathBuf,
    pub manifest: Manifest,
    /// The cache already had this build.
    pub reused: bool,
}

/// Builds the VM image into `spec.out`, or reuses the cached build of the
/// same inputs.
pub fn build(spec: &BuildSpec, progress: &mut dyn FnMut(&str)) -> Result<Built> {
    let started = Instant::now();
    create_dir(&spec.cache)?;
    let mut binaries = BTreeMap::new();
    for (name, _) in BINARIES {
        let path = spec.binaries.join(name);
        if !path.is_file() {
            return Err(VmBuildError::MissingBinary { path });
        }
        binaries.insert((*name).to_owned(), sha256_file(&path)?);
    }
    let kernel = ensure_kernel(&spec.cache, progress)?;
    let store = ImageStore::new(spec.cache.join("images"));
    store
        .ensure(ImageKind::Busybox, false, &mut |line| {
            progress(&format!("image: {line}"))
        })
        .map_err(VmBuildError::Image)?;
    let image_dir = spec.cache.join("images").join(ImageKind::Busybox.name());
    let image_sha = tree_sha256(&image_dir)?;
    let mut tools = BTreeMap::new();
    for tool in TOOLS {
        let path = find_tool(tool)?;
        tools.insert(in_image(&path), (path.clone(), sha256_file(&path)?));
    }

    let mut key = Sha256::new();
    key.update(FORMAT.as_bytes());
    for (name, sha) in &binaries {
        key.update(format!("\nbinary {name} {sha}"));
    }
    key.update(format!("\nkernel {} {}", kernel.package, kernel.version));
    key.update(format!("\nimage busybox {image_sha}"));
    for (path, (_, sha)) in &tools {
        key.update(format!("\ntool {path} {sha}"));
    }
    key.update(format!("\nmodules {}", MODULES.join(",")));
    key.update(format!("\nstrip {}", strip_available()));
    let key = hex(&key.finalize());

    let cached = spec.cache.join("builds").join(&key);
    let reused = cached.join("manifest.json").is_file();
    if reused {
        progress(&format!("reusing the cached build {}", &key[..12]));
    } else {
        let staging =
            spec.cache
                .join("builds")
                .join(format!(".{}-{}", &key[..12], std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        create_dir(&staging)?;
        let result = assemble(
            &staging,
            &key,
            &kernel,
            &spec.binaries,
            &binaries,
            &tools,
            &image_dir,
            &image_sha,
            progress,
        );
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        fs::rename(&staging, &cached).map_err(|source| VmBuildError::Publish {
            path: cached.clone(),
            source,
        })?;
        // Each build is over 100 MiB: only the newest is kept.
        prune_builds(&spec.cache.join("builds"), &key);
    }
    let manifest_path = cached.join("manifest.json");
    let manifest: Manifest =
        serde_json::from_slice(&read(&manifest_path)?).map_err(|e| VmBuildError::Read {
            path: manifest_path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })?;
    publish(&cached, &spec.out)?;
    progress(&format!(
        "VM image {} in {} ({:.1} s)",
        &key[..12],
        spec.out.display(),
        started.elapsed().as_secs_f64()
    ));
    Ok(Built {
        out: spec.out.clone(),
        manifest,
        reused,
    })
}

/// Removes every finished build in `builds` but `keep`.
fn prune_builds(builds: &Path, keep: &str) {
    let Ok(entries) = fs::read_dir(builds) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if name != keep && !name.to_string_lossy().starts_with('.') {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// An extracted kernel package.
#[derive(Debug, Clone)]
struct Kernel {
    package: String,
    version: String,
    release: String,
    /// The package's extracted tree (boot/, lib/modules/).
    root: PathBuf,
}

/// The kernel package apt's candidate names, downloaded and extracted
/// into the cache once per version.
fn ensure_kernel(cache: &Path, progress: &mut dyn FnMut(&str)) -> Result<Kernel> {
    let show = run_tool(
        Command::new("apt-cache").args(["show", "--no-all-versions", KERNEL_META_PACKAGE]),
        "apt",
    )?;
    let (package, version) = kernel_dependency(&show).ok_or(VmBuildError::NoKernelPackage)?;
    let release = package
        .strip_prefix("linux-image-")
        .unwrap_or(&package)
        .to_owned();
    let dir = cache.join("kernel").join(format!("{package}_{version}"));
    let root = dir.join("root");
    let kernel = Kernel {
        package,
        version,
        release,
        root,
    };
    if dir.join("complete").exists() {
        progress(&format!(
            "kernel: {} {} (cached)",
            kernel.package, kernel.version
        ));
        return Ok(kernel);
    }
    progress(&format!(
        "kernel: downloading {} {}",
        kernel.package, kernel.version
    ));
    let staging = cache
        .join("kernel")
        .join(format!(".download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&staging);
    create_dir(&staging)?;
    run_tool(
        Command::new("apt-get")
            .args(["download", "-q"])
            .arg(format!("{}={}", kernel.package, kernel.version))
            .current_dir(&staging),
        "apt",
    )?;
    let deb = fs::read_dir(&staging)
        .map_err(|source| VmBuildError::Read {
            path: staging.clone(),
            source,
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .ok_or_else(|| VmBuildError::KernelContents {
            package: kernel.package.clone(),
            what: "downloaded .deb".into(),
        })?;
    let extracted = staging.join("root");
    run_tool(
        Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted),
        "dpkg",
    )?;
    let _ = fs::remove_file(&deb);
    fs::write(staging.join("complete"), &kernel.version).map_err(|source| VmBuildError::Write {
        path: staging.join("complete"),
        source,
    })?;
    let _ = fs::remove_dir_all(&dir);
    fs::rename(&staging, &dir).map_err(|source| VmBuildError::Publish {
        path: dir.clone(),
        source,
    })?;
    progress(&format!("kernel: extracted into {}", dir.display()));
    Ok(kernel)
}

/// The kernel package (name, version) in `apt-cache show` of the
/// meta-package: its first dependency, pinned to one version.
fn kernel_dependency(show: &str) -> Option<(String, String)> {
    let depends = show
        .lines()
        .find_map(|line| line.strip_prefix("Depends:"))?;
    let first = depends.split(',').next()?.trim();
    let (name, rest) = first.split_once(' ')?;
    let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
    name.starts_with("linux-image-")
        .then(|| (name.to_owned(), version.to_owned()))
}

#[allow(clippy::too_many_arguments)]
fn assemble(
    staging: &Path,
    key: &str,
    kernel: &Kernel,
    binaries_dir: &Path,
    binaries: &BTreeMap<String, String>,
    tools: &BTreeMap<String, (PathBuf, String)>,
    image_dir: &Path,
    image_sha: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<()> {
    let vmlinuz_source = kernel
        .root
        .join("boot")
        .join(format!("vmlinuz-{}", kernel.release));
    if !vmlinuz_source.is_file() {
        return Err(VmBuildError::KernelContents {
            package: kernel.package.clone(),
            what: format!("boot/vmlinuz-{}", kernel.release),
        });
    }
    let vmlinuz = staging.join("vmlinuz");
    fs::copy(&vmlinuz_source, &vmlinuz).map_err(|source| VmBuildError::Write {
        path: vmlinuz.clone(),
        source,
    })?;

    let mut tree = Tree::default();
    // Merged /usr, as Debian has it: libraries ldd names under /lib and
    // tools under /sbin land in /usr.
    for (link, target) in [
        ("bin", "usr/bin"),
        ("sbin", "usr/sbin"),
        ("lib", "usr/lib"),
        ("lib64", "usr/lib64"),
    ] {
        tree.insert(link, EntryKind::Symlink(target.into()), 0o777);
    }
    for dir in [
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "etc",
        "var/lib/hull",
        "root",
    ] {
        tree.insert(dir, EntryKind::Dir, 0o755);
    }
    // The kernel opens it as init's stdin, stdout and stderr before
    // anything is mounted.
    tree.insert(
        "dev/console",
        EntryKind::CharDevice { major: 5, minor: 1 },
        0o600,
    );
    let mut elves = Vec::new();
    let stripped = staging.join("stripped");
    create_dir(&stripped)?;
    let mut saved = 0;
    for (name, at) in BINARIES {
        let path = binaries_dir.join(name);
        let (file, less) = strip_copy(&path, &stripped.join(name))?;
        saved += less;
        tree.insert(at, EntryKind::File(file), 0o755);
        elves.push(path);
    }
    if strip_available() {
        progress(&format!(
            "hull's binaries stripped of their symbols: {:.1} MiB less",
            saved as f64 / f64::from(1u32 << 20)
        ));
    } else {
        progress("strip is not installed (apt-get install binutils): hull's binaries go in with their symbols");
    }
    for (at, (path, _)) in tools {
        tree.insert(at, EntryKind::File(path.clone()), 0o755);
        if *at != "usr/bin/ldd" {
            elves.push(path.clone());
        }
    }
    for library in libraries(&elves)? {
        tree.insert(&in_image(&library), EntryKind::File(library.clone()), 0o755);
    }
    // A shell for hulld's helpers and for debugging, from the base image.
    let busybox = image_dir.join("rootfs/bin/busybox");
    tree.insert("usr/bin/busybox", EntryKind::File(busybox), 0o755);
    tree.insert("usr/bin/sh", EntryKind::Symlink("busybox".into()), 0o777);
    add_host_tree(&mut tree, image_dir, &format!("{IMAGE_DIR}/busybox"))?;
    // hull-init copies the image to the data disk when this differs from
    // the copy's.
    tree.insert(
        &format!("{IMAGE_DIR}/busybox.sha256"),
        EntryKind::Bytes(format!("{image_sha}\n").into_bytes()),
        0o644,
    );

    let release_dir = kernel.root.join("lib/modules").join(&kernel.release);
    let selected = kmod::select(&release_dir, MODULES).map_err(VmBuildError::Modules)?;
    let modules_dir = format!("usr/lib/modules/{}", kernel.release);
    for module in selected.keys() {
        tree.insert(
            &format!("{modules_dir}/{module}"),
            EntryKind::File(release_dir.join(module)),
            0o644,
        );
    }
    tree.insert(
        &format!("{modules_dir}/modules.dep"),
        EntryKind::Bytes(kmod::modules_dep(&selected).into_bytes()),
        0o644,
    );
    progress(&format!(
        "modules: {} ({})",
        selected.len(),
        selected
            .keys()
            .map(|m| kmod::module_name(m.rsplit('/').next().unwrap_or(m)))
            .collect::<Vec<_>>()
            .join(" ")
    ));

    let started = Instant::now();
    let initramfs = staging.join("initramfs.img");
    let write_error = |source| VmBuildError::Initramfs {
        path: initramfs.clone(),
        source,
    };
    let file = fs::File::create(&initramfs).map_err(write_error)?;
    let mut out = io::BufWriter::with_capacity(1 << 20, file);
    let bytes = tree.write(&mut out).map_err(write_error)?;
    out.flush().map_err(write_error)?;
    let _ = fs::remove_dir_all(&stripped);
    progress(&format!(
        "initramfs: {} entries, {:.1} MiB ({:.1} s)",
        tree.len(),
        bytes as f64 / f64::from(1u32 << 20),
        started.elapsed().as_secs_f64()
    ));

    let manifest = Manifest {
        key: key.to_owned(),
        kernel: KernelInfo {
            package: kernel.package.clone(),
            version: kernel.version.clone(),
            release: kernel.release.clone(),
            vmlinuz: file_info(&vmlinuz)?,
        },
        binaries: binaries.clone(),
        tools: tools
            .iter()
            .map(|(at, (_, sha))| (format!("/{at}"), sha.clone()))
            .collect(),
        image: ImageInfo {
            kind: ImageKind::Busybox.name().into(),
            sha256: image_sha.to_owned(),
        },
        modules: selected.keys().cloned().collect(),
        initramfs: file_info(&initramfs)?,
    };
    let path = staging.join("manifest.json");
    let mut text = serde_json::to_string_pretty(&manifest).unwrap_or_default();
    text.push('\n');
    fs::write(&path, text).map_err(|source| VmBuildError::Write { path, source })
}

/// Whether binutils' `strip` runs here.
fn strip_available() -> bool {
    Command::new("strip")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `binary` stripped of its symbols and debug information into `out`, and
/// the bytes that saved; `binary` itself where there is no strip. The
/// initramfs becomes a tmpfs root held in the guest's memory, and a
/// backtrace in the VM loses only function names (a panic still gives
/// its file and line); the host's binaries keep theirs.
fn strip_copy(binary: &Path, out: &Path) -> Result<(PathBuf, u64)> {
    if !strip_available() {
        return Ok((binary.to_path_buf(), 0));
    }
    run_tool(
        Command::new("strip")
            .arg("--strip-all")
            .arg("-o")
            .arg(out)
            .arg(binary),
        "binutils",
    )?;
    let size = |path: &Path| {
        fs::metadata(path)
            .map(|m| m.len())
            .map_err(|source| VmBuildError::Read {
                path: path.to_path_buf(),
                source,
            })
    };
    Ok((out.to_path_buf(), size(binary)?.saturating_sub(size(out)?)))
}

/// Puts the cached build's files in `out` (hard links where the cache is
/// on the same filesystem), replacing an older build there.
fn publish(cached: &Path, out: &Path) -> Result<()> {
    create_dir(out)?;
    for name in ["vmlinuz", "initramfs.img", "manifest.json"] {
        let from = cached.join(name);
        let to = out.join(name);
        let partial = out.join(format!(".{name}.partial"));
        let _ = fs::remove_file(&partial);
        let error = |source| VmBuildError::Publish {
            path: to.clone(),
            source,
        };
        if fs::hard_link(&from, &partial).is_err() {
            fs::copy(&from, &partial).map_err(error)?;
        }
        fs::rename(&partial, &to).map_err(error)?;
    }
    Ok(())
}

/// A path on the host as the image holds it: relative, under merged /usr.
fn in_image(path: &Path) -> String {
    let text = path.to_string_lossy();
    let text = text.trim_start_matches('/');
    for (top, usr) in [
        ("bin/", "usr/bin/"),
        ("sbin/", "usr/sbin/"),
        ("lib/", "usr/lib/"),
        ("lib64/", "usr/lib64/"),
    ] {
        if let Some(rest) = text.strip_prefix(top) {
            return format!("{usr}{rest}");
        }
    }
    text.to_owned()
}

fn find_tool(tool: &str) -> Result<PathBuf> {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin"] {
        let path = Path::new(dir).join(tool);
        if path.is_file() {
            return fs::canonicalize(&path).map_err(|source| VmBuildError::Read { path, source });
        }
    }
    Err(VmBuildError::MissingTool {
        tool: tool.to_owned(),
    })
}

/// The shared libraries and the ELF interpreter `elves` load, as ldd
/// names them.
fn libraries(elves: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut found = std::collections::BTreeSet::new();
    for elf in elves {
        let output =
            Command::new("ldd")
                .arg(elf)
                .output()
                .map_err(|source| VmBuildError::Spawn {
                    program: "ldd".into(),
                    package: "libc-bin",
                    source,
                })?;
        // ldd exits 1 for a static binary (busybox): nothing to add.
        found.extend(parse_ldd(&String::from_utf8_lossy(&output.stdout)));
    }
    Ok(found.into_iter().collect())
}

fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once("=>") {
                Some((_, rest)) => rest.trim(),
                None => line,
            };
            let path = path.split(" (").next()?.trim();
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

/// Adds the tree at `host` under `at`, as it is (modes, symlinks).
fn add_host_tree(tree: &mut Tree, host: &Path, at: &str) -> Result<()> {
    for (relative, meta, path) in walk(host)? {
        let target = if relative.is_empty() {
            at.to_owned()
        } else {
            format!("{at}/{relative}")
        };
        let mode = meta.permissions().mode() & 0o7777;
        let kind = if meta.file_type().is_symlink() {
            let link = fs::read_link(&path).map_err(|source| VmBuildError::Read {
                path: path.clone(),
                source,
            })?;
            EntryKind::Symlink(link.to_string_lossy().into_owned())
        } else if meta.is_dir() {
            EntryKind::Dir
        } else if meta.is_file() {
            EntryKind::File(path)
        } else {
            return Err(VmBuildError::UnsupportedFile { path });
        };
        tree.insert(&target, kind, mode);
    }
    Ok(())
}

/// Every entry under `root` (itself first, as ""), sorted by path.
fn walk(root: &Path) -> Result<Vec<(String, fs::Metadata, PathBuf)>> {
    let mut out = Vec::new();
    let mut stack = vec![(String::new(), root.to_path_buf())];
    while let Some((relative, path)) = stack.pop() {
        let meta = fs::symlink_metadata(&path).map_err(|source| VmBuildError::Read {
            path: path.clone(),
            source,
        })?;
        if meta.is_dir() {
            let entries = fs::read_dir(&path).map_err(|source| VmBuildError::Read {
                path: path.clone(),
                source,
            })?;
            for entry in entries {
                let entry = entry.map_err(|source| VmBuildError::Read {
                    path: path.clone(),
                    source,
                })?;
                let name = entry.file_name().to_string_lossy().into_owned();
                let child = if relative.is_empty() {
                    name
                } else {
                    format!("{relative}/{name}")
                };
                stack.push((child, entry.path()));
            }
        }
        out.push((relative, meta, path));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(out)
}

/// SHA-256 of a tree: each entry's path, type, mode and contents or
/// link target, in path order. Times and owners are left out: the
/// image does not keep them either.
fn tree_sha256(root: &Path) -> Result<String> {
    let mut hash = Sha256::new();
    for (relative, meta, path) in walk(root)? {
        hash.update(format!("{relative}\0{:o}\0", meta.mode()));
        if meta.file_type().is_symlink() {
            let link = fs::read_link(&path).map_err(|source| VmBuildError::Read {
                path: path.clone(),
                source,
            })?;
            hash.update(link.to_string_lossy().as_bytes());
        } else if meta.is_file() {
            hash.update(sha256_file(&path)?);
        }
        hash.update(b"\n");
    }
    Ok(hex(&hash.finalize()))
}

fn sha256_file(path: &Path) -> Result<String> {
    let error = |source| VmBuildError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut file = fs::File::open(path).map_err(error)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(error)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    Ok(hex(&hash.finalize()))
}

fn file_info(path: &Path) -> Result<FileInfo> {
    let bytes = fs::metadata(path)
        .map_err(|source| VmBuildError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .len();
    Ok(FileInfo {
        sha256: sha256_file(path)?,
        bytes,
    })
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read(path: &Path) -> Result<Vec<u8>> {
    fs::read(path).map_err(|source| VmBuildError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| VmBuildError::Create {
        path: path.to_path_buf(),
        source,
    })
}

fn run_tool(command: &mut Command, package: &'static str) -> Result<String> {
    let rendered = format!("{command:?}").replace('"', "");
    let output = command.output().map_err(|source| VmBuildError::Spawn {
        program: command.get_program().to_string_lossy().into_owned(),
        package,
        source,
    })?;
    if !output.status.success() {
        return Err(VmBuildError::Tool {
            command: rendered,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_package_is_the_meta_packages_pinned_dependency() {
        let show = "Package: linux-image-cloud-amd64\nVersion: 6.1.192-3\nDepends: linux-image-6.1.0-57-cloud-amd64 (= 6.1.192-3)\n";
        assert_eq!(
            kernel_dependency(show),
            Some((
                "linux-image-6.1.0-57-cloud-amd64".into(),
                "6.1.192-3".into()
            ))
        );
        assert_eq!(kernel_dependency("Depends: libc6 (>= 2)\n"), None);
        assert_eq!(kernel_dependency("Package: x\n"), None);
    }

    #[test]
    fn ldd_output_gives_libraries_and_the_interpreter() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        assert_eq!(
            parse_ldd(text),
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2")
            ]
        );
        assert!(parse_ldd("\tnot a dynamic executable\n").is_empty());
    }

    #[test]
    fn host_paths_land_under_merged_usr() {
        assert_eq!(
            in_image(Path::new("/lib64/ld-linux-x86-64.so.2")),
            "usr/lib64/ld-linux-x86-64.so.2"
        );
        assert_eq!(
            in_image(Path::new("/sbin/mkfs.btrfs")),
            "usr/sbin/mkfs.btrfs"
        );
        assert_eq!(in_image(Path::new("/usr/bin/mount")), "usr/bin/mount");
        assert_eq!(in_image(Path::new("/libexec/x")), "libexec/x");
    }

    #[test]
    fn a_tree_hash_sees_contents_modes_and_links() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "one").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        let first = tree_sha256(dir.path()).unwrap();
        assert_eq!(first, tree_sha256(dir.path()).unwrap());
        fs::write(dir.path().join("f"), "two").unwrap();
        let second = tree_sha256(dir.path()).unwrap();
        assert_ne!(first, second);
        fs::set_permissions(dir.path().join("f"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(second, tree_sha256(dir.path()).unwrap());
    }
}
