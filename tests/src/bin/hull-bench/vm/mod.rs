//! The hull VM under QEMU, as `hull vm build` and `hull vm run` make and
//! boot it (TCG here: this host has no working KVM):
//!
//! - the boot's timeline off the serial console, from the kernel's start
//!   to hull-init, each of its steps, hulld's start, its API and the inner
//!   running, and hull's own share of it (hull-init's exec to the API
//!   answering with the inner running);
//! - the anchor under TCG: a busybox shell as /init making the same
//!   mounts, booted with the same kernel and QEMU arguments (`anchor`);
//! - the guest's idle memory, MemTotal − MemAvailable of its /proc/meminfo
//!   (read in the inner, whose /proc is the VM's procfs: its meminfo is
//!   the whole VM's, not its cgroup's);
//! - the image's size, as built and compressed (`image`);
//! - an exec round trip from this machine through QEMU's forwarded API,
//!   against the same client and the same exec on a hulld on this machine
//!   over loopback (the inner cannot exec, and the VM's root namespace has
//!   no way in but the API).
//!
//! The first boot is of an empty data disk (hull-init formats it and
//! copies the base image, hulld makes its volume); the next boots, with
//! `--boots`, reuse it after a clean `hull vm stop`, as a VM's later boots
//! do. Memory and exec are measured in the last boot.

mod anchor;
mod image;
mod timeline;

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_image::vm::qemu::VmState;
use hull_tests::vm::{hull, require_qemu, text, vm_image, Vm};
use hull_tests::{bin_dir, block_on, TestHull};
use serde_json::json;

use crate::report::{ms, print_rows, print_single, Row};
use timeline::Timeline;

pub struct Options {
    pub boots: usize,
    pub execs: usize,
    pub memory_samples: usize,
    pub zstd_level: i32,
    pub json: bool,
    /// Kernel arguments for `hull vm run --append` (and the anchor).
    pub append: Vec<String>,
}

/// hull's share of a boot on KVM, the target; this host has TCG only.
const SHARE_TARGET: &str = "<= 50 ms on KVM";
const MEMORY_TARGET_MIB: f64 = 96.0;
const MEMORY_TARGET: &str = "<= 96 MiB";
const SIZE_TARGET_MIB: f64 = 64.0;
const SIZE_TARGET: &str = "<= 64 MiB";
/// The exec rows take turns this many times.
const TURNS: usize = 5;

const MIB: f64 = 1024.0 * 1024.0;

/// What the guest's used memory is made of, by /proc/meminfo's fields.
const MEMORY_PARTS: &[(&str, &[&str])] = &[
    ("  processes' anonymous memory (AnonPages)", &["AnonPages"]),
    ("  tmpfs: the root with the image, /run (Shmem)", &["Shmem"]),
    ("  kernel: unreclaimable slab (SUnreclaim)", &["SUnreclaim"]),
    (
        "  kernel: stacks, page tables, per-CPU",
        &["KernelStack", "PageTables", "Percpu"],
    ),
];

struct Boot {
    timeline: Timeline,
    launch: Launch,
}

/// What `hull vm run --json` said of a boot it started.
#[derive(Debug, Clone, PartialEq)]
struct Launch {
    /// QEMU's start to the API's first answer (host clock).
    ready_ms: f64,
    /// The accelerator `--accel auto` picked (`kvm` or `tcg`) ...
    accel: String,
    /// ... and why.
    accel_note: String,
}

/// The API and the launch's facts from `hull vm run --json`'s output.
fn launched(json: &serde_json::Value) -> Result<(Api, Launch)> {
    let field = |key: &str| -> Result<String> {
        json[key]
            .as_str()
            .map(str::to_owned)
            .with_context(|| format!("no {key} in hull vm run's output: {json}"))
    };
    let api = Api {
        url: field("url")?,
        token: field("token")?,
    };
    #[allow(clippy::cast_precision_loss, reason = "milliseconds")]
    let ready_ms = json["ready_ms"].as_u64().context("no ready_ms")? as f64;
    let launch = Launch {
        ready_ms,
        accel: field("accel")?,
        accel_note: field("accel_note")?,
    };
    Ok((api, launch))
}

/// The accelerator the boots ran under: one name, or each boot's joined
/// with "," where they differed.
fn accel_used(boots: &[Boot]) -> String {
    let mut names: Vec<&str> = boots.iter().map(|b| b.launch.accel.as_str()).collect();
    names.dedup();
    names.join(",")
}

/// A booted VM's URL and host token.
struct Api {
    url: String,
    token: String,
}

impl Api {
    fn hull(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec![
            "--socket",
            "/nonexistent/hull.sock",
            "--url",
            &self.url,
            "--token",
            &self.token,
        ];
        all.extend_from_slice(args);
        hull(&all)
    }

    fn ok(&self, args: &[&str]) -> Result<String> {
        let out = self.hull(args);
        if !out.status.success() {
            bail!("hull {args:?} against {}: {}", self.url, text(&out.stderr));
        }
        Ok(text(&out.stdout))
    }
}

struct Memory {
    /// MemTotal − MemAvailable, MiB, per sample.
    used: Vec<f64>,
    /// Parts of it, by /proc/meminfo's fields (MiB per sample).
    parts: Vec<(&'static str, Vec<f64>)>,
    inner_current: Vec<f64>,
    /// Free memory the kernel holds back (its zones' high watermarks and
    /// lowmem reserves), which MemAvailable leaves out.
    reserve: Vec<f64>,
    mem_total_mib: f64,
    inner_max_mib: Option<f64>,
    min_free_kbytes: String,
    transparent_hugepage: String,
}

impl Memory {
    /// Whose memory the inner's /proc/meminfo shows: the VM's, or its
    /// cgroup's (as LXCFS would make it) when MemTotal is its limit.
    fn view(&self) -> &'static str {
        match self.inner_max_mib {
            Some(max) if (max - self.mem_total_mib).abs() < 1.0 => "inner cgroup",
            _ => "VM",
        }
    }
}

struct Exec {
    vm_wall: Vec<f64>,
    vm_cpu: Vec<f64>,
    local_wall: Vec<f64>,
    local_cpu: Vec<f64>,
}

pub fn run(options: &Options) -> Result<()> {
    if !require_qemu() {
        bail!("the vm suite needs qemu-system-x86_64 (apt-get install qemu-system-x86)");
    }
    let bins = bin_dir();
    eprintln!(
        "hull-bench vm: the image from {} (`hull vm build`)",
        bins.display()
    );
    let image = vm_image();
    let busybox = anchor::busybox()?;
    let anchor_dir = tempfile::tempdir()?;
    std::fs::copy(image.join("vmlinuz"), anchor_dir.path().join("vmlinuz"))?;
    let vm = Vm::new(&image);
    let mut boots = Vec::new();
    let mut anchors = Vec::new();
    let mut memory = None;
    let mut exec = None;
    for n in 1..=options.boots {
        eprintln!(
            "boot {n}/{}: hull vm run ({})",
            options.boots,
            if n == 1 {
                "an empty data disk"
            } else {
                "the data disk of the boot before"
            }
        );
        let (api, launch) = boot(&vm, &options.append)?;
        if n == options.boots {
            eprintln!("idle memory: {} samples", options.memory_samples);
            memory = Some(measure_memory(&api, options.memory_samples)?);
            eprintln!("exec round trips: {} each way", options.execs);
            exec = Some(measure_exec(&api, options.execs)?);
        }
        let console = vm.console();
        stop(&vm)?;
        let timeline = timeline::parse(&console).with_context(|| {
            format!("no hull-init lines on the console:\n{}", vm.console_tail())
        })?;
        boots.push(Boot { timeline, launch });
        let state: VmState = serde_json::from_slice(&std::fs::read(vm.dir.join("vm.json"))?)?;
        eprintln!("boot {n}/{}: the busybox anchor", options.boots);
        anchors.push(anchor::boot(
            anchor_dir.path(),
            &busybox,
            &state,
            &options.append,
        )?);
    }
    eprintln!("image size: zstd -{} of the initramfs", options.zstd_level);
    let size = image::measure(&image, &bins, options.zstd_level)?;
    let memory = memory.context("no boot measured memory")?;
    let exec = exec.context("no boot measured exec")?;
    if options.json {
        let json = to_json(
            &options.append,
            &bins,
            &boots,
            &anchors,
            &memory,
            &size,
            &exec,
        );
        println!("{}", serde_json::to_string_pretty(&json)?);
    } else {
        print_report(&bins, &boots, &anchors, &memory, &size, &exec);
    }
    Ok(())
}

/// `hull vm run` of `vm`'s directory, then the inner's start: the API and
/// what the run said of itself.
fn boot(vm: &Vm, append: &[String]) -> Result<(Api, Launch)> {
    let mut extra = Vec::new();
    for arg in append {
        extra.extend(["--append", arg.as_str()]);
    }
    let json = vm
        .run(hull_tests::vm::free_port(), &extra)
        .map_err(anyhow::Error::msg)?;
    if !vm.wait_console("inner ready", Duration::from_secs(180)) {
        bail!("the inner did not start:\n{}", vm.console_tail());
    }
    launched(&json)
}

fn stop(vm: &Vm) -> Result<()> {
    let out = hull(&["--json", "vm", "stop", vm.dir_str()]);
    if !out.status.success() {
        bail!("hull vm stop failed: {}", text(&out.stderr));
    }
    let stopped: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    if stopped["forced"] == true {
        eprintln!("warning: the guest did not power off by itself; QEMU was told to quit");
    }
    Ok(())
}

/// The guest's memory once it is idle: samples a second apart, after the
/// inner's start has settled.
fn measure_memory(api: &Api, samples: usize) -> Result<Memory> {
    std::thread::sleep(Duration::from_secs(5));
    let max = api.ok(&["exec", "--", "cat", "/sys/fs/cgroup/memory.max"])?;
    let vm = api.ok(&[
        "exec",
        "--",
        "cat",
        "/proc/sys/vm/min_free_kbytes",
        "/sys/kernel/mm/transparent_hugepage/enabled",
    ])?;
    let mut vm = vm.lines().map(str::to_owned);
    let mut memory = Memory {
        used: Vec::new(),
        parts: MEMORY_PARTS
            .iter()
            .map(|(name, _)| (*name, Vec::new()))
            .collect(),
        inner_current: Vec::new(),
        reserve: Vec::new(),
        mem_total_mib: 0.0,
        #[allow(clippy::cast_precision_loss, reason = "bytes to MiB")]
        inner_max_mib: max.trim().parse::<u64>().ok().map(|b| b as f64 / MIB),
        min_free_kbytes: vm.next().unwrap_or_default(),
        transparent_hugepage: vm.next().unwrap_or_default(),
    };
    for _ in 0..samples {
        let out = api.ok(&[
            "exec",
            "--",
            "sh",
            "-c",
            "cat /proc/meminfo; echo InnerCurrent: $(cat /sys/fs/cgroup/memory.current); cat /proc/zoneinfo",
        ])?;
        let kib = |key: &str| -> Result<f64> {
            out.lines()
                .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
                .with_context(|| format!("no {key} in the guest's /proc/meminfo:\n{out}"))
        };
        memory.mem_total_mib = kib("MemTotal")? / 1024.0;
        memory
            .used
            .push((kib("MemTotal")? - kib("MemAvailable")?) / 1024.0);
        for ((_, fields), (_, samples)) in MEMORY_PARTS.iter().zip(&mut memory.parts) {
            let mut sum = 0.0;
            for field in *fields {
                sum += kib(field)?;
            }
            samples.push(sum / 1024.0);
        }
        memory.inner_current.push(kib("InnerCurrent")? / MIB);
        #[allow(clippy::cast_precision_loss, reason = "pages to MiB")]
        memory
            .reserve
            .push(reserve_pages(&out) as f64 * 4096.0 / MIB);
        std::thread::sleep(Duration::from_secs(1));
    }
    Ok(memory)
}

/// The pages the kernel keeps free, as MemAvailable counts them
/// (mm/page_alloc.c, calculate_totalreserve_pages): for each zone in
/// /proc/zoneinfo its high watermark and its largest lowmem reserve, at
/// most its managed pages.
fn reserve_pages(zoneinfo: &str) -> u64 {
    let mut total = 0;
    let mut zone: Option<(u64, u64, u64)> = None;
    let mut close = |zone: Option<(u64, u64, u64)>| {
        if let Some((high, protection, managed)) = zone {
            total += (high + protection).min(managed);
        }
    };
    for line in zoneinfo.lines() {
        let mut words = line.split_whitespace();
        match words.next() {
            Some("Node") => {
                close(zone.take());
                zone = Some((0, 0, 0));
            }
            Some("high") => {
                if let (Some(z), Some(n)) = (zone.as_mut(), words.next()) {
                    z.0 = n.parse().unwrap_or(0);
                }
            }
            Some("managed") => {
                if let (Some(z), Some(n)) = (zone.as_mut(), words.next()) {
                    z.2 = n.parse().unwrap_or(0);
                }
            }
            Some("protection:") => {
                if let Some(z) = zone.as_mut() {
                    z.1 = line
                        .split(['(', ',', ')'])
                        .filter_map(|n| n.trim().parse().ok())
                        .max()
                        .unwrap_or(0);
                }
            }
            _ => {}
        }
    }
    close(zone);
    total
}

/// The CPU time (user + system) of the children waited for so far, in ms.
fn children_cpu_ms() -> Result<f64> {
    Ok(crate::report::cpu_ms(
        nix::sys::resource::UsageWho::RUSAGE_CHILDREN,
    )?)
}

/// One `hull --url URL --token T exec -- true`: its wall and CPU time.
fn exec_once(url: &str, token: &str) -> Result<(f64, f64)> {
    let cpu = children_cpu_ms()?;
    let started = Instant::now();
    let out = Command::new(bin_dir().join("hull"))
        .args([
            "--socket",
            "/nonexistent/hull.sock",
            "--url",
            url,
            "--token",
            token,
        ])
        .args(["exec", "--", "true"])
        .output()?;
    let wall = ms(started.elapsed());
    if !out.status.success() {
        bail!("hull exec -- true against {url}: {}", text(&out.stderr));
    }
    Ok((wall, children_cpu_ms()? - cpu))
}

/// Exec round trips through the VM's forwarded API, taking turns with the
/// same against a hulld on this machine over loopback.
fn measure_exec(api: &Api, execs: usize) -> Result<Exec> {
    let local = TestHull::start();
    let local_url = format!("http://{}", block_on(local.api_addr()));
    let local_token = local.api_token("admin");
    for _ in 0..3 {
        exec_once(&api.url, &api.token)?;
        exec_once(&local_url, &local_token)?;
    }
    let mut exec = Exec {
        vm_wall: Vec::new(),
        vm_cpu: Vec::new(),
        local_wall: Vec::new(),
        local_cpu: Vec::new(),
    };
    for _ in 0..TURNS {
        for _ in 0..execs.div_ceil(TURNS) {
            let (wall, cpu) = exec_once(&api.url, &api.token)?;
            exec.vm_wall.push(wall);
            exec.vm_cpu.push(cpu);
            let (wall, cpu) = exec_once(&local_url, &local_token)?;
            exec.local_wall.push(wall);
            exec.local_cpu.push(cpu);
        }
    }
    Ok(exec)
}

fn p50(samples: &[f64]) -> f64 {
    Row::new("", samples.to_vec(), "").p50()
}

fn profile(bins: &std::path::Path) -> &'static str {
    if bins.ends_with("release") {
        "release"
    } else if bins.ends_with("debug") {
        "debug"
    } else {
        "HULL_BIN_DIR"
    }
}

fn boot_name(index: usize) -> String {
    if index == 0 {
        "boot 1 (empty disk)".into()
    } else {
        format!("boot {} (steady)", index + 1)
    }
}

/// Every boot's step labels, in order, each once.
fn step_labels(boots: &[Boot]) -> Vec<String> {
    let mut labels: Vec<String> = Vec::new();
    for boot in boots {
        let mut after: Option<usize> = None;
        for step in &boot.timeline.steps {
            match labels.iter().position(|l| *l == step.label) {
                Some(at) => after = Some(at),
                None => {
                    let at = after.map_or(labels.len(), |a| a + 1);
                    labels.insert(at, step.label.clone());
                    after = Some(at);
                }
            }
        }
    }
    labels
}

fn print_timeline(boots: &[Boot]) {
    println!();
    let accel = boots.last().map(|b| &b.launch);
    println!(
        "boot timeline on the guest's boot clock, QEMU accelerator {} ({})",
        accel_used(boots),
        accel.map_or("", |l| l.accel_note.as_str())
    );
    print!("{:<58}", "step");
    for index in 0..boots.len() {
        print!(" {:>22}", boot_name(index));
    }
    println!();
    print!("{:<58}", "");
    for _ in boots {
        print!(" {:>10} {:>11}", "at s", "took ms");
    }
    println!();
    println!("{}", "-".repeat(58 + 23 * boots.len()));
    for label in step_labels(boots) {
        let shown: String = if label.chars().count() > 58 {
            label.chars().take(56).chain("..".chars()).collect()
        } else {
            label.clone()
        };
        print!("{shown:<58}");
        for boot in boots {
            match boot.timeline.steps.iter().find(|s| s.label == label) {
                Some(step) => print!(" {:>10.3} {:>11.1}", step.at, step.took_ms),
                None => print!(" {:>10} {:>11}", "", "-"),
            }
        }
        println!();
    }
    println!("{}", "-".repeat(58 + 23 * boots.len()));
    let summary = [
        (
            "init exec to hulld spawned",
            boots
                .iter()
                .map(|b| b.timeline.init_to_hulld_ms())
                .collect::<Vec<_>>(),
            "",
        ),
        (
            "hull's share: init exec to API ready, inner running",
            boots.iter().map(|b| b.timeline.share_ms()).collect(),
            SHARE_TARGET,
        ),
        (
            "host: QEMU start to the API's first answer",
            boots.iter().map(|b| Some(b.launch.ready_ms)).collect(),
            "",
        ),
    ];
    for (name, values, target) in summary {
        print!("{name:<58}");
        for value in values {
            match value {
                Some(ms) => print!(" {:>10} {ms:>11.1}", ""),
                None => print!(" {:>10} {:>11}", "", "n/a"),
            }
        }
        println!("  {target}");
    }
}

fn print_report(
    bins: &std::path::Path,
    boots: &[Boot],
    anchors: &[anchor::AnchorBoot],
    memory: &Memory,
    size: &image::ImageSize,
    exec: &Exec,
) {
    print_timeline(boots);
    if boots.iter().any(|b| b.timeline.api_listening.is_none()) {
        println!(
            "(no `clocks:` line from hull-init: hulld's lines cannot be put on the boot clock)"
        );
    }

    let hull_mounts: Vec<f64> = boots.iter().filter_map(|b| b.timeline.mounts_ms).collect();
    let syscalls: Vec<f64> = boots
        .iter()
        .filter_map(|b| b.timeline.mounts_sum_ms)
        .collect();
    let busybox_mounts: Vec<f64> = anchors.iter().map(|a| a.mounts_ms).collect();
    let hull_kernel: Vec<f64> = boots.iter().map(|b| b.timeline.init_start * 1e3).collect();
    let busybox_kernel: Vec<f64> = anchors.iter().map(|a| a.init_start * 1e3).collect();
    let rows = vec![
        Row::new(
            "hull-init: mounts (proc sys dev run tmp cgroup2)",
            hull_mounts.clone(),
            "ms",
        ),
        Row::new("  internal: the six mount(2) calls alone", syscalls, "ms"),
        Row::new(
            "anchor: busybox sh as /init, the same mounts",
            busybox_mounts.clone(),
            "ms",
        ),
        Row::new("hull-init: kernel start to init", hull_kernel.clone(), "ms"),
        Row::new("anchor: kernel start to init", busybox_kernel.clone(), "ms"),
    ];
    print_rows(&rows);
    println!(
        "hull-init's mounts: {:.2}x busybox's (p50); kernel start to init: {:.2}x (initramfs {:.1} MiB against the anchor's {:.1} MiB)",
        p50(&hull_mounts) / p50(&busybox_mounts),
        p50(&hull_kernel) / p50(&busybox_kernel),
        bytes_mib(size.initramfs),
        anchors.first().map_or(f64::NAN, |a| bytes_mib(a.initramfs_bytes)),
    );

    let rows = vec![
        Row::new(
            "idle memory, whole guest (MemTotal - MemAvailable)",
            memory.used.clone(),
            "MiB",
        )
        .target(MEMORY_TARGET),
        Row::new(
            "  kernel: free but held in reserve (watermarks)",
            memory.reserve.clone(),
            "MiB",
        ),
        Row::new(
            "  the inner's cgroup (memory.current)",
            memory.inner_current.clone(),
            "MiB",
        ),
    ];
    let parts: Vec<Row> = memory
        .parts
        .iter()
        .map(|(name, samples)| Row::new(name, samples.clone(), "MiB"))
        .collect();
    let mut rows = rows;
    rows.splice(1..1, parts);
    print_rows(&rows);
    println!(
        "the inner's /proc/meminfo is the {}'s (MemTotal {:.0} MiB; the inner's memory.max {})",
        memory.view(),
        memory.mem_total_mib,
        memory
            .inner_max_mib
            .map_or_else(|| "max".into(), |m| format!("{m:.0} MiB")),
    );
    println!(
        "the reserve follows vm.min_free_kbytes = {} (transparent hugepages: {}; khugepaged raises it unless THP is never)",
        memory.min_free_kbytes, memory.transparent_hugepage
    );

    println!();
    print_single("image: vmlinuz", bytes_mib(size.vmlinuz), "MiB", "");
    print_single("image: initramfs.img", bytes_mib(size.initramfs), "MiB", "");
    for (part, bytes) in &size.parts {
        let name = format!("  {part}");
        print_single(&name, bytes_mib(*bytes), "MiB", "");
    }
    let name = format!("image: initramfs.img, zstd -{}", size.level);
    print_single(&name, bytes_mib(size.compressed), "MiB", "");
    print_single(
        "image: vmlinuz + initramfs.img.zst (no Debian base)",
        bytes_mib(size.shipped()),
        "MiB",
        SIZE_TARGET,
    );
    let name = format!("hull's binaries, {} build, as built", profile(bins));
    print_single(&name, bytes_mib(size.binaries), "MiB", "");
    if let Some(stripped) = size.binaries_stripped {
        print_single(
            "  stripped (strip --strip-all)",
            bytes_mib(stripped),
            "MiB",
            "",
        );
    }

    let rows = vec![
        Row::new(
            "exec `true`, host -> the VM's forwarded API",
            exec.vm_wall.clone(),
            "ms",
        ),
        Row::new("  hull client CPU (user + sys)", exec.vm_cpu.clone(), "ms"),
        Row::new(
            "anchor: exec `true`, host -> a local hulld's API",
            exec.local_wall.clone(),
            "ms",
        ),
        Row::new(
            "  hull client CPU (user + sys)",
            exec.local_cpu.clone(),
            "ms",
        ),
    ];
    print_rows(&rows);
    println!(
        "exec through the VM: {:.2}x the local hulld's (p50 wall); the client's CPU {:.2}x",
        p50(&exec.vm_wall) / p50(&exec.local_wall),
        p50(&exec.vm_cpu) / p50(&exec.local_cpu),
    );
}

#[allow(clippy::cast_precision_loss, reason = "bytes to MiB for display")]
fn bytes_mib(bytes: u64) -> f64 {
    bytes as f64 / MIB
}

fn to_json(
    append: &[String],
    bins: &std::path::Path,
    boots: &[Boot],
    anchors: &[anchor::AnchorBoot],
    memory: &Memory,
    size: &image::ImageSize,
    exec: &Exec,
) -> serde_json::Value {
    json!({
        "accel": accel_used(boots),
        "append": append,
        "binaries": { "dir": bins, "profile": profile(bins) },
        "boots": boots.iter().enumerate().map(|(i, b)| {
            let mut t = b.timeline.to_json();
            t["boot"] = json!(boot_name(i));
            t["host_qemu_to_api_ms"] = json!(b.launch.ready_ms);
            t["accel"] = json!(b.launch.accel);
            t["accel_note"] = json!(b.launch.accel_note);
            t
        }).collect::<Vec<_>>(),
        "hull_share_target": SHARE_TARGET,
        "anchor": anchors.iter().map(|a| json!({
            "kernel_to_init_ms": a.init_start * 1e3,
            "mounts_ms": a.mounts_ms,
            "initramfs_bytes": a.initramfs_bytes,
            "qemu_ms": a.qemu_ms,
        })).collect::<Vec<_>>(),
        "mounts_ratio_p50": p50(&boots.iter().filter_map(|b| b.timeline.mounts_ms).collect::<Vec<_>>())
            / p50(&anchors.iter().map(|a| a.mounts_ms).collect::<Vec<_>>()),
        "memory": {
            "idle_used_mib": memory.used,
            "idle_used_mib_p50": p50(&memory.used),
            "parts_mib": memory.parts.iter().map(|(name, samples)| (name.trim().to_owned(), samples.clone())).collect::<std::collections::BTreeMap<_, _>>(),
            "inner_current_mib": memory.inner_current,
            "reserve_mib": memory.reserve,
            "min_free_kbytes": memory.min_free_kbytes,
            "transparent_hugepage": memory.transparent_hugepage,
            "mem_total_mib": memory.mem_total_mib,
            "inner_memory_max_mib": memory.inner_max_mib,
            "meminfo_view": memory.view(),
            "target_mib": MEMORY_TARGET_MIB,
        },
        "image": size.to_json(),
        "image_target_mib": SIZE_TARGET_MIB,
        "exec": {
            "vm_wall_ms": exec.vm_wall,
            "vm_client_cpu_ms": exec.vm_cpu,
            "local_wall_ms": exec.local_wall,
            "local_client_cpu_ms": exec.local_cpu,
            "vm_wall_p50_ms": p50(&exec.vm_wall),
            "local_wall_p50_ms": p50(&exec.local_wall),
            "ratio_p50": p50(&exec.vm_wall) / p50(&exec.local_wall),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accelerator is what `hull vm run` picked, never assumed.
    #[test]
    fn the_accelerator_is_the_one_hull_vm_run_picked() {
        let run = |accel: &str| {
            json!({
                "url": "http://127.0.0.1:7700",
                "token": "hull_a_b",
                "ready_ms": 1234,
                "accel": accel,
                "accel_note": format!("{accel}: the probe's verdict"),
            })
        };
        let (api, launch) = launched(&run("kvm")).unwrap();
        assert_eq!(api.url, "http://127.0.0.1:7700");
        assert_eq!(launch.accel, "kvm");
        assert_eq!(launch.accel_note, "kvm: the probe's verdict");
        let boot = |accel: &str| Boot {
            timeline: timeline::parse("hull-init: [    1.000] started as pid 1\n").unwrap(),
            launch: launched(&run(accel)).unwrap().1,
        };
        assert_eq!(accel_used(&[boot("kvm"), boot("kvm")]), "kvm");
        assert_eq!(accel_used(&[boot("tcg")]), "tcg");
        assert_eq!(accel_used(&[boot("tcg"), boot("kvm")]), "tcg,kvm");
        assert!(launched(&json!({"url": "u", "token": "t", "ready_ms": 1})).is_err());
    }

    #[test]
    fn the_reserve_is_each_zones_high_watermark_and_largest_protection() {
        let zoneinfo = "Node 0, zone      DMA
  pages free     3840
        min      182
        low      227
        high     272
        managed  3840
        protection: (0, 908, 908, 908, 908)
  pagesets
    cpu: 0
              high:  0
Node 0, zone    DMA32
        high     16621
        managed  245253
        protection: (0, 0, 0, 0, 0)
Node 0, zone   Normal
        high     0
        managed  0
        protection: (0, 0, 0, 0, 0)
";
        assert_eq!(reserve_pages(zoneinfo), 272 + 908 + 16621);
    }
}
