//! `hull`: the command-line tool for hulld and its inner container.

use std::path::PathBuf;

use anyhow::Result;
use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use hull_cli::cli::{self, AttachTo, ExecOptions, Global};
use hull_cli::config::ClientConfig;

#[derive(Parser)]
#[command(
    name = "hull",
    version,
    about = "Run and control hull: a daemon in the VM's root namespace and the inner container your code lives in",
    long_about = "hull runs your code in an inner container that can be bounced (killed and re-created on the same writable layer) in milliseconds, while hulld, its daemon, keeps running in the root namespace.\n\nStart with `hull up`, then `hull console` for a shell or `hull exec -- CMD` for one command."
)]
struct Cli {
    /// Config file (TOML); default /etc/hull/hull.toml when it exists.
    #[arg(long, global = true, env = "HULL_CONFIG")]
    config: Option<PathBuf>,
    /// hulld's control socket.
    #[arg(long, global = true, env = "HULL_SOCKET")]
    socket: Option<PathBuf>,
    /// hulld's state directory (writable layer, images, log).
    #[arg(long, global = true, env = "HULL_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    /// Drive a hulld elsewhere through its HTTP API (http://HOST:PORT or
    /// https://HOST:PORT) instead of the local control socket: status,
    /// exec, console, sessions, cp, bounce, checkpoint, services, logs,
    /// ports and ingress work the same, with the same output and exit codes.
    #[arg(long, global = true, env = "HULL_URL", value_name = "URL")]
    url: Option<String>,
    /// The API token for --url (see `hull token create` on the VM).
    #[arg(long, global = true, env = "HULL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A PEM file of certificates to trust for an https:// --url besides
    /// the system's (a self-signed certificate of the API).
    #[arg(long, global = true, env = "HULL_CACERT", value_name = "FILE")]
    cacert: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start hulld in the background and wait for the inner.
    ///
    /// Builds the base image first if it is missing; does nothing if hulld
    /// already runs.
    Up {
        /// Base image of the inner: debian (default) or busybox.
        #[arg(long)]
        image: Option<String>,
        /// The inner's network: nat (egress through a veth with masquerade, the default) or none (loopback only; ingress still works).
        #[arg(long, value_parser = hull_cli::config::parse_network_mode)]
        network: Option<hull_cli::config::NetworkMode>,
    },
    /// Show the inner's state, limits and usage.
    ///
    /// The inner's state, pid, uptime, limits and bounce count, and how
    /// much of its quota the writable layer uses.
    Status,
    /// Run a command in the inner.
    ///
    /// hull exits with the command's exit code: 127 when it is not found,
    /// 126 when it cannot run, 128+N when signal N killed it, 124 when
    /// --timeout passed, 125 when hull failed, 255 when the inner stopped
    /// under it.
    Exec {
        /// Allocate a terminal (PTY) for the command. Needs a terminal on
        /// stdin; without one, hull says so and runs with pipes.
        #[arg(short, long)]
        tty: bool,
        /// Stream this terminal's stdin to the command.
        #[arg(short, long)]
        interactive: bool,
        /// Set an environment variable (repeatable).
        #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Working directory inside the inner.
        #[arg(short, long, value_name = "DIR")]
        workdir: Option<String>,
        /// Run as this user of the inner (from its /etc/passwd).
        #[arg(short, long)]
        user: Option<String>,
        /// After the command exits, keep passing on output of processes it
        /// left behind that still hold its stdout/stderr for this long
        /// (500ms, 2s, 1m; default 2s); hull says on stderr when it cut
        /// output off.
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
        linger: Option<std::time::Duration>,
        /// Kill the command's process group after this long (500ms, 30s,
        /// 10m) and exit 124, as timeout(1) does.
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
        timeout: Option<std::time::Duration>,
        /// Keep nothing of this command in the `exec` log (by default a
        /// command without -t is logged: its argv, exit, duration and
        /// output, or size and SHA-256 of output that is not text).
        #[arg(long)]
        no_log: bool,
        /// Run the command in the background and print its id at once; its
        /// output is in `hull logs exec:ID` (add -f to follow it to its end).
        #[arg(short, long, conflicts_with_all = ["tty", "interactive", "no_log"])]
        detach: bool,
        /// The command and its arguments.
        #[arg(required = true, trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
    /// A login shell in the inner that outlives this terminal.
    ///
    /// Ctrl+\ detaches (the shell runs on) and `hull console --attach`
    /// comes back to it, with the screen as it was. When a bounce or
    /// restore stops the inner under it, hull resets the terminal and opens
    /// a new shell with a one-line notice.
    Console {
        /// Attach to a running console session instead of starting one:
        /// session ID, or without one the newest console session.
        #[arg(long, value_name = "ID", num_args = 0..=1, default_missing_value = "latest", value_parser = parse_attach)]
        attach: Option<AttachTo>,
        /// After a bounce or restore, reset the terminal and exit 255
        /// instead of opening a new shell.
        #[arg(long, conflicts_with = "reconnect")]
        once: bool,
        /// Open a new shell after a bounce or restore (the default; kept
        /// for scripts that pass it).
        #[arg(long, hide = true)]
        reconnect: bool,
    },
    /// List, attach to and kill exec sessions.
    ///
    /// Every exec is a session; one with a terminal runs on after its
    /// client goes, keeping its last output (up to 1 MiB) for whoever
    /// attaches next.
    Sessions {
        #[command(subcommand)]
        command: SessionsCommand,
    },
    /// Start a fresh inner on the same writable layer.
    ///
    /// Kills everything in the inner first: SIGTERM, then SIGKILL after
    /// the grace.
    Bounce {
        /// Seconds between SIGTERM and SIGKILL.
        #[arg(long, default_value_t = 0.0)]
        grace: f64,
    },
    /// Stop the inner and hulld, leaving no mounts, cgroups or processes behind.
    Down {
        /// Seconds between SIGTERM and SIGKILL for the inner's processes.
        #[arg(long, default_value_t = 2.0)]
        grace: f64,
    },
    /// Checkpoints of the writable layer: create, restore, list, delete, push.
    Checkpoint {
        #[command(subcommand)]
        command: CheckpointCommand,
    },
    /// Services: commands hull starts on every inner start and keeps running.
    Services {
        #[command(subcommand)]
        command: ServicesCommand,
    },
    /// Show a service's output, or the exec log.
    ///
    /// A service's output (or `exec` for non-interactive execs), kept by
    /// hulld across bounces, restores and crashes.
    Logs {
        /// The service, or `exec`.
        #[arg(required_unless_present = "daemon", conflicts_with = "daemon")]
        name: Option<String>,
        /// hulld's own log instead.
        #[arg(long)]
        daemon: bool,
        /// Keep printing new lines as they come, like tail -f: starts with the
        /// last 10 lines (or --tail N, or everything since --since).
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines (markers such as `-- web started (pid 42) --`
        /// count as lines).
        #[arg(long, value_name = "N")]
        tail: Option<u64>,
        /// Only stdout or only stderr.
        #[arg(long, value_parser = parse_stream)]
        stream: Option<hull_proto::Stream>,
        /// Only lines from the last DURATION (30s, 10m, 2h, 1d).
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
        since: Option<std::time::Duration>,
    },
    /// Copy files between this machine and the inner.
    ///
    /// One side is `:PATH`, a path in the inner: `hull cp ./a.txt
    /// :/tmp/a.txt`, `hull cp :/etc/os-release .`, `hull cp -r ./src
    /// :/app`. A directory as the destination takes the source under its
    /// own name; `-` is stdin or stdout. Files keep their permission bits
    /// and are put in place whole, or not at all; -r leaves symlinks and
    /// special files out and names them. Works through --url (with an
    /// exec token). Large copies show progress on a terminal.
    Cp {
        /// Copy a directory and all in it.
        #[arg(short, long)]
        recursive: bool,
        /// The file to copy: a local path, `:PATH` in the inner, or `-`.
        #[arg(value_name = "SRC")]
        source: String,
        /// Where it goes: a local path or directory, `:PATH` in the inner, or `-`.
        #[arg(value_name = "DST")]
        destination: String,
    },
    /// TCP ports the inner listens on and how to reach them.
    ///
    /// Who owns each (its pid inside the inner) and how it is reachable
    /// from outside: forwarded on the outer address, or through HTTP
    /// ingress only.
    Ports,
    /// Where HTTP ingress listens, and its private ports' token.
    ///
    /// Which ports are private, and the bearer token they need.
    Ingress,
    /// Show or set the egress policy: what the inner may reach.
    ///
    /// Which names and addresses. The Sprites form (`{"rules": [{"domain": "*.example.com", "action":
    /// "allow"}, {"include": "defaults"}]}`) with hull's `cidr` rules and
    /// `default`; see docs/guide/network.md. A new policy is enforced
    /// before `set` returns.
    Policy {
        #[command(subcommand)]
        command: PolicyCommand,
    },
    /// Make, list and revoke tokens for the HTTP API.
    ///
    /// The HTTP API speaks the Sprites v1 API; it serves no request until
    /// a token exists.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// Base images for the inner.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Build, boot and stop a hull VM.
    ///
    /// Its image is a Debian cloud kernel and an initramfs with hull's
    /// init, hulld and the busybox base image; it boots under QEMU with
    /// hulld's HTTP API forwarded to this machine.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// The policy as it was set (nothing set: the inner may reach anything).
    Show,
    /// Replace the policy with the JSON in FILE (`-` for standard input).
    Set {
        #[arg(value_name = "FILE")]
        file: String,
    },
}

#[derive(Subcommand)]
enum VmCommand {
    /// Build the VM image into DIR.
    ///
    /// `vmlinuz`, `initramfs.img` and `manifest.json` (its inputs and
    /// their SHA-256). Downloads Debian's
    /// linux-image-cloud-amd64 with apt-get; hull-init, hulld and hull are
    /// the binaries next to this one. The same inputs reuse the cached
    /// build. Progress on stderr; the directory (or --json) on stdout.
    Build {
        /// The image directory.
        #[arg(long, value_name = "DIR", default_value = cli::vm::DEFAULT_DIR)]
        out: PathBuf,
        /// Downloads, the extracted kernel, the base image and finished
        /// builds.
        #[arg(long, value_name = "DIR", default_value = cli::vm::DEFAULT_CACHE)]
        cache: PathBuf,
    },
    /// Boot the image in DIR under QEMU, in the background.
    ///
    /// TCG; the serial console in DIR/console.log, QEMU's pid in
    /// DIR/qemu.pid, QMP at DIR/qmp.sock, the data disk DIR/data.img (made
    /// empty when missing and formatted btrfs by the VM at first boot).
    /// Returns once hulld's HTTP API answers on 127.0.0.1:PORT, then
    /// prints HULL_URL and HULL_TOKEN (an admin token made for this run)
    /// and writes them to DIR/api.env (mode 0600), so that
    /// `set -a; . DIR/api.env; hull exec ...` drives the VM. The token
    /// never enters the VM: only its hash does.
    Run {
        /// The image directory (from `hull vm build`).
        #[arg(default_value = cli::vm::DEFAULT_DIR)]
        dir: PathBuf,
        /// The VM's memory (QEMU's -m).
        #[arg(long, default_value = "1G")]
        memory: String,
        /// Virtual CPUs (QEMU's -smp).
        #[arg(long, default_value_t = 2)]
        cpus: u32,
        /// The port on 127.0.0.1 forwarded to hulld's API in the VM.
        #[arg(long, value_name = "PORT", default_value_t = 7700)]
        api_port: u16,
        /// Also forward this port on 127.0.0.1 to the VM's HTTP ingress.
        #[arg(long, value_name = "PORT")]
        http_port: Option<u16>,
        /// The size of the data disk when this run makes it ("8G").
        #[arg(long, value_name = "SIZE", default_value = "8G", value_parser = cli::vm::parse_disk_size)]
        disk_size: u64,
        /// QEMU's machine: pc, or microvm (virtio-mmio, no PCI), where
        /// Debian 6.1's cloud kernel hangs calibrating its clock under TCG.
        #[arg(long, default_value = "pc")]
        machine: hull_image::vm::qemu::Machine,
        /// The accelerator: kvm, tcg, or auto: KVM where the kernel is
        /// seen to boot under it on this host (probed once per host boot),
        /// else TCG.
        #[arg(long, default_value = "auto")]
        accel: hull_image::vm::accel::AccelChoice,
        /// Give up (and kill QEMU) when the API has not answered by then.
        #[arg(long, value_name = "DURATION", default_value = "120s", value_parser = cli::parse_duration)]
        timeout: std::time::Duration,
        /// Kernel arguments to add after hull's own (`console=ttyS0`, `ip=`),
        /// as QEMU's -append takes them; repeatable. The kernel and
        /// hull-init take the last of a repeated one. hull-init reads
        /// `hull.cgroup=PATH`: start hulld in the cgroup PATH, created with
        /// its ancestors' controllers, as systemd starts a unit with
        /// Delegate=yes (`--append hull.cgroup=/system.slice/hull.service`).
        #[arg(long, value_name = "ARGS")]
        append: Vec<String>,
        /// Boot with `ip=dhcp`: hull-init asks QEMU's DHCP server for
        /// eth0's address (10.0.2.15 via 10.0.2.2, as the static default).
        #[arg(long)]
        dhcp: bool,
    },
    /// Shut the VM in DIR down cleanly.
    ///
    /// Ctrl-alt-del over QMP, which
    /// hull-init turns into stopping hulld, syncing, unmounting and a
    /// power-off; waits for QEMU to exit (told to quit after --timeout).
    Stop {
        #[arg(default_value = cli::vm::DEFAULT_DIR)]
        dir: PathBuf,
        #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = cli::parse_duration)]
        timeout: std::time::Duration,
    },
    /// Whether the VM in DIR runs, and its API answers.
    ///
    /// QEMU's pid, the API's URL and whether it answers.
    Status {
        #[arg(default_value = cli::vm::DEFAULT_DIR)]
        dir: PathBuf,
    },
    /// Follow the VM's serial console.
    ///
    /// Prints DIR/console.log (kernel, hull-init's timed boot steps,
    /// hulld's log) and what follows while QEMU runs; read-only: drive
    /// the VM through its API. --no-follow prints what is there and exits.
    Console {
        #[arg(default_value = cli::vm::DEFAULT_DIR)]
        dir: PathBuf,
        /// Print what the console holds now and exit.
        #[arg(long)]
        no_follow: bool,
    },
}

#[derive(Subcommand)]
enum SessionsCommand {
    /// The running sessions.
    ///
    /// Id, pid, terminal or not, clients attached, age, idle time and
    /// command of each.
    List,
    /// Attach this terminal to session ID.
    ///
    /// Its scrollback first, then the session live; hull exits with its
    /// exit code. Ctrl+\ detaches from a terminal session.
    Attach {
        id: u64,
        /// Only watch: leave the writer's role (stdin, resizes) to the
        /// client that has it.
        #[arg(long)]
        watch: bool,
    },
    /// Signal session ID's process and wait for its end.
    ///
    /// SIGKILL follows if the session has not ended after --timeout.
    Kill {
        id: u64,
        /// The signal: a name (SIGTERM, TERM, HUP) or a number.
        #[arg(long, short, default_value = "SIGTERM", value_parser = parse_signal)]
        signal: i32,
        /// How long to wait before SIGKILL (500ms, 10s).
        #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = cli::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn parse_attach(s: &str) -> Result<AttachTo, String> {
    match s {
        "latest" => Ok(AttachTo::LatestConsole),
        id => id
            .parse()
            .map(AttachTo::Id)
            .map_err(|_| format!("--attach takes a session id (a number), not {id:?}")),
    }
}

fn parse_signal(s: &str) -> Result<i32, String> {
    hull_proto::signal_number(s)
        .ok_or_else(|| format!("unknown signal {s:?}: use a name like SIGTERM or HUP, or a number"))
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Make a token and print it, the only time it is shown.
    ///
    /// hulld keeps a hash of it. Send it as `Authorization: Bearer TOKEN`,
    /// or give it to a Sprites SDK as its token.
    Create {
        /// What it lets its bearer do: read (status and lists, service
        /// environments redacted), exec (also commands, sessions, logs and
        /// files) or admin (also checkpoints, restores, services, policy).
        #[arg(long, value_parser = parse_scope)]
        scope: hull_proto::TokenScope,
        /// It expires after DURATION (30m, 24h, 7d); never when absent.
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
        ttl: Option<std::time::Duration>,
        /// A name to recognise it by in `hull token list`.
        #[arg(long)]
        name: Option<String>,
    },
    /// The tokens: id, scope, name, when made and when they expire.
    List,
    /// Revoke token ID: requests with it are refused at once.
    Revoke { id: String },
}

fn parse_scope(text: &str) -> Result<hull_proto::TokenScope, String> {
    text.parse()
}

#[derive(Subcommand)]
enum CheckpointCommand {
    /// Snapshot the writable layer (the inner is frozen for a few milliseconds).
    Create {
        /// A comment to recognise it by.
        #[arg(short, long)]
        message: Option<String>,
    },
    /// Bring the writable layer back to checkpoint ID.
    ///
    /// The inner restarts on it. The state before the restore is kept as
    /// an automatic checkpoint.
    Restore {
        /// The checkpoint (v1, v2, ...; see `hull checkpoint list`).
        id: String,
    },
    /// Show the checkpoints as a tree.
    ///
    /// `*` marks the one the current state came from.
    List,
    /// Delete checkpoint ID (any of them; the tree keeps its shape).
    Delete {
        /// The checkpoint (v1, v2, ...; see `hull checkpoint list`).
        id: String,
    },
    /// Push checkpoint ID to the remote now, and wait for it.
    ///
    /// The remote is `[remote]` in hull.toml. Every checkpoint is pushed in
    /// the background anyway; this shows the progress and waits.
    Push {
        /// The checkpoint; the newest when left out.
        id: Option<String>,
    },
}

#[derive(Subcommand)]
enum ServicesCommand {
    /// Register a service; it starts now and after every bounce and restore.
    Add {
        /// Its name (1-64 letters, digits, '-', '_', '.'), also the name of its log.
        name: String,
        /// The command, run with /bin/sh -c.
        #[arg(long)]
        cmd: String,
        /// Environment variable (repeatable).
        #[arg(short, long = "env", value_name = "K=V", value_parser = parse_env)]
        env: Vec<(String, String)>,
        /// Working directory inside the inner (default /).
        #[arg(long, value_name = "DIR")]
        cwd: Option<String>,
        /// Run as this user of the inner.
        #[arg(long)]
        user: Option<String>,
        /// The port it serves HTTP on; services after it wait until it listens.
        #[arg(long)]
        http_port: Option<u16>,
        /// What happens after it exits on a running inner: always, on-failure
        /// (default: restarted when it exits with a non-zero code or a
        /// signal) or never. Whatever the policy, every new inner (start,
        /// bounce, restore) starts it again; "never" only means it is not
        /// restarted after it exits.
        #[arg(long, default_value = "on-failure")]
        restart: hull_proto::RestartPolicy,
        /// Start only once this service runs (repeatable).
        #[arg(long)]
        after: Vec<String>,
    },
    /// Every service's state.
    ///
    /// State, pid, uptime, restarts (after exits), starts (on new inners)
    /// and last exit of each.
    List,
    /// Everything about one service, with its last output lines.
    Show {
        /// The service.
        name: String,
    },
    /// Start a stopped or failed service (it stays registered either way).
    Start {
        /// The service.
        name: String,
    },
    /// Stop a service until `start`, across bounces too.
    ///
    /// SIGTERM to its process group, SIGKILL after 5 s (or --timeout).
    Stop {
        /// The service.
        name: String,
        /// Time between SIGTERM and SIGKILL (0 kills at once), e.g. 30s.
        #[arg(long, value_name = "DURATION", value_parser = cli::parse_duration)]
        timeout: Option<std::time::Duration>,
    },
    /// Stop it (as `stop` does), then start it again.
    Restart {
        /// The service.
        name: String,
    },
    /// Stop and unregister.
    Remove {
        /// The service.
        name: String,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build a base image (cached: only rebuilt with --rebuild).
    Build {
        /// busybox (seconds, for tests) or debian (debootstrap minbase).
        #[arg(long)]
        kind: Option<String>,
        /// Build it again even when it is already built.
        #[arg(long)]
        rebuild: bool,
    },
}

fn parse_stream(s: &str) -> Result<hull_proto::Stream, String> {
    match s {
        "stdout" => Ok(hull_proto::Stream::Stdout),
        "stderr" => Ok(hull_proto::Stream::Stderr),
        other => Err(format!("{other:?}: expected stdout or stderr")),
    }
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not K=V")),
    }
}

fn global(
    cli: &Cli,
    image: Option<&String>,
    network: Option<hull_cli::config::NetworkMode>,
) -> Result<(Global, Vec<String>)> {
    let mut config = ClientConfig::load(cli.config.as_deref())?;
    let mut hulld_args = Vec::new();
    if let Some(path) = &cli.config {
        hulld_args.extend(["--config".to_string(), path.display().to_string()]);
    }
    if let Some(socket) = &cli.socket {
        config.socket = socket.clone();
        hulld_args.extend(["--socket".to_string(), socket.display().to_string()]);
    }
    if let Some(dir) = &cli.state_dir {
        config.state_dir = dir.clone();
        hulld_args.extend(["--state-dir".to_string(), dir.display().to_string()]);
    }
    if let Some(image) = image {
        config.image = image.clone();
        hulld_args.extend(["--image".to_string(), image.clone()]);
    }
    if let Some(mode) = network {
        hulld_args.extend(["--network".to_string(), mode.name().to_string()]);
    }
    let remote = match (&cli.url, &cli.token) {
        (Some(url), Some(token)) => Some(hull_cli::client::Remote {
            url: url.clone(),
            token: token.clone(),
            ca_file: cli.cacert.clone(),
        }),
        (Some(_), None) => anyhow::bail!(cli::CliError::NoToken),
        (None, _) => None,
    };
    let g = Global {
        config_path: cli.config.clone(),
        config,
        json: cli.json,
        remote,
    };
    Ok((g, hulld_args))
}

/// Parses the command line. Inside the inner, help offers only what works
/// there.
fn parse() -> Result<Cli, clap::Error> {
    let mut command = Cli::command();
    if cli::in_inner() {
        let about = "hull inside the inner: register and control services, and see the inner's ports and the URLs that reach them (every other command runs from the VM)";
        command = command.about(about).long_about(about);
        for name in cli::VM_ONLY_COMMANDS {
            command = command.mut_subcommand(name, |c| c.hide(true));
        }
    }
    Cli::from_arg_matches_mut(&mut command.try_get_matches()?)
}

/// The subcommand named on the command line, if any: the first word that
/// is neither an option nor the value of a global option.
fn subcommand_named() -> Option<String> {
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "--socket" | "--state-dir" | "--url" | "--token" | "--cacert" => {
                args.next();
            }
            a if a.starts_with('-') => {}
            a => return Some(a.to_string()),
        }
    }
    None
}

/// Exits for a command line clap refused: 2 (125 for `exec` and `console`,
/// whose other codes are the command's), with one JSON object under
/// `--json`.
fn usage_error(e: clap::Error) -> ! {
    let code = match subcommand_named().as_deref() {
        Some("exec" | "console") => cli::HULL_FAILED,
        _ => e.exit_code(),
    };
    if std::env::args_os().any(|a| a == "--json") {
        let text = e.to_string();
        let first = text.lines().next().unwrap_or_default();
        cli::report_error(true, "usage", first.trim_start_matches("error: "));
    } else {
        let _ = e.print();
    }
    std::process::exit(code);
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let cli = match parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => usage_error(e),
        // --help and --version.
        Err(e) => e.exit(),
    };
    let (json, runs_command) = (
        cli.json,
        matches!(
            cli.command,
            Command::Exec { .. }
                | Command::Console { .. }
                | Command::Sessions {
                    command: SessionsCommand::Attach { .. }
                }
        ),
    );
    let code = match run(cli).await {
        Ok(code) => code,
        Err(e) => cli::fail(&e, json, runs_command),
    };
    cli::flush_stdout();
    std::process::exit(code);
}

async fn run(cli: Cli) -> Result<i32> {
    let (image, network) = match &cli.command {
        Command::Up { image, network } => (image.as_ref(), *network),
        _ => (None, None),
    };
    let (g, hulld_args) = global(&cli, image, network)?;
    if g.remote.is_some() {
        let local_only = match &cli.command {
            Command::Up { .. } => Some("up"),
            Command::Down { .. } => Some("down"),
            Command::Image { .. } => Some("image"),
            // `hull vm` drives QEMU on this machine and never uses the URL:
            // the HULL_URL that sourcing DIR/api.env sets is no mistake.
            Command::Token { .. } => Some("token"),
            _ => None,
        };
        if let Some(command) = local_only {
            anyhow::bail!(cli::CliError::LocalOnly(command));
        }
    }
    if cli::in_inner() {
        match &cli.command {
            Command::Up { .. } => anyhow::bail!(cli::CliError::NotInInner("up")),
            Command::Image { .. } => anyhow::bail!(cli::CliError::NotInInner("image")),
            Command::Vm { .. } => anyhow::bail!(cli::CliError::NotInInner("vm")),
            _ => {}
        }
    }
    match cli.command {
        Command::Up { .. } => cli::up(&g, hulld_args).await.map(|()| 0),
        Command::Status => cli::status(&g).await.map(|()| 0),
        Command::Exec {
            tty,
            interactive,
            env,
            workdir,
            user,
            linger,
            timeout,
            no_log,
            detach,
            command,
        } => {
            let opts = ExecOptions {
                argv: command,
                env,
                cwd: workdir,
                user,
                tty,
                interactive,
                linger,
                timeout,
                no_log,
                detach,
                reconnect: false,
                attach: None,
                writer: true,
                detach_key: false,
            };
            cli::exec(&g, opts).await
        }
        Command::Console {
            attach,
            once,
            reconnect: _,
        } => cli::exec(&g, cli::console_options(attach, !once)).await,
        Command::Sessions { command } => match command {
            SessionsCommand::List => cli::sessions_list(&g).await.map(|()| 0),
            SessionsCommand::Attach { id, watch } => cli::sessions_attach(&g, id, !watch).await,
            SessionsCommand::Kill {
                id,
                signal,
                timeout,
            } => cli::sessions_kill(&g, id, signal, timeout)
                .await
                .map(|()| 0),
        },
        Command::Cp {
            recursive,
            source,
            destination,
        } => cli::cp(&g, &source, &destination, recursive)
            .await
            .map(|()| 0),
        Command::Ports => cli::ports(&g).await.map(|()| 0),
        Command::Ingress => cli::ingress(&g).await.map(|()| 0),
        Command::Policy { command } => match command {
            PolicyCommand::Show => cli::policy_show(&g).await,
            PolicyCommand::Set { file } => cli::policy_set(&g, &file).await,
        }
        .map(|()| 0),
        Command::Bounce { grace } => cli::bounce(&g, grace).await.map(|()| 0),
        Command::Down { grace } => cli::down(&g, grace).await.map(|()| 0),
        Command::Token { command } => match command {
            TokenCommand::Create { scope, ttl, name } => {
                cli::token_create(&g, scope, ttl, name).await
            }
            TokenCommand::List => cli::token_list(&g).await,
            TokenCommand::Revoke { id } => cli::token_revoke(&g, &id).await,
        }
        .map(|()| 0),
        Command::Checkpoint { command } => match command {
            CheckpointCommand::Create { message } => cli::checkpoint_create(&g, message).await,
            CheckpointCommand::Restore { id } => cli::checkpoint_restore(&g, &id).await,
            CheckpointCommand::List => cli::checkpoint_list(&g).await,
            CheckpointCommand::Delete { id } => cli::checkpoint_delete(&g, &id).await,
            CheckpointCommand::Push { id } => cli::checkpoint_push(&g, id).await,
        }
        .map(|()| 0),
        Command::Services { command } => {
            use hull_proto::ServiceRequest as R;
            let request = match command {
                ServicesCommand::Add {
                    name,
                    cmd,
                    env,
                    cwd,
                    user,
                    http_port,
                    restart,
                    after,
                } => R::Add(hull_proto::ServiceSpec {
                    name,
                    cmd,
                    env,
                    cwd,
                    user,
                    http_port,
                    restart,
                    after,
                }),
                ServicesCommand::List => R::List,
                ServicesCommand::Show { name } => R::Show(name),
                ServicesCommand::Start { name } => R::Start(name),
                ServicesCommand::Stop {
                    name,
                    timeout: None,
                } => R::Stop(name),
                ServicesCommand::Stop {
                    name,
                    timeout: Some(t),
                } => R::StopWithin {
                    name,
                    timeout_ms: u64::try_from(t.as_millis()).unwrap_or(u64::MAX),
                },
                ServicesCommand::Restart { name } => R::Restart(name),
                ServicesCommand::Remove { name } => R::Remove(name),
            };
            cli::services(&g, request).await.map(|()| 0)
        }
        Command::Logs {
            name,
            daemon,
            follow,
            tail,
            stream,
            since,
        } => cli::logs(
            &g,
            if daemon {
                hull_proto::DAEMON_SOURCE.to_string()
            } else {
                name.unwrap_or_default()
            },
            follow,
            tail,
            stream,
            since,
        )
        .await
        .map(|()| 0),
        Command::Image {
            command: ImageCommand::Build { kind, rebuild },
        } => cli::image_build(&g, kind, rebuild).map(|()| 0),
        Command::Vm { command } => match command {
            VmCommand::Build { out, cache } => cli::vm::build(&g, out, cache),
            VmCommand::Run {
                dir,
                memory,
                cpus,
                api_port,
                http_port,
                disk_size,
                machine,
                accel,
                timeout,
                append,
                dhcp,
            } => cli::vm::run(
                &g,
                cli::vm::RunArgs {
                    dir,
                    memory,
                    cpus,
                    http_port,
                    disk_size,
                    api_port,
                    machine,
                    accel,
                    timeout,
                    append,
                    dhcp,
                },
            ),
            VmCommand::Stop { dir, timeout } => cli::vm::stop(&g, dir, timeout),
            VmCommand::Status { dir } => cli::vm::status(&g, dir),
            VmCommand::Console { dir, no_follow } => cli::vm::console(&dir, !no_follow),
        }
        .map(|()| 0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// `hull --help` is a table of contents: one short line a command (and
    /// a subcommand), the detail in the command's own `--help`.
    #[test]
    fn every_command_has_a_one_line_summary() {
        fn walk(cmd: &clap::Command, path: &str, long: &mut Vec<String>) {
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                let about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
                if about.is_empty() || about.len() > 72 || about.contains('\n') {
                    long.push(format!("{name}: {about:?} ({} chars)", about.len()));
                }
                walk(sub, &name, long);
            }
        }
        let mut long = Vec::new();
        walk(&Cli::command(), "hull", &mut long);
        assert!(
            long.is_empty(),
            "summaries past one short line:\n{}",
            long.join("\n")
        );
    }
}
