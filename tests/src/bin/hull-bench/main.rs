//! hull's benchmarks, each suite against an anchor measured the same way in
//! the same run. Run as root, release build:
//!
//!     cargo build --release --workspace --bins
//!     sudo ./target/release/hull-bench start         # cold start, exec, bounce, RSS, each isolation's cost; runc as the anchor
//!     sudo ./target/release/hull-bench checkpoints   # the storage stack
//!     sudo ./target/release/hull-bench services      # service replay
//!     sudo ./target/release/hull-bench logs          # log capture throughput
//!     sudo ./target/release/hull-bench ingress       # forwarding and HTTP ingress vs direct, nginx, HAProxy
//!     sudo ./target/release/hull-bench responsiveness  # status latency during a dirty checkpoint and a big kill
//!     sudo ./target/release/hull-bench bounds        # hulld's peak RSS and status latency under each attack of the escape tests
//!     sudo ./target/release/hull-bench api           # exec over the HTTP API vs the unix socket, time to first output
//!     sudo ./target/release/hull-bench files         # 1 GiB through the files API vs cat through exec
//!     sudo ./target/release/hull-bench sessions      # hulld's RSS with 1,000 idle terminal sessions attached
//!     sudo ./target/release/hull-bench vm            # the hull VM under QEMU: boot timeline, a busybox init, memory, image size, exec
//!     sudo ./target/release/hull-bench remote        # checkpoints pushed to and restored from Garage on loopback, against the server's own PUT and GET
//!
//! hulld runs at its default log level (info) unless HULL_LOG says otherwise.

mod api;
mod bounds;
mod checkpoints;
mod files;
mod ingress;
mod logs;
mod remote;
mod report;
mod responsiveness;
mod services;
mod sessions;
mod start;
mod vm;

use anyhow::{bail, Result};
use clap::{Args, Parser, Subcommand};
use hull_tests::require_root;

/// hull's benchmarks (as root, on a release build). Without a suite, the
/// start suite runs.
#[derive(Parser)]
#[command(name = "hull-bench", args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    suite: Option<Suite>,
    #[command(flatten)]
    start: StartArgs,
}

#[derive(Subcommand)]
enum Suite {
    /// Inner cold start, exec round-trip, bounce and hulld's idle memory,
    /// against `runc run` (apt-get install runc), with the user namespace
    /// and the seccomp filter on, then without the namespace, then
    /// without both: what each costs.
    Start(StartArgs),
    /// Checkpoint create (empty, right after an unsynced 1 GiB write,
    /// 1 GiB, 100k files) and restore, against `cp -a`.
    Checkpoints(CheckpointArgs),
    /// Bounce and restore until the registered services run.
    Services(Rounds),
    /// Log capture throughput, lines lost and hulld's peak memory.
    Logs(LogArgs),
    /// TCP forwarding and HTTP ingress against a direct connection, and
    /// against nginx and HAProxy with each proxy on a CPU of its own
    /// (apt-get install wrk nginx haproxy).
    Ingress(IngressArgs),
    /// `hull status` latency while a checkpoint of 512 MiB of unsynced
    /// writes and a bounce of a 4,000-process inner run, against the same
    /// call on an idle hulld.
    Responsiveness(Rounds),
    /// hulld's peak RSS and `status` latency under each attack the escape
    /// tests mount (the inner's floods of its socket and ports, huge
    /// frames through the API's tunnel, oversized and many service
    /// definitions, detached terminal sessions, exec clients that never
    /// read), each on a hulld of its own, against an idle hulld. Targets:
    /// peak RSS <= 64 MiB, status p99 <= 50 ms.
    Bounds(Rounds),
    /// Exec `true` over the HTTP API (a new WebSocket each time, and a
    /// kept control connection) against a new unix-socket connection, and
    /// the time from a request to the first output of `echo hi`.
    Api(Rounds),
    /// A file written and read back through the HTTP API's files routes,
    /// against `cat` through `hull exec` (stdin to the file, the file to
    /// stdout).
    Files(FileArgs),
    /// hulld's RSS before and with idle terminal sessions, a client
    /// attached to each, and the cost of one.
    Sessions(SessionArgs),
    /// The hull VM under QEMU (`hull vm build`, `hull vm run`; TCG on a
    /// host without KVM): the boot's timeline off the serial console and
    /// hull's share of it, hull-init's mounts against a busybox shell's
    /// as /init booted the same way, the guest's idle memory, the image's
    /// size compressed, and exec through the forwarded API against a
    /// local hulld's. Targets: hull's share <= 50 ms on KVM, idle memory
    /// <= 96 MiB, image <= 64 MiB compressed.
    Vm(VmArgs),
    /// Checkpoints of a layer (half random, half text) pushed to Garage
    /// on loopback, started by the bench: a full push against a read of
    /// the layer and one PUT of a tar of it to the same server, an
    /// incremental push of a 1 MiB change, a restore (pull into btrfs
    /// receive) against one GET of the tar, and what ten checkpoints
    /// changing 1% each store against one full copy; CPU time of each.
    Remote(RemoteArgs),
}

#[derive(Args)]
struct RemoteArgs {
    /// The layer's size in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// Incremental pushes of a 1 MiB change.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    rounds: u64,
    /// Checkpoints of the dedup figure.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    dedup_checkpoints: u64,
    /// Print the figures as JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct VmArgs {
    /// Boots of the VM, each followed by one of the busybox anchor: the
    /// first of an empty data disk, the next of the same disk after a
    /// clean stop. Memory and exec are measured in the last.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..))]
    boots: u64,
    /// Exec round trips each way.
    #[arg(long, default_value_t = 50)]
    execs: usize,
    /// Samples of the guest's idle memory, a second apart.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    memory_samples: u64,
    /// The zstd level the initramfs is compressed with.
    #[arg(long, default_value_t = 19, value_parser = clap::value_parser!(i32).range(1..=22))]
    zstd_level: i32,
    /// Print the figures as JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// A kernel argument for the VM and the anchor (`hull vm run
    /// --append`), e.g. transparent_hugepage=never; repeatable.
    #[arg(long, value_name = "ARG")]
    append: Vec<String>,
}

#[derive(Args)]
struct FileArgs {
    /// Rounds of writing and reading the file each way.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The file's size in MiB.
    #[arg(long, default_value_t = 1024)]
    mib: u64,
    /// A 64 MiB file, one round: a check that it runs, not a figure.
    #[arg(long)]
    quick: bool,
}

#[derive(Args)]
struct SessionArgs {
    /// Sessions held open at once.
    #[arg(long, default_value_t = 1000)]
    sessions: usize,
}

#[derive(Args)]
struct Rounds {
    /// Samples per row.
    #[arg(long, default_value_t = 50)]
    rounds: usize,
}

#[derive(Args)]
struct StartArgs {
    #[command(flatten)]
    rounds: Rounds,
    /// Exec round-trips per exec row.
    #[arg(long, default_value_t = 300)]
    execs: usize,
}

#[derive(Args)]
struct CheckpointArgs {
    #[command(flatten)]
    rounds: Rounds,
    /// Rounds of writing 1 GiB and checkpointing right after, with the
    /// volume's dirty data bounded and then unbounded.
    #[arg(long, default_value_t = 10)]
    dirty_rounds: usize,
}

#[derive(Args)]
struct LogArgs {
    /// Lines the service writes.
    #[arg(long, default_value_t = 2_000_000)]
    lines: u64,
}

#[derive(Args)]
struct IngressArgs {
    #[command(flatten)]
    rounds: Rounds,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    wrk_secs: usize,
    /// wrk runs per path; each row is the median run.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..))]
    wrk_runs: u64,
    /// Run hulld with `network.forward_in_kernel` (the sockmap relay).
    #[arg(long)]
    forward_in_kernel: bool,
}

/// The suites were flags before they were subcommands; a script that
/// still passes one learns the new spelling instead of a generic error.
fn reject_old_flags() {
    for arg in std::env::args().skip(1) {
        if let Some(suite) = arg.strip_prefix("--").filter(|s| {
            [
                "start",
                "checkpoints",
                "services",
                "logs",
                "ingress",
                "responsiveness",
                "bounds",
                "api",
                "files",
                "sessions",
            ]
            .contains(s)
        }) {
            eprintln!("error: `{arg}` is now a subcommand: hull-bench {suite} [OPTIONS] (see hull-bench --help)");
            // clap's exit code for a usage error.
            std::process::exit(2);
        }
    }
}

fn main() -> Result<()> {
    reject_old_flags();
    let cli = Cli::parse();
    if !require_root() {
        bail!("hull-bench needs root");
    }
    // hulld's default level: debug logging of every request is not what a
    // user runs.
    if std::env::var_os("HULL_LOG").is_none() {
        std::env::set_var("HULL_LOG", "info");
    }
    match cli.suite {
        None => start::run(cli.start.rounds.rounds, cli.start.execs),
        Some(Suite::Start(a)) => start::run(a.rounds.rounds, a.execs),
        Some(Suite::Checkpoints(a)) => checkpoints::run(a.rounds.rounds, a.dirty_rounds),
        Some(Suite::Services(a)) => services::run(a.rounds),
        Some(Suite::Responsiveness(a)) => responsiveness::run(a.rounds),
        Some(Suite::Bounds(a)) => bounds::run(a.rounds),
        Some(Suite::Api(a)) => api::run(a.rounds),
        Some(Suite::Logs(a)) => logs::run(a.lines),
        Some(Suite::Files(a)) if a.quick => files::run(64, 1),
        Some(Suite::Files(a)) => files::run(a.mib, a.rounds),
        Some(Suite::Sessions(a)) => sessions::run(a.sessions),
        Some(Suite::Vm(a)) => vm::run(&vm::Options {
            boots: usize::try_from(a.boots)?,
            execs: a.execs,
            memory_samples: usize::try_from(a.memory_samples)?,
            zstd_level: a.zstd_level,
            json: a.json,
            append: a.append,
        }),
        Some(Suite::Remote(a)) => remote::run(&remote::Options {
            mib: a.mib,
            rounds: usize::try_from(a.rounds)?,
            dedup_checkpoints: usize::try_from(a.dedup_checkpoints)?,
            json: a.json,
        }),
        Some(Suite::Ingress(a)) => ingress::run(
            a.rounds.rounds,
            ingress::WrkOptions {
                secs: a.wrk_secs,
                runs: usize::try_from(a.wrk_runs)?,
                forward_in_kernel: a.forward_in_kernel,
            },
        ),
    }
}
