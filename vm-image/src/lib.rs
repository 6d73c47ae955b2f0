//! Base images for the inner container, built from Debian packages only.
//!
//! * `busybox`: busybox-static and a few files in /etc; builds in well under
//!   a second once the package is downloaded. Tests use it.
//! * `debian`: a debootstrap minbase of the host's Debian release; what users
//!   get by default.
//!
//! Images live in `<store>/<kind>/rootfs` and are built into a temporary
//! directory first and renamed into place, so a crash never leaves a half
//! image that looks complete.

use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Busybox,
    Debian,
}

impl ImageKind {
    pub fn name(self) -> &'static str {
        match self {
            ImageKind::Busybox => "busybox",
            ImageKind::Debian => "debian",
        }
    }
}

impl std::str::FromStr for ImageKind {
    type Err = ImageError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "busybox" => Ok(ImageKind::Busybox),
            "debian" => Ok(ImageKind::Debian),
            other => Err(ImageError::UnknownKind(other.to_string())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("unknown image kind {0:?}: expected busybox or debian")]
    UnknownKind(String),
    #[error("cannot create {path}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot run {program} (install it with: apt-get install {package})")]
    Spawn {
        program: String,
        package: String,
        source: io::Error,
    },
    #[error("{program} failed ({status}): {detail}")]
    Tool {
        program: String,
        status: String,
        detail: String,
    },
    #[error(
        "busybox-static is neither downloadable nor installed; run: apt-get install busybox-static"
    )]
    NoBusybox,
    #[error("cannot move the finished image into {path}")]
    Publish { path: PathBuf, source: io::Error },
}

type Result<T> = std::result::Result<T, ImageError>;

/// A directory of built images.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

const COMPLETE_MARK: &str = "complete";

impl ImageStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        ImageStore { root: root.into() }
    }

    /// The root filesystem of `kind`, whether or not it is built yet.
    pub fn rootfs(&self, kind: ImageKind) -> PathBuf {
        self.root.join(kind.name()).join("rootfs")
    }

    pub fn is_built(&self, kind: ImageKind) -> bool {
        self.root.join(kind.name()).join(COMPLETE_MARK).exists()
    }

    /// Builds `kind` unless it is already built (or `rebuild` asks for it),
    /// reporting progress lines to `progress`. Returns the rootfs path.
    pub fn ensure(
        &self,
        kind: ImageKind,
        rebuild: bool,
        progress: &mut dyn FnMut(&str),
    ) -> Result<PathBuf> {
        if self.is_built(kind) && !rebuild {
            return Ok(self.rootfs(kind));
        }
        let dir = self.root.join(kind.name());
        let staging = self
            .root
            .join(format!(".{}-building-{}", kind.name(), std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        create_dir(&staging)?;
        let staged_rootfs = staging.join("rootfs");
        create_dir(&staged_rootfs)?;
        let result = match kind {
            ImageKind::Busybox => build_busybox(&staged_rootfs, &self.root, progress),
            ImageKind::Debian => build_debian(&staged_rootfs, progress),
        };
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&staging);
            return Err(e);
        }
        fs::write(staging.join(COMPLETE_MARK), kind.name()).map_err(|source| {
            ImageError::Create {
                path: staging.join(COMPLETE_MARK),
                source,
            }
        })?;
        if dir.exists() {
            let old = self
                .root
                .join(format!(".{}-old-{}", kind.name(), std::process::id()));
            fs::rename(&dir, &old).map_err(|source| ImageError::Publish {
                path: dir.clone(),
                source,
            })?;
            let _ = fs::remove_dir_all(&old);
        }
        fs::rename(&staging, &dir).map_err(|source| ImageError::Publish {
            path: dir.clone(),
            source,
        })?;
        progress(&format!("image {} ready at {}", kind.name(), dir.display()));
        Ok(self.rootfs(kind))
    }
}

fn create_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(|source| ImageError::Create {
        path: path.to_path_buf(),
        source,
    })
}

fn run_tool(cmd: &mut Command, program: &str, package: &str) -> Result<String> {
    let output = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| ImageError::Spawn {
            program: program.to_string(),
            package: package.to_string(),
            source,
        })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let detail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(ImageError::Tool {
            program: program.to_string(),
            status: output.status.to_string(),
            detail: detail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// A static busybox from Debian's busybox-static package: downloaded into
/// the store's cache with apt, or the host's copy when the package is installed.
fn fetch_busybox(store: &Path, progress: &mut dyn FnMut(&str)) -> Result<PathBuf> {
    let cache = store.join("cache");
    create_dir(&cache)?;
    let extracted = cache.join("busybox-static/bin/busybox");
    if extracted.exists() {
        return Ok(extracted);
    }
    progress("downloading busybox-static with apt-get download");
    let download = run_tool(
        Command::new("apt-get")
            .args(["download", "-q", "busybox-static"])
            .current_dir(&cache),
        "apt-get",
        "apt",
    );
    if download.is_ok() {
        if let Some(deb) = fs::read_dir(&cache).ok().and_then(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .find(|p| p.extension().is_some_and(|x| x == "deb"))
        }) {
            let target = cache.join("busybox-static");
            run_tool(
                Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&target),
                "dpkg-deb",
                "dpkg",
            )?;
            let _ = fs::remove_file(&deb);
            if extracted.exists() {
                return Ok(extracted);
            }
        }
    }
    let host = PathBuf::from("/bin/busybox");
    if host.exists() {
        progress("using the host's /bin/busybox");
        return Ok(host);
    }
    Err(ImageError::NoBusybox)
}

const BUSYBOX_DIRS: [&str; 14] = [
    "bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "run",
    "home", "var/tmp", "var/log",
];

fn build_busybox(rootfs: &Path, store: &Path, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let busybox = fetch_busybox(store, progress)?;
    for dir in BUSYBOX_DIRS {
        create_dir(&rootfs.join(dir))?;
    }
    let target = rootfs.join("bin/busybox");
    fs::copy(&busybox, &target).map_err(|source| ImageError::Create {
        path: target.clone(),
        source,
    })?;
    let applets = run_tool(
        Command::new(&busybox).arg("--list-full"),
        "busybox",
        "busybox-static",
    )?;
    for applet in applets.lines().map(str::trim).filter(|a| !a.is_empty()) {
        let link = rootfs.join(applet);
        if link.exists() || link.symlink_metadata().is_ok() {
            continue;
        }
        if let Some(parent) = link.parent() {
            create_dir(parent)?;
        }
        symlink("/bin/busybox", &link).map_err(|source| ImageError::Create {
            path: link.clone(),
            source,
        })?;
    }
    let files: [(&str, &str); 5] = [
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"),
        ("etc/group", "root:x:0:\ntty:x:5:\nnogroup:x:65534:\n"),
        ("etc/hostname", "hull\n"),
        ("etc/profile", "export PS1='\\u@\\h:\\w\\$ '\nexport PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n"),
        ("etc/os-release", "NAME=\"hull busybox\"\nID=hull-busybox\n"),
    ];
    for (rel, text) in files {
        let path = rootfs.join(rel);
        fs::write(&path, text).map_err(|source| ImageError::Create { path, source })?;
    }
    progress(&format!(
        "busybox image: {} applets",
        applets.lines().count()
    ));
    Ok(())
}

/// The Debian release of the host, so debootstrap needs no extra keyring.
fn host_release() -> String {
    fs::read_to_string("/etc/os-release")
        .ok()
        .and_then(|t| {
            t.lines()
                .find_map(|l| l.strip_prefix("VERSION_CODENAME=").map(str::to_string))
        })
        .unwrap_or_else(|| "bookworm".to_string())
}

fn build_debian(rootfs: &Path, progress: &mut dyn FnMut(&str)) -> Result<()> {
    let release = host_release();
    progress(&format!(
        "debootstrap --variant=minbase {release} (a few minutes; progress follows)"
    ));
    let mut child = Command::new("debootstrap")
        .args([
            "--variant=minbase",
            "--include=bash,procps,iproute2,ca-certificates",
        ])
        .arg(&release)
        .arg(rootfs)
        .arg("http://deb.debian.org/debian")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|source| ImageError::Spawn {
            program: "debootstrap".into(),
            package: "debootstrap".into(),
            source,
        })?;
    let mut last = Vec::new();
    if let Some(out) = child.stdout.take() {
        use std::io::BufRead;
        for line in io::BufReader::new(out).lines().map_while(|l| l.ok()) {
            // One line per package is noise; the phases are progress.
            let per_package = [
                "I: Retrieving",
                "I: Extracting",
                "I: Validating",
                "I: Unpacking ",
                "I: Configuring ",
            ];
            let phase = line.ends_with("system...") || line.ends_with("packages...");
            if per_package.iter().any(|p| line.starts_with(p)) && !phase {
                continue;
            }
            progress(&line);
            last.push(line);
            if last.len() > 5 {
                last.remove(0);
            }
        }
    }
    let status = child.wait().map_err(|source| ImageError::Spawn {
        program: "debootstrap".into(),
        package: "debootstrap".into(),
        source,
    })?;
    if !status.success() {
        return Err(ImageError::Tool {
            program: "debootstrap".into(),
            status: status.to_string(),
            detail: last.join(" | "),
        });
    }
    fs::write(rootfs.join("etc/hostname"), "hull\n").map_err(|source| ImageError::Create {
        path: rootfs.join("etc/hostname"),
        source,
    })?;
    Ok(())
}
pub mod vm;
