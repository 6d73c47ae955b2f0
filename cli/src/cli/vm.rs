//! `hull vm build|run|stop|status|console`: the hull VM image, and booting it
//! under QEMU on this machine. The work is in `hull_image::vm`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result};
use hull_image::vm::{self, qemu};

use super::{print_json, Global};

/// Where `hull vm build` keeps downloads and finished builds.
pub const DEFAULT_CACHE: &str = "/var/cache/hull/vm";
/// The image directory when none is given.
pub const DEFAULT_DIR: &str = "hull-vm";

fn binaries_dir() -> Result<PathBuf> {
    let me = std::env::current_exe().context("locating the hull binary")?;
    Ok(me
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(".")))
}

pub fn build(g: &Global, out: PathBuf, cache: PathBuf) -> Result<()> {
    let spec = vm::BuildSpec {
        out,
        cache,
        binaries: binaries_dir()?,
    };
    let built = vm::build(&spec, &mut |line| errln!("hull: {line}"))?;
    if g.json {
        return print_json(&serde_json::json!({
            "out": built.out,
            "reused": built.reused,
            "manifest": built.manifest,
        }));
    }
    outln!("{}", built.out.display());
    Ok(())
}

pub struct RunArgs {
    pub dir: PathBuf,
    pub memory: String,
    pub cpus: u32,
    pub http_port: Option<u16>,
    pub disk_size: u64,
    pub api_port: u16,
    pub machine: qemu::Machine,
    pub timeout: Duration,
    pub append: Vec<String>,
    pub accel: hull_image::vm::accel::AccelChoice,
    pub dhcp: bool,
}

pub fn run(g: &Global, args: RunArgs) -> Result<()> {
    let options = qemu::RunOptions {
        dir: args.dir,
        memory: args.memory,
        cpus: args.cpus,
        api_port: args.api_port,
        http_port: args.http_port,
        disk_size: args.disk_size,
        machine: args.machine,
        ready_timeout: args.timeout,
        append: args.append,
        accel: args.accel,
        dhcp: args.dhcp,
    };
    let started = qemu::run(&options, &mut |line| errln!("hull: {line}"))?;
    if g.json {
        return print_json(&started);
    }
    errln!(
        "hull: hulld's API answered {:.1} s after QEMU started",
        started.ready_ms as f64 / 1000.0
    );
    if let Some(http_url) = &started.http_url {
        errln!("hull: HTTP ingress on {http_url}");
    }
    if let Some(vsock) = &started.vsock {
        errln!(
            "hull: hulld's API also on vsock CID {} port {}",
            vsock.cid,
            vsock.port
        );
    }
    errln!(
        "hull: `set -a; . {}` lets hull and the SDKs reach it",
        started.env_file.display()
    );
    outln!("HULL_URL={}", started.url);
    outln!("HULL_TOKEN={}", started.token);
    Ok(())
}

/// `--disk-size`: a size as hull.toml writes them ("8G", "512M").
pub fn parse_disk_size(text: &str) -> std::result::Result<u64, String> {
    match crate::config::parse_size(text) {
        Some(size) if size >= 256 << 20 => Ok(size),
        Some(_) => Err("the data disk needs at least 256M".into()),
        None => Err(format!("{text:?} is not a size (\"8G\", \"512M\")")),
    }
}

/// Prints the console, then follows it while QEMU runs.
pub fn console(dir: &Path, follow: bool) -> Result<()> {
    use std::io::{Read, Seek, Write};
    let path = dir.join(qemu::CONSOLE_LOG);
    let mut file = std::fs::File::open(&path)
        .with_context(|| format!("opening {} (has the VM run?)", path.display()))?;
    let mut stdout = std::io::stdout().lock();
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = file
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n > 0 {
            stdout.write_all(&buf[..n])?;
            continue;
        }
        stdout.flush()?;
        if !follow || qemu::running_pid(dir).is_none() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(200));
        // A new run truncates the file: start again from its top.
        let position = file.stream_position()?;
        if std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0) < position {
            file = std::fs::File::open(&path)?;
        }
    }
}

pub fn stop(g: &Global, dir: PathBuf, timeout: Duration) -> Result<()> {
    let stopped = qemu::stop(&dir, timeout)?;
    if g.json {
        return print_json(&stopped);
    }
    if stopped.forced {
        errln!(
            "hull: the VM did not power off within {} s: QEMU was told to quit",
            timeout.as_secs()
        );
    }
    outln!(
        "stopped (QEMU pid {}, {:.1} s)",
        stopped.pid,
        stopped.stop_ms as f64 / 1000.0
    );
    Ok(())
}

pub fn status(g: &Global, dir: PathBuf) -> Result<()> {
    let status = qemu::status(&dir);
    if g.json {
        return print_json(&status);
    }
    if let Some(http_url) = &status.http_url {
        outln!("HTTP ingress: {http_url}");
    }
    match (&status.pid, &status.url) {
        (Some(pid), Some(url)) => outln!(
            "running (QEMU pid {pid}, {} machine, {}); API {url} {}",
            status.machine.map_or("?", |m| m.name()),
            status.accel.as_deref().unwrap_or("?"),
            if status.api_answers {
                "answers"
            } else {
                "does not answer"
            }
        ),
        _ => outln!("not running"),
    }
    outln!("console: {}", status.console.display());
    Ok(())
}
