//! The harness of hull's end-to-end tests: a real hulld per test, with its
//! config, socket, state and cgroup all private to that test, torn down
//! (even when the test fails) by [`TestHull`]'s `Drop`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use hull_cgroups::HullCgroups;
use hull_image::{ImageKind, ImageStore};
use hull_outer::client::{Client, ExecOutput};
use hull_proto::{ExecSpec, InnerState, StatusReport};

pub mod attacks;
pub mod garage;
pub mod http;
pub mod siege;
pub mod stream;
mod tree;
pub mod vm;
pub mod ws;

pub use tree::{assert_same_tree, tree_manifest, TreeManifest};

/// Returns false (after saying why) when the test cannot run here; under
/// CI=true it panics instead, so a CI run never passes by skipping.
pub fn require_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("hull's end-to-end tests need root (namespaces, mounts, cgroups) and CI=true forbids skipping");
    }
    eprintln!("skipping: hull's end-to-end tests need root");
    false
}

/// The Python of `target/sdk-venv` (made by tests/sdk/setup-venv.sh),
/// which has the pinned Sprites SDK; `None` (after saying why) when it is
/// not made, and under CI=true a panic instead.
pub fn sdk_python() -> Option<PathBuf> {
    let python = std::env::var_os("HULL_SDK_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_dir().join("target/sdk-venv/bin/python"));
    if python.exists() {
        return Some(python);
    }
    let why = format!(
        "{} does not exist: run tests/sdk/setup-venv.sh",
        python.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the Sprites SDK tests cannot run and CI=true forbids skipping: {why}");
    }
    eprintln!("skipping: {why}");
    None
}

/// Runs a phase of tests/sdk/admin.py; its last line of output as JSON.
pub fn sdk_admin(
    python: &std::path::Path,
    hull: &TestHull,
    token: &str,
    args: &[&str],
) -> serde_json::Value {
    let addr = block_on(hull.api_addr());
    let name = http::sprite_name(addr, token);
    let out = std::process::Command::new(python)
        .arg(workspace_dir().join("tests/sdk/admin.py"))
        .args(args)
        .env("SPRITES_URL", format!("http://{addr}"))
        .env("SPRITES_TOKEN", token)
        .env("SPRITE_NAME", name)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "admin.py {args:?} failed:\n{stdout}\n{}\nhulld log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        hull.log()
    );
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

/// The workspace's root (this crate is one folder below it).
pub fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Where cargo put hull's binaries: next to the test binary's deps/ folder.
pub fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("HULL_BIN_DIR") {
        return PathBuf::from(dir);
    }
    // A test binary lives in target/<profile>/deps, the bench binary in
    // target/<profile> itself.
    let exe = std::env::current_exe().expect("test binary path");
    let parent = exe.parent().expect("binary dir");
    let dir = if parent.join("hulld").exists() {
        parent.to_path_buf()
    } else {
        parent.parent().expect("target dir").to_path_buf()
    };
    for bin in ["hull", "hulld"] {
        assert!(
            dir.join(bin).exists(),
            "{} is missing: build the binaries first (cargo build --workspace --bins)",
            dir.join(bin).display()
        );
    }
    dir
}

/// Runs `hull ARGS` through the HTTP API at `url` with `token`, `stdin` as
/// its input. The socket is one that does not exist, so nothing local is
/// used.
pub fn remote(url: &str, token: &str, args: &[&str], stdin: &[u8]) -> Output {
    let mut command = Command::new(bin_dir().join("hull"));
    command
        .args([
            "--socket",
            "/nonexistent/hull.sock",
            "--url",
            url,
            "--token",
            token,
        ])
        .args(args);
    run_with_input(command, stdin)
}

/// Runs `command`, `stdin` as its whole input, and waits for its output.
pub fn run_with_input(mut command: Command, stdin: &[u8]) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

/// The busybox base image, built once and shared by every test process
/// (an flock serialises the first build).
pub fn image_dir() -> PathBuf {
    image_store(ImageKind::Busybox)
}

/// The store holding `kind`, built there first if missing: busybox in
/// well under a second, Debian (debootstrap, from the network) in minutes.
pub fn image_store(kind: ImageKind) -> PathBuf {
    let dir = bin_dir().join("hull-test-images");
    std::fs::create_dir_all(&dir).unwrap();
    let lock_file = std::fs::File::create(dir.join(".lock")).unwrap();
    let _lock = nix::fcntl::Flock::lock(lock_file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .expect("lock the test image dir");
    ImageStore::new(&dir)
        .ensure(kind, false, &mut |line| eprintln!("image: {line}"))
        .unwrap_or_else(|e| {
            panic!(
                "build the {} test image (apt-get install busybox-static debootstrap): {e}",
                kind.name()
            )
        });
    dir
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// Limits for a test's inner.
#[derive(Debug, Clone)]
pub struct Limits {
    pub memory_max: &'static str,
    pub pids_max: u64,
    /// Size of the sparse btrfs image under the state dir.
    pub volume_size: &'static str,
    /// Automatic checkpoints kept (retention).
    pub auto_checkpoints_keep: usize,
    /// The inner's network mode: "none" (loopback only, nothing of the
    /// host's networking touched) unless a test needs the veth.
    pub network: &'static str,
    /// More lines for the `[network]` table (private_ports = [..], ...).
    pub network_extra: String,
    /// More tables after `[network]` (`[logs]` ...).
    pub tables: String,
    /// Put `state_dir/logs` on a tmpfs of this size, to fill it up.
    pub logs_tmpfs: Option<&'static str>,
    /// The HTTP API's `[api] listen`: a port of the kernel's choosing on
    /// loopback unless a test says otherwise; `OUTER` in it stands for the
    /// test's own outer address.
    pub api_listen: &'static str,
    /// More lines for the `[api]` table (tls_cert = ..., ...).
    pub api_extra: String,
    /// The inner's base image.
    pub image: ImageKind,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_max: "256M",
            pids_max: 256,
            volume_size: "2G",
            auto_checkpoints_keep: 10,
            network: "none",
            network_extra: String::new(),
            tables: String::new(),
            logs_tmpfs: None,
            api_listen: "127.0.0.1:0",
            api_extra: String::new(),
            image: ImageKind::Busybox,
        }
    }
}

/// One hulld and its inner, private to a test.
pub struct TestHull {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub state_dir: PathBuf,
    pub cgroup_name: String,
    /// This test's own loopback address: forwarded ports and the HTTP
    /// ingress listen there, so parallel tests never share a port.
    pub outer: std::net::Ipv4Addr,
    /// The HTTP ingress port on `outer`.
    pub http_port: u16,
    /// The veth subnet (only used with network "nat").
    pub subnet: String,
    /// A tmpfs this harness mounted, unmounted in `Drop`.
    tmpfs: Option<PathBuf>,
    hulld: Option<Child>,
}

/// HTTP ingress port of every test hulld (on its own loopback address).
pub const TEST_HTTP_PORT: u16 = 8080;

/// The service manager's first restart delay, doubled after each exit
/// (ARCHITECTURE.md: "backoff 100 ms doubling to 30 s"). Tests derive their
/// waits and lower bounds from it; a change there must be made here too.
pub const SERVICE_BACKOFF_FIRST: Duration = Duration::from_millis(100);

/// Exits within 30 s after which the service manager marks a service failed.
pub const SERVICE_CRASH_LOOP_EXITS: usize = 5;

/// The pids of this test's inner whose command line is exactly `argv`, found
/// from the root namespace (the inner's cgroup is named after the test).
pub fn inner_pids_running(hull: &TestHull, argv: &[&str]) -> Vec<i32> {
    let want: Vec<u8> = argv
        .iter()
        .flat_map(|a| [a.as_bytes(), b"\0"].concat())
        .collect();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == want)
                && std::fs::read_to_string(format!("/proc/{pid}/cgroup"))
                    .is_ok_and(|c| c.contains(&format!("/{}/inner", hull.cgroup_name)))
        })
        .collect()
}

impl TestHull {
    pub fn start() -> TestHull {
        Self::start_with(Limits::default())
    }

    pub fn start_with(limits: Limits) -> TestHull {
        let images = image_store(limits.image);
        let dir = tempfile::Builder::new()
            .prefix("hull-test-")
            .tempdir()
            .unwrap();
        let socket = dir.path().join("hull.sock");
        let state_dir = dir.path().join("state");
        let cgroup_name = format!(
            "hull-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let config = dir.path().join("hull.toml");
        let n = COUNTER.load(Ordering::Relaxed);
        let pid = std::process::id();
        // 127.0.0.0/8 is all loopback: a private address per test.
        let outer = std::net::Ipv4Addr::new(
            127,
            100 + (pid % 100) as u8,
            (pid / 100 % 250) as u8 + 1,
            (n % 250) as u8 + 2,
        );
        let subnet = format!(
            "100.{}.{}.{}/30",
            96 + (pid % 16),
            (pid / 16) % 256,
            (n % 64) * 4
        );
        std::fs::write(
            &config,
            format!(
                "state_dir = {state:?}\nsocket = {socket:?}\nimage_dir = {images:?}\nimage = {image:?}\nhostname = \"hull-test\"\nmemory_max = {mem:?}\npids_max = {pids}\ncgroup_name = {cg:?}\nvolume_size = {vol:?}\nauto_checkpoints_keep = {keep}\n[network]\nmode = {mode:?}\nsubnet = {subnet:?}\nouter_address = \"{outer}\"\nhttp_port = {TEST_HTTP_PORT}\n{extra}\n[api]\nlisten = {api:?}\n{api_extra}\n{tables}\n",
                state = state_dir,
                socket = socket,
                images = images,
                image = limits.image.name(),
                mem = limits.memory_max,
                pids = limits.pids_max,
                cg = cgroup_name,
                vol = limits.volume_size,
                keep = limits.auto_checkpoints_keep,
                mode = limits.network,
                subnet = subnet,
                outer = outer,
                extra = limits.network_extra,
                api = limits.api_listen.replace("OUTER", &outer.to_string()),
                api_extra = limits.api_extra,
                tables = limits.tables,
            ),
        )
        .unwrap();
        let tmpfs = limits.logs_tmpfs.map(|size| {
            let logs = state_dir.join("logs");
            std::fs::create_dir_all(&logs).unwrap();
            nix::mount::mount(
                Some("tmpfs"),
                &logs,
                Some("tmpfs"),
                nix::mount::MsFlags::empty(),
                Some(format!("size={size},mode=700").as_str()),
            )
            .unwrap_or_else(|e| panic!("mount a tmpfs on {}: {e}", logs.display()));
            logs
        });
        let mut hull = TestHull {
            dir,
            config,
            socket,
            state_dir,
            cgroup_name,
            outer,
            http_port: TEST_HTTP_PORT,
            subnet,
            tmpfs,
            hulld: None,
        };
        hull.spawn_hulld();
        hull.wait_running(Duration::from_secs(20));
        hull
    }

    /// Starts hulld directly (not through `hull up`) so the test owns the child.
    pub fn spawn_hulld(&mut self) {
        self.spawn_hulld_env(&[]);
    }

    /// Waits for hulld to die on its own (a failpoint), and reaps it.
    pub fn wait_hulld_exit(&mut self, timeout: Duration) {
        let mut child = self.hulld.take().expect("hulld running");
        let deadline = Instant::now() + timeout;
        while child.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "hulld did not die; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts hulld with extra environment (HULL_FAILPOINT in crash tests).
    pub fn spawn_hulld_env(&mut self, env: &[(&str, &str)]) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("hulld.log"))
            .unwrap();
        let mut cmd = Command::new(bin_dir().join("hulld"));
        cmd.arg("--config")
            .arg(&self.config)
            // Tests want every detail in the log they print on failure; the
            // bench sets HULL_LOG=info to measure what a user runs.
            .env(
                "HULL_LOG",
                std::env::var("HULL_LOG").unwrap_or_else(|_| "debug".to_owned()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // Its own process group, so a stray signal to ours never reaches it.
        cmd.process_group(0);
        self.hulld = Some(cmd.spawn().expect("spawn hulld"));
    }

    pub fn hulld_pid(&self) -> i32 {
        self.hulld.as_ref().expect("hulld running").id() as i32
    }

    /// The daemon's log so far, for assertion messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("hulld.log")).unwrap_or_default()
    }

    /// Polls `hull status` until the inner runs.
    pub fn wait_running(&self, timeout: Duration) -> StatusReport {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = &self.hulld {
                // A hulld that died cannot come up; fail with its log.
                let pid = child.id() as i32;
                if std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .map(|s| s.contains(") Z"))
                    .unwrap_or(true)
                {
                    panic!("hulld exited during start-up; log:\n{}", self.log());
                }
            }
            let status = block_on(async {
                let mut c = Client::connect(&self.socket).await.ok()?;
                c.status().await.ok()
            });
            if let Some(s) = status {
                if s.state == InnerState::Running {
                    return s;
                }
            }
            assert!(
                Instant::now() < deadline,
                "inner not running after {timeout:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The HTTP API's address, as hulld reports it.
    pub async fn api_addr(&self) -> std::net::SocketAddr {
        let status = self.client().await.status().await.unwrap();
        let url = status
            .api
            .unwrap_or_else(|| panic!("hulld reports no HTTP API; log:\n{}", self.log()));
        url.trim_start_matches("http://")
            .trim_start_matches("https://")
            .parse()
            .unwrap()
    }

    /// Makes an HTTP API token of `scope` with `hull token create`.
    pub fn api_token(&self, scope: &str) -> String {
        let out = self.hull(&["--json", "token", "create", "--scope", scope]);
        assert!(out.status.success(), "token create: {out:?}");
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["token"].as_str().unwrap().to_string()
    }

    pub async fn client(&self) -> Client {
        Client::connect(&self.socket)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}; log:\n{}", self.log()))
    }

    /// Runs `argv` in the inner through a fresh connection.
    pub async fn exec(&self, argv: &[&str]) -> ExecOutput {
        self.exec_with_stdin(argv, b"").await
    }

    pub async fn exec_with_stdin(&self, argv: &[&str], stdin: &[u8]) -> ExecOutput {
        let mut c = self.client().await;
        c.exec_collect(spec(argv), stdin)
            .await
            .unwrap_or_else(|e| panic!("exec {argv:?}: {e}"))
    }

    /// `sh -c script` in the inner; returns stdout, panics unless it exits 0.
    pub async fn sh(&self, script: &str) -> String {
        let out = self.exec(&["sh", "-c", script]).await;
        assert_eq!(
            out.end,
            hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
            "sh -c {script:?} failed: stderr {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Registers a service (no env, cwd, user or dependencies beyond `after`).
    pub fn add_service(
        &self,
        name: &str,
        cmd: &str,
        after: &[&str],
        http_port: Option<u16>,
        restart: hull_proto::RestartPolicy,
    ) {
        let spec = hull_proto::ServiceSpec {
            name: name.into(),
            cmd: cmd.into(),
            env: vec![],
            cwd: None,
            user: None,
            http_port,
            restart,
            after: after.iter().map(|s| s.to_string()).collect(),
        };
        block_on(async {
            self.client()
                .await
                .services(hull_proto::ServiceRequest::Add(spec))
                .await
                .unwrap_or_else(|e| panic!("add service {name}: {e}"))
        });
    }

    /// Runs the `hull` CLI against this test's hulld.
    pub fn hull(&self, args: &[&str]) -> Output {
        self.hull_command()
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("run hull")
    }

    /// The `hull` CLI set up for this test's hulld, to add arguments and
    /// pipes to.
    pub fn hull_command(&self) -> Command {
        let mut command = Command::new(bin_dir().join("hull"));
        command.arg("--config").arg(&self.config);
        command
    }

    /// SIGKILLs hulld and reaps it, leaving its inner behind.
    pub fn kill9_hulld(&mut self) {
        if let Some(mut child) = self.hulld.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// hull's cgroups of this test.
    pub fn cgroups(&self) -> HullCgroups {
        HullCgroups::locate(&self.cgroup_name).unwrap()
    }

    /// `hull down`, then asserts hulld exited.
    pub fn down(&mut self) -> Output {
        let out = self.hull(&["down", "--grace", "0"]);
        if let Some(mut child) = self.hulld.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "hulld did not exit after hull down"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        out
    }
}

/// How much of hulld's log a failing test prints.
const LOG_TAIL_ON_FAILURE: usize = 24 * 1024;

impl Drop for TestHull {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed assertion rarely names hulld's side of the story;
            // the end of its log usually does.
            let log = self.log();
            let start = log.len().saturating_sub(LOG_TAIL_ON_FAILURE);
            let start = (start..log.len())
                .find(|&i| log.is_char_boundary(i))
                .unwrap_or(log.len());
            eprintln!("--- end of hulld's log ---\n{}", &log[start..]);
        }
        if self.hulld.is_some() {
            let _ = self.hull(&["down", "--grace", "0"]);
        }
        if let Some(mut child) = self.hulld.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever hulld could not clean (it crashed, the test killed it):
        // kill the inner and remove this test's cgroups.
        if let Ok(cgroups) = HullCgroups::locate(&self.cgroup_name) {
            let _ = cgroups.inner.kill_all(Duration::from_secs(5));
            let _ = cgroups.teardown();
        }
        if let Some(tmpfs) = self.tmpfs.take() {
            let _ = nix::mount::umount2(&tmpfs, nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

pub fn spec(argv: &[&str]) -> ExecSpec {
    ExecSpec {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: Vec::new(),
        cwd: None,
        user: None,
        tty: None,
    }
}

/// Runs a future to completion on a fresh single-threaded runtime.
pub fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

/// True while `pid` exists and is not a zombie.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(false)
}

/// Waits until `cond` holds, or panics with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Mount points (field 5 of mountinfo) that mention `needle`.
pub fn host_mounts_containing(needle: &Path) -> Vec<String> {
    let needle = needle.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains(&needle))
        .map(str::to_string)
        .collect()
}

/// A non-blocking connection to the unix socket `path`; None when the
/// listener's backlog is full (EAGAIN) or it refuses. For floods that must
/// never block the test.
pub fn connect_nonblocking(path: &Path) -> Option<std::os::unix::net::UnixStream> {
    use nix::sys::socket::{connect, socket, AddressFamily, SockFlag, SockType, UnixAddr};
    let fd = socket(
        AddressFamily::Unix,
        SockType::Stream,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )
    .expect("socket");
    let addr = UnixAddr::new(path).expect("socket path");
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &addr).ok()?;
    Some(std::os::unix::net::UnixStream::from(fd))
}

/// TCP listeners on `ports` made in the network namespace of the inner
/// whose init is `inner_pid`: the port table sees them as the inner's,
/// whoever holds them.
pub fn listen_in_inner(inner_pid: i32, ports: std::ops::Range<u16>) -> Vec<std::net::TcpListener> {
    use std::os::fd::AsFd;
    let netns = std::fs::File::open(format!("/proc/{inner_pid}/ns/net")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(netns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        ports
            .map(|p| std::net::TcpListener::bind(("0.0.0.0", p)).expect("listen in the inner"))
            .collect()
    })
    .join()
    .unwrap()
}

/// `n` connections to the unix socket `path`, each sending a frame that
/// declares the largest length the control socket takes and all of it but
/// the last 64 bytes (30 s at most), so that nothing ever decodes; the
/// connections are returned held open. A peer that hangs up is done with.
pub fn hold_half_sent_frames(path: &Path, n: usize) -> Vec<std::os::unix::net::UnixStream> {
    use std::io::Write;
    let declared: u32 = 4 * 1024 * 1024 - 8;
    let mut conns: Vec<(std::os::unix::net::UnixStream, usize)> = (0..n)
        .filter_map(|_| connect_nonblocking(path))
        .map(|s| (s, 0))
        .collect();
    let total = declared as usize - 64;
    let chunk = vec![0xc1u8; 256 * 1024];
    for (s, _) in &mut conns {
        let _ = s.write(&declared.to_be_bytes());
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut open = conns.len();
    while open > 0 && Instant::now() < deadline {
        open = 0;
        for (s, sent) in conns.iter_mut() {
            if *sent >= total {
                continue;
            }
            let n = (total - *sent).min(chunk.len());
            match s.write(&chunk[..n]) {
                Ok(w) => *sent += w,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => *sent = total,
            }
            if *sent < total {
                open += 1;
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    conns.into_iter().map(|(s, _)| s).collect()
}

/// The resident memory of `pid` in KiB, from /proc/PID/status.
pub fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS for pid {pid}"))
}

/// The host path of the inner's current writable layer (its overlay
/// upper directory), found by a marker file the inner writes.
pub fn current_upper(hull: &TestHull) -> std::path::PathBuf {
    // A name of its own each time, removed after: checkpoints taken since
    // an earlier call hold that call's marker in their own upper dirs.
    static CALLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let marker = format!(".upper-marker-{}-{call}", std::process::id());
    block_on(hull.sh(&format!("touch /{marker}")));
    let mut todo = vec![(hull.state_dir.clone(), 0)];
    while let Some((dir, depth)) = todo.pop() {
        if dir.file_name().is_some_and(|n| n == "upper") && dir.join(&marker).exists() {
            block_on(hull.sh(&format!("rm /{marker}")));
            return dir;
        }
        if depth < 5 {
            for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    todo.push((entry.path(), depth + 1));
                }
            }
        }
    }
    panic!(
        "no layer upper dir under {} holds {marker}",
        hull.state_dir.display()
    );
}

/// Where the test's own probe (`hull-probe`) goes in the inner's layer.
const PROBE: &str = "/tmp/hull-probe";

/// Copies `hull-probe` into the inner. It runs through the ELF interpreter
/// and C library hulld mounts at /run/hull for its own client, so it runs
/// on the busybox image, which has neither.
pub fn install_probe(hull: &TestHull) {
    let probe = std::fs::read(bin_dir().join("hull-probe"))
        .expect("hull-probe next to hulld: cargo build --workspace --bins");
    block_on(async {
        let out = hull
            .exec_with_stdin(
                &["sh", "-c", &format!("cat > {PROBE} && chmod 755 {PROBE}")],
                &probe,
            )
            .await;
        assert_eq!(
            out.end,
            hull_proto::ExecEnd::Exited(hull_proto::ExitStatus::Code(0)),
            "copy the probe: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    });
}

/// Runs the probe in the inner on `calls`; the answer for each, `ok` or
/// `errno N`, by call.
pub fn probe(hull: &TestHull, calls: &[&str]) -> std::collections::HashMap<String, String> {
    let script = format!(
        "for l in /run/hull/lib/ld-*; do exec \"$l\" --library-path /run/hull/lib {PROBE} \"$@\"; done"
    );
    let mut argv = vec!["sh", "-c", &script, "probe"];
    argv.extend_from_slice(calls);
    let out = block_on(hull.exec(&argv));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let answers: std::collections::HashMap<String, String> = text
        .lines()
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    assert_eq!(
        answers.len(),
        calls.len(),
        "the probe answered {text:?} for {calls:?}; stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    answers
}

/// A key root added to its user keyring in the root namespace, invalidated
/// when the test ends, however it ends.
pub struct RootKey(pub i64);

impl RootKey {
    pub fn add() -> RootKey {
        let description = format!("hull-test-{}", std::process::id());
        let description = std::ffi::CString::new(description).unwrap();
        let payload = b"root's secret";
        // SAFETY: add_key reads the two strings and the payload, all alive
        // for the call.
        let id = unsafe {
            libc::syscall(
                libc::SYS_add_key,
                c"user".as_ptr(),
                description.as_ptr(),
                payload.as_ptr(),
                payload.len(),
                libc::KEY_SPEC_USER_KEYRING,
            )
        };
        assert!(id > 0, "add_key: {}", std::io::Error::last_os_error());
        let key = RootKey(id);
        // Readable and writable by uid 0 without possessing it, as a key
        // that root's processes share; any of them, the inner's included
        // until now, could read and update it.
        const POS_ALL: u32 = 0x3f00_0000;
        const USR_VIEW_READ_WRITE: u32 = 0x0007_0000;
        // SAFETY: KEYCTL_SETPERM takes the key's id and a mask.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_SETPERM,
                id,
                POS_ALL | USR_VIEW_READ_WRITE,
            )
        };
        assert_eq!(rc, 0, "keyctl setperm: {}", std::io::Error::last_os_error());
        key
    }

    pub fn payload(&self) -> Vec<u8> {
        let mut buf = [0u8; 64];
        // SAFETY: KEYCTL_READ writes at most buf.len() bytes into buf.
        let n = unsafe {
            libc::syscall(
                libc::SYS_keyctl,
                libc::KEYCTL_READ,
                self.0,
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        assert!(n >= 0, "keyctl read: {}", std::io::Error::last_os_error());
        buf[..usize::try_from(n).unwrap().min(buf.len())].to_vec()
    }
}

impl Drop for RootKey {
    fn drop(&mut self) {
        // SAFETY: KEYCTL_INVALIDATE takes the key's id and nothing else.
        unsafe { libc::syscall(libc::SYS_keyctl, libc::KEYCTL_INVALIDATE, self.0) };
    }
}

/// Reads an exec's output on `c` until it contains `needle`; returns all
/// of it. Panics on anything else, or after 10 s.
pub async fn read_until(c: &mut Client, needle: &str) -> String {
    let mut seen = String::new();
    let found = tokio::time::timeout(Duration::from_secs(10), async {
        while !seen.contains(needle) {
            match hull_outer::client::next(&mut c.reader).await.unwrap() {
                hull_proto::DaemonMsg::Output { data, .. } => {
                    seen.push_str(&String::from_utf8_lossy(&data))
                }
                other => panic!("unexpected {other:?} while waiting for {needle:?}; seen {seen:?}"),
            }
        }
    })
    .await;
    assert!(found.is_ok(), "no {needle:?} in {seen:?}");
    seen
}
