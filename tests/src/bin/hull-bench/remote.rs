//! The remote: checkpoints of a layer pushed to Garage on loopback,
//! started by the bench in a temp dir, against the same server's own
//! throughput (one PUT and one GET of a tar of the layer) and a raw read
//! of the layer; an incremental push of a 1 MiB change; a restore (pull
//! into `btrfs receive`); and what dedup stores for ten checkpoints of a
//! layer changing 1% each time.

use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use futures::StreamExt;
use hull_checkpoint::btrfs;
use hull_remote::object_store::path::Path as ObjectPath;
use hull_remote::object_store::{ObjectStoreExt, PutPayload};
use hull_remote::{ManifestId, Remote, RemoteOptions};
use hull_tests::garage::{self, Garage};
use hull_tests::stream::{self, CountingStore, LoopVolume};
use nix::sys::resource::UsageWho;
use serde_json::json;

use crate::ingress::pinning::{clock_ticks, cpu_ticks};
use crate::report::{cpu_ms, print_single};

pub struct Options {
    /// The layer's size in MiB: half incompressible, half text.
    pub mib: u64,
    /// Incremental pushes of a 1 MiB change.
    pub rounds: usize,
    /// Checkpoints of the dedup figure, each after a 1% change.
    pub dedup_checkpoints: usize,
    pub json: bool,
}

/// The size of each file of the layer.
const FILE: u64 = 8 << 20;

/// Wall and CPU time of one operation: this process (hull-remote's
/// pipeline, or the anchor's client), the children it waited for (btrfs
/// send and receive, tar), and the Garage server.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    wall_ms: f64,
    hull_cpu_ms: f64,
    children_cpu_ms: f64,
    garage_cpu_ms: f64,
}

struct Meter {
    started: Instant,
    own: f64,
    children: f64,
    garage_ticks: u64,
    garage: i32,
}

impl Meter {
    fn start(garage: i32) -> Result<Meter> {
        Ok(Meter {
            own: cpu_ms(UsageWho::RUSAGE_SELF)?,
            children: cpu_ms(UsageWho::RUSAGE_CHILDREN)?,
            garage_ticks: cpu_ticks(&[garage])?,
            garage,
            started: Instant::now(),
        })
    }

    fn stop(self) -> Result<Cost> {
        let wall_ms = crate::report::ms(self.started.elapsed());
        #[allow(clippy::cast_precision_loss, reason = "clock ticks")]
        let garage_cpu_ms =
            (cpu_ticks(&[self.garage])? - self.garage_ticks) as f64 * 1e3 / clock_ticks();
        Ok(Cost {
            wall_ms,
            hull_cpu_ms: cpu_ms(UsageWho::RUSAGE_SELF)? - self.own,
            children_cpu_ms: cpu_ms(UsageWho::RUSAGE_CHILDREN)? - self.children,
            garage_cpu_ms,
        })
    }
}

impl Cost {
    fn to_json(self) -> serde_json::Value {
        json!({
            "wall_ms": self.wall_ms,
            "hull_cpu_ms": self.hull_cpu_ms,
            "children_cpu_ms": self.children_cpu_ms,
            "garage_cpu_ms": self.garage_cpu_ms,
        })
    }

    fn print(&self, name: &str, bytes: Option<u64>) {
        let rate = bytes
            .map(|b| format!("{:>8.1} MB/s", b as f64 / 1e6 / (self.wall_ms / 1e3)))
            .unwrap_or_default();
        println!(
            "{name:<50} {:>9.0} ms {rate:>13}  cpu: this {:>7.0} ms, btrfs/tar {:>6.0} ms, garage {:>6.0} ms",
            self.wall_ms, self.hull_cpu_ms, self.children_cpu_ms, self.garage_cpu_ms
        );
    }
}

fn random_into(path: &Path, offset: u64, len: u64) -> Result<()> {
    stream::random_into(path, offset, len).with_context(|| format!("write {}", path.display()))
}

/// Half the files random, half text that compresses (each line numbered,
/// so that it is not one repeated block).
fn make_layer(src: &Path, mib: u64) -> Result<u64> {
    btrfs::create_subvolume(src).with_context(|| format!("create {}", src.display()))?;
    let files = (mib << 20).div_ceil(FILE).max(2);
    for i in 0..files {
        let path = src.join(format!("file-{i:05}"));
        if i % 2 == 0 {
            random_into(&path, 0, FILE)?;
        } else {
            let mut out = std::io::BufWriter::new(fs::File::create(&path)?);
            let mut written = 0;
            let mut line = 0u64;
            while written < FILE {
                let text = format!(
                    "{i}:{line} the quick brown fox jumps over the lazy dog, {}\n",
                    line * 7919 % 10007
                );
                out.write_all(text.as_bytes())?;
                written += text.len() as u64;
                line += 1;
            }
            out.flush()?;
        }
    }
    Ok(files * FILE)
}

/// Every file of the layer read once, as a backup tool's first pass would.
fn read_layer(root: &Path) -> Result<u64> {
    let mut buf = vec![0u8; 1 << 20];
    let mut total = 0;
    for entry in fs::read_dir(root)? {
        let mut file = fs::File::open(entry?.path())?;
        loop {
            match file.read(&mut buf)? {
                0 => break,
                n => total += n as u64,
            }
        }
    }
    Ok(total)
}

fn snapshot(src: &Path, dest: &Path) -> Result<()> {
    btrfs::snapshot(src, dest, true).with_context(|| format!("snapshot {}", dest.display()))
}

/// 1 MiB of random data at a random place in one of the layer's files.
fn change_a_mib(src: &Path, files: u64, seed: u64) -> Result<()> {
    let pick = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 16;
    let file = src.join(format!("file-{:05}", pick % files));
    random_into(&file, (pick % (FILE >> 20)) << 20, 1 << 20)
}

pub fn run(options: &Options) -> Result<()> {
    let Some(bin) = garage::find() else {
        bail!("no garage binary (HULL_GARAGE, PATH, /var/cache/hull-ci/garage/bin): cargo install --locked garage");
    };
    let dir = tempfile::Builder::new()
        .prefix("hull-bench-remote-")
        .tempdir()?;
    let garage = Garage::start(&bin, &dir.path().join("garage"));
    let gpid = i32::try_from(garage.pid())?;
    // The layer, a snapshot per push, and a received copy.
    let volume = LoopVolume::new(dir.path(), (options.mib << 20) * 4 + (2 << 30));
    let root = volume.root().to_path_buf();
    let src = root.join("src");
    eprintln!("making a {} MiB layer...", options.mib);
    let layer_bytes = make_layer(&src, options.mib)?;
    let files = layer_bytes / FILE;
    nix::unistd::sync();
    snapshot(&src, &root.join("c0"))?;

    let rt = tokio::runtime::Runtime::new()?;
    let s3 = garage.store();
    let counted = Arc::new(CountingStore::new(s3.clone()));
    let key_file = dir.path().join("remote.key");
    let url = format!("s3://{}/bench", garage.bucket);
    let report = rt.block_on(async {
        let remote = Remote::open_store(
            counted.clone(),
            "bench",
            &url,
            &key_file,
            RemoteOptions {
                index: Some(dir.path().join("index")),
                ..RemoteOptions::default()
            },
        )
        .await?;

        // Anchors: the layer read, and a tar of it PUT and GET whole.
        eprintln!("anchors: reading the layer, a tar of it PUT and GET...");
        let meter = Meter::start(gpid)?;
        let read = read_layer(&root.join("c0"))?;
        let raw_read = meter.stop()?;
        let tar = dir.path().join("layer.tar");
        let status = Command::new("tar")
            .arg("-C")
            .arg(root.join("c0"))
            .arg("-cf")
            .arg(&tar)
            .arg(".")
            .status()?;
        if !status.success() {
            bail!("tar of the layer failed");
        }
        let body = bytes::Bytes::from(fs::read(&tar)?);
        let tar_bytes = body.len() as u64;
        fs::remove_file(&tar)?;
        let object = ObjectPath::from("anchor/layer.tar");
        let meter = Meter::start(gpid)?;
        s3.put(&object, PutPayload::from(body)).await?;
        let tar_put = meter.stop()?;
        let meter = Meter::start(gpid)?;
        let mut got = 0u64;
        let mut body = s3.get(&object).await?.into_stream();
        while let Some(part) = body.next().await {
            got += part?.len() as u64;
        }
        let tar_get = meter.stop()?;
        if got != tar_bytes {
            bail!("the GET of the tar returned {got} of {tar_bytes} bytes");
        }
        s3.delete(&object).await?;

        eprintln!("full push...");
        let before = counted.put_bytes();
        let meter = Meter::start(gpid)?;
        let full = stream::push(&remote, &root.join("c0"), None).await;
        let full_push = meter.stop()?;
        let full_put = counted.put_bytes() - before;

        eprintln!("{} incremental pushes of a 1 MiB change...", options.rounds);
        let mut incrementals = Vec::new();
        let mut parent: ManifestId = full.id;
        for round in 1..=options.rounds {
            change_a_mib(&src, files, round as u64)?;
            let snap = root.join(format!("c{round}"));
            snapshot(&src, &snap)?;
            let prev = root.join(format!("c{}", round - 1));
            let before = counted.put_bytes();
            let meter = Meter::start(gpid)?;
            let pushed = stream::push(&remote, &snap, Some((&prev, parent))).await;
            let cost = meter.stop()?;
            parent = pushed.id;
            incrementals.push((
                cost,
                counted.put_bytes() - before,
                pushed.manifest.stream_len,
            ));
        }

        eprintln!("restore: pull into btrfs receive...");
        let fresh = Remote::open_store(
            counted.clone(),
            "bench",
            &url,
            &key_file,
            RemoteOptions::default(),
        )
        .await?;
        let recv = root.join("recv");
        fs::create_dir(&recv)?;
        let meter = Meter::start(gpid)?;
        stream::pull(&fresh, full.id, &recv)
            .await
            .map_err(|(e, _)| e)?;
        let restore = meter.stop()?;
        btrfs::destroy_subvolume(&recv.join("c0"))?;

        eprintln!(
            "dedup: {} full pushes, 1% changed before each...",
            options.dedup_checkpoints
        );
        let dedup_store = Arc::new(CountingStore::new(s3.clone()));
        let dedup = Remote::open_store(
            dedup_store.clone(),
            "dedup",
            &format!("s3://{}/dedup", garage.bucket),
            &key_file,
            RemoteOptions {
                index: Some(dir.path().join("dedup-index")),
                ..RemoteOptions::default()
            },
        )
        .await?;
        let mut stored = Vec::new();
        let percent = ((layer_bytes / 100) >> 20).max(1);
        for checkpoint in 0..options.dedup_checkpoints {
            if checkpoint > 0 {
                for piece in 0..percent {
                    change_a_mib(&src, files, 1000 * checkpoint as u64 + piece)?;
                }
            }
            let snap = root.join(format!("d{checkpoint}"));
            snapshot(&src, &snap)?;
            stream::push(&dedup, &snap, None).await;
            stored.push(dedup_store.put_bytes());
            btrfs::destroy_subvolume(&snap)?;
        }

        Ok::<_, anyhow::Error>(json!({
            "layer_bytes": layer_bytes,
            "read_bytes": read,
            "tar_bytes": tar_bytes,
            "raw_read": raw_read.to_json(),
            "tar_put": tar_put.to_json(),
            "tar_get": tar_get.to_json(),
            "full_push": full_push.to_json(),
            "full_push_stored_bytes": full_put,
            "full_push_chunks": full.progress.chunks,
            "incremental": incrementals.iter().map(|(c, put, len)| json!({
                "cost": c.to_json(), "stored_bytes": put, "stream_bytes": len,
            })).collect::<Vec<_>>(),
            "restore": restore.to_json(),
            "dedup_stored_bytes": stored,
        }))
    })?;
    for round in (0..=options.rounds).rev() {
        btrfs::destroy_subvolume(&root.join(format!("c{round}")))?;
    }
    btrfs::destroy_subvolume(&src)?;
    drop(volume);
    drop(garage);

    if options.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report);
    }
    Ok(())
}

fn cost(v: &serde_json::Value) -> Cost {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    Cost {
        wall_ms: f("wall_ms"),
        hull_cpu_ms: f("hull_cpu_ms"),
        children_cpu_ms: f("children_cpu_ms"),
        garage_cpu_ms: f("garage_cpu_ms"),
    }
}

fn print_report(r: &serde_json::Value) {
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    let layer = u("layer_bytes");
    let mib = |b: u64| b as f64 / f64::from(1 << 20);
    println!();
    println!(
        "remote: a {:.0} MiB layer (half random, half text) to Garage on loopback",
        mib(layer)
    );
    let raw = cost(&r["raw_read"]);
    let put = cost(&r["tar_put"]);
    let get = cost(&r["tar_get"]);
    let push = cost(&r["full_push"]);
    let restore = cost(&r["restore"]);
    raw.print("anchor: read every file of the layer", Some(layer));
    put.print(
        "anchor: one PUT of a tar of the layer",
        Some(u("tar_bytes")),
    );
    push.print("full push (send, chunk, zstd, encrypt, PUT)", Some(layer));
    get.print("anchor: one GET of the tar", Some(u("tar_bytes")));
    restore.print("restore: pull into btrfs receive", Some(layer));
    let incrementals: Vec<Cost> = r["incremental"]
        .as_array()
        .map(|a| a.iter().map(|i| cost(&i["cost"])).collect())
        .unwrap_or_default();
    let mut walls: Vec<f64> = incrementals.iter().map(|c| c.wall_ms).collect();
    walls.sort_by(f64::total_cmp);
    let p50 = crate::report::percentile(&walls, 0.5);
    if let Some(median) = incrementals.iter().find(|c| c.wall_ms == p50) {
        median.print("incremental push of a 1 MiB change (p50)", None);
    }
    let stored: Vec<u64> = r["incremental"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|i| i["stored_bytes"].as_u64())
                .collect()
        })
        .unwrap_or_default();
    println!();
    print_single(
        "ratio full push / PUT of the tar (time)",
        push.wall_ms / put.wall_ms,
        "x",
        "",
    );
    print_single(
        "ratio full push / read of the layer (time)",
        push.wall_ms / raw.wall_ms,
        "x",
        "",
    );
    print_single(
        "ratio restore / GET of the tar (time)",
        restore.wall_ms / get.wall_ms,
        "x",
        "",
    );
    print_single(
        "full push: stored, of the layer",
        mib(u("full_push_stored_bytes")),
        "MiB",
        "",
    );
    print_single(
        "incremental push: stored per 1 MiB change (p50)",
        mib({
            let mut s = stored.clone();
            s.sort_unstable();
            s.get(s.len() / 2).copied().unwrap_or(0)
        }),
        "MiB",
        "",
    );
    let dedup: Vec<u64> = r["dedup_stored_bytes"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_u64()).collect())
        .unwrap_or_default();
    if let (Some(first), Some(last)) = (dedup.first(), dedup.last()) {
        print_single(
            &format!(
                "dedup: stored for {} full checkpoints, 1% changed each",
                dedup.len()
            ),
            mib(*last),
            "MiB",
            "",
        );
        print_single(
            "  of which the first (one full copy)",
            mib(*first),
            "MiB",
            "",
        );
        print_single(
            "  ratio to one full copy",
            *last as f64 / *first as f64,
            "x",
            "",
        );
    }
}
