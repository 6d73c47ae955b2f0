//! `hulld`: the root-namespace daemon. Started by `hull up`, or as a
//! service of the VM.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use hull_outer::config::{Config, LogFormat, NetworkMode};
use hull_outer::launch::HELPER_ARG;

#[derive(Parser)]
#[command(
    name = "hulld",
    version,
    about = "hull's daemon: owns the inner container, its storage and the control API"
)]
struct Args {
    /// Config file (TOML); default /etc/hull/hull.toml when it exists.
    #[arg(long, env = "HULL_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long)]
    socket: Option<PathBuf>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Base image: debian or busybox.
    #[arg(long)]
    image: Option<String>,
    /// Also serve the control API on this vsock port.
    #[arg(long)]
    vsock_port: Option<u32>,
    /// The inner's network: nat (veth and masquerade, the default) or none (loopback only).
    #[arg(long, value_parser = parse_network)]
    network: Option<NetworkMode>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
}

fn main() {
    // The helper must stay single-threaded: branch off before anything
    // (tokio, tracing) can start a thread.
    let mut argv = std::env::args_os();
    let role = argv.nth(1);
    if role
        .as_ref()
        .is_some_and(|a| a == hull_outer::files_writer::FILES_WRITER_ARG)
    {
        std::process::exit(hull_outer::files_writer::run());
    }
    if role.is_some_and(|a| a == HELPER_ARG) {
        let mut spec = String::new();
        if let Err(e) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut spec) {
            eprintln!("hull-inner-helper: cannot read the inner spec from stdin: {e}");
            std::process::exit(1);
        }
        match hull_inner::helper::run(&spec) {
            Ok(()) => std::process::exit(0),
            Err(e) => {
                eprintln!("hull-inner-helper: {}", hull_outer::error_chain(&e));
                std::process::exit(1);
            }
        }
    }
    fix_mmap_threshold();
    if let Err(e) = daemon_main() {
        eprintln!("hulld: {}", hull_outer::error_chain(e.as_ref()));
        std::process::exit(1);
    }
}

/// Allocations of 128 KiB and more get pages of their own, given back
/// when freed. glibc raises that threshold as large blocks are freed (up
/// to 32 MiB), after which a burst of large request frames and answers is
/// served from the heap and stays in hulld's RSS long after it is freed;
/// setting the threshold keeps it fixed.
fn fix_mmap_threshold() {
    // SAFETY: mallopt only sets a tunable of glibc's allocator; it is
    // called before any other thread exists.
    if unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024) } == 0 {
        eprintln!("hulld: cannot fix malloc's mmap threshold; memory may stay high after bursts");
    }
}

/// stderr (human or JSON, as configured) and, as plain text, the log
/// store's `hulld` source, which `hull logs --daemon` reads.
fn init_tracing(format: LogFormat) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{fmt, EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("HULL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let stderr = match format {
        LogFormat::Json => fmt::layer()
            .json()
            .with_writer(hull_logs::EventWriter::stderr)
            .boxed(),
        LogFormat::Human => fmt::layer()
            .with_writer(hull_logs::EventWriter::stderr)
            .boxed(),
    };
    let store = fmt::layer()
        .with_ansi(false)
        .with_writer(hull_logs::EventWriter::daemon_log);
    tracing_subscriber::registry()
        .with(filter)
        .with(stderr)
        .with(store)
        .init();
}

fn parse_network(s: &str) -> Result<NetworkMode, String> {
    hull_outer::config::parse_network_mode(s)
}

fn daemon_main() -> Result<()> {
    let args = Args::parse();
    let mut config = Config::load(args.config.as_deref())?;
    if let Some(s) = args.socket {
        config.socket = s;
    }
    if let Some(d) = args.state_dir {
        config.state_dir = d;
    }
    if let Some(i) = args.image {
        config.image = i;
    }
    if args.vsock_port.is_some() {
        config.vsock_port = args.vsock_port;
    }
    if let Some(mode) = args.network {
        config.network.mode = mode;
    }
    if args.log_json {
        config.log_format = LogFormat::Json;
    }
    init_tracing(config.log_format);
    // Every bad value is reported here, before anything starts.
    let settings = config.resolve()?;
    // `hull up` sends stderr to hulld.log: rotated and capped like a source.
    hull_logs::cap_stderr(settings.logs.limits);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(hull_outer::daemon::run(settings))?;
    Ok(())
}
