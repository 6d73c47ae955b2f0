//! Which accelerator QEMU boots with: KVM only when the image's kernel is
//! seen to boot under it here, TCG (software emulation) otherwise.
//!
//! /dev/kvm can exist on a host whose KVM guests hang (nested
//! virtualisation without the CPU's help: a guest of a few instructions
//! runs, the kernel hangs before its first line), and a boot that hangs is
//! worse than a slow one. So the probe boots the kernel itself under KVM,
//! without an initramfs and with `panic=-1`: it panics for want of a root
//! and QEMU exits, within a second where KVM works. A QEMU that has not
//! exited within `PROBE_TIMEOUT` is killed and KVM is not used. The
//! verdict is kept until the host reboots (under /run), per kernel and
//! QEMU binary.

use std::io;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// `--accel`: a choice, or a probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

impl std::str::FromStr for AccelChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(AccelChoice::Auto),
            "kvm" => Ok(AccelChoice::Kvm),
            "tcg" => Ok(AccelChoice::Tcg),
            other => Err(format!("{other:?}: expected auto, kvm or tcg")),
        }
    }
}

/// What was picked, and why, for the output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Picked {
    pub accel: Accel,
    pub note: String,
}

/// How long the probe kernel has to panic and QEMU to exit: well under a
/// second under KVM, a few seconds under TCG.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(8);
/// Where verdicts are kept until the host reboots.
const VERDICTS: &str = "/run/hull/accel-probe";

/// Whether `kernel` boots under `accel` here, as far as its panic for
/// want of a root: the console goes to a file in `scratch`.
pub fn kernel_boots(qemu: &str, accel: Accel, kernel: &Path, scratch: &Path) -> io::Result<bool> {
    let console = scratch.join("accel-probe.log");
    let mut child = Command::new(qemu)
        .args([
            "-accel",
            accel.name(),
            "-M",
            "pc",
            "-m",
            "256M",
            "-nodefaults",
        ])
        .args(["-display", "none", "-no-reboot", "-kernel"])
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1 quiet", "-serial"])
        .arg(format!("file:{}", console.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let deadline = Instant::now() + PROBE_TIMEOUT;
    let exited = loop {
        if let Some(status) = child.try_wait()? {
            break status.success();
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break false;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read(&console).unwrap_or_default();
    let _ = std::fs::remove_file(&console);
    Ok(exited && String::from_utf8_lossy(&text).contains("Kernel panic"))
}

/// The name of the verdict for this kernel and QEMU: their sizes and
/// modification times, which a new kernel or QEMU changes.
fn verdict_name(qemu: &str, kernel: &Path) -> String {
    let stamp = |path: &Path| {
        std::fs::metadata(path)
            .map(|m| {
                use std::os::unix::fs::MetadataExt;
                format!("{}-{}", m.len(), m.mtime())
            })
            .unwrap_or_default()
    };
    let qemu_path = std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(qemu))
                .find(|p| p.is_file())
        })
        .unwrap_or_default();
    format!("kvm-{}-{}", stamp(kernel), stamp(&qemu_path))
}

/// The accelerator for `choice`: `Auto` takes KVM when /dev/kvm exists and
/// `kernel` boots under it.
pub fn pick(qemu: &str, choice: AccelChoice, kernel: &Path, scratch: &Path) -> Picked {
    let tcg = |note: String| Picked {
        accel: Accel::Tcg,
        note,
    };
    match choice {
        AccelChoice::Tcg => return tcg("TCG (software emulation), as asked".into()),
        AccelChoice::Kvm => {
            return Picked {
                accel: Accel::Kvm,
                note: "KVM, as asked".into(),
            }
        }
        AccelChoice::Auto if !Path::new("/dev/kvm").exists() => {
            return tcg("TCG (software emulation): there is no /dev/kvm".into())
        }
        AccelChoice::Auto => {}
    }
    let verdict = Path::new(VERDICTS).join(verdict_name(qemu, kernel));
    let (works, probed) = match std::fs::read_to_string(&verdict).as_deref() {
        Ok("works") => (Ok(true), false),
        Ok("hangs") => (Ok(false), false),
        _ => (kernel_boots(qemu, Accel::Kvm, kernel, scratch), true),
    };
    if let (Ok(works), true) = (&works, probed) {
        let _ = std::fs::create_dir_all(VERDICTS);
        let _ = std::fs::write(&verdict, if *works { "works" } else { "hangs" });
    }
    match works {
        Ok(true) => Picked {
            accel: Accel::Kvm,
            note: "KVM: the kernel boots under it here".into(),
        },
        Ok(false) => tcg(format!(
            "TCG (software emulation): /dev/kvm exists, but the kernel did not boot under KVM within {} s here (KVM guests hang on this host; {})",
            PROBE_TIMEOUT.as_secs(),
            if probed { "probed now" } else { "as probed since the host booted" }
        )),
        Err(e) => tcg(format!(
            "TCG (software emulation): cannot run the KVM probe: {e}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse() {
        assert_eq!("auto".parse(), Ok(AccelChoice::Auto));
        assert_eq!("kvm".parse(), Ok(AccelChoice::Kvm));
        assert!("hvf".parse::<AccelChoice>().is_err());
        let dir = tempfile::tempdir().unwrap();
        let picked = pick(
            "qemu-system-x86_64",
            AccelChoice::Tcg,
            Path::new("/none"),
            dir.path(),
        );
        assert_eq!(picked.accel, Accel::Tcg);
    }

    #[test]
    fn a_verdict_is_per_kernel() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"one").unwrap();
        std::fs::write(&b, b"other").unwrap();
        assert_ne!(
            verdict_name("qemu-system-x86_64", &a),
            verdict_name("qemu-system-x86_64", &b)
        );
    }
}
