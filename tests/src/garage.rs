//! Garage, an S3 server, on loopback: one node in its own directory,
//! free ports, a single-node layout, one key and one bucket made with its
//! CLI. The remote's tests and `hull-bench remote` push to it.
//!
//! Garage (AGPL) runs as a separate process, never linked. It is found
//! through `HULL_GARAGE`, then PATH, then /var/cache/hull-ci/garage/bin
//! (where .ci/run installs it).

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hull_remote::object_store::aws::AmazonS3Builder;
use hull_remote::object_store::ObjectStore;
use hull_remote::RemoteSettings;
use sha2::Digest as _;

/// The garage binary, or `None` when there is none to be found.
pub fn find() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("HULL_GARAGE") {
        return Some(PathBuf::from(path));
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("garage"))
            .find(|p| p.is_file())
    });
    on_path.or_else(|| {
        let cached = PathBuf::from("/var/cache/hull-ci/garage/bin/garage");
        cached.is_file().then_some(cached)
    })
}

/// What to do without garage: say so, or panic under CI=true.
pub fn missing() {
    let why = "no garage binary (HULL_GARAGE, PATH, /var/cache/hull-ci/garage/bin): cargo install --locked garage";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why}, and CI=true forbids skipping");
    }
    eprintln!("skipping: {why}");
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on loopback")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A single-node Garage on loopback with one bucket and one key, killed
/// on drop.
pub struct Garage {
    bin: PathBuf,
    dir: PathBuf,
    config: PathBuf,
    server: Child,
    pub endpoint: String,
    pub bucket: String,
    pub key_id: String,
    pub secret: String,
}

impl Garage {
    /// Starts garage `bin` with its config, metadata and data under `dir`.
    pub fn start(bin: &Path, dir: &Path) -> Garage {
        fs::create_dir_all(dir).unwrap();
        let (rpc, s3) = (free_port(), free_port());
        let config = dir.join("garage.toml");
        // Any 32 bytes in hex; this node talks to no other.
        let secret: String = sha2::Sha256::digest(dir.as_os_str().as_encoded_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        fs::write(
            &config,
            format!(
                "metadata_dir = \"{meta}\"\n\
                 data_dir = \"{data}\"\n\
                 db_engine = \"lmdb\"\n\
                 replication_factor = 1\n\
                 rpc_bind_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_public_addr = \"127.0.0.1:{rpc}\"\n\
                 rpc_secret = \"{secret}\"\n\
                 [s3_api]\n\
                 s3_region = \"garage\"\n\
                 api_bind_addr = \"127.0.0.1:{s3}\"\n\
                 root_domain = \".s3.garage.localhost\"\n",
                meta = dir.join("meta").display(),
                data = dir.join("data").display(),
            ),
        )
        .unwrap();
        fs::set_permissions(&config, fs::Permissions::from_mode(0o600)).unwrap();
        let log = fs::File::create(dir.join("server.log")).unwrap();
        let server = Command::new(bin)
            .arg("-c")
            .arg(&config)
            .arg("server")
            .env("RUST_LOG", "warn")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {}: {e}", bin.display()));
        let mut garage = Garage {
            bin: bin.to_path_buf(),
            dir: dir.to_path_buf(),
            config,
            server,
            endpoint: format!("http://127.0.0.1:{s3}"),
            bucket: "hull-test".into(),
            key_id: String::new(),
            secret: String::new(),
        };
        // The CLI reaches the server over RPC once it listens (`node id`
        // reads the node's key from disk and works before that).
        let started = Instant::now();
        while !garage
            .cli()
            .arg("status")
            .output()
            .unwrap()
            .status
            .success()
        {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "garage did not come up: {}",
                fs::read_to_string(dir.join("server.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let node = run(garage.cli().args(["node", "id", "-q"]));
        let node = node.trim().split('@').next().unwrap().to_string();
        run(garage
            .cli()
            .args(["layout", "assign", "-z", "dc1", "-c", "1G", &node]));
        run(garage.cli().args(["layout", "apply", "--version", "1"]));
        let created = run(garage.cli().args(["key", "create", "hull-test-key"]));
        let field = |label: &str| {
            created
                .lines()
                .find_map(|l| l.trim().strip_prefix(label).map(|v| v.trim().to_string()))
                .unwrap_or_else(|| panic!("no {label} in `garage key create`: {created}"))
        };
        garage.key_id = field("Key ID:");
        garage.secret = field("Secret key:");
        run(garage.cli().args(["bucket", "create", &garage.bucket]));
        run(garage.cli().args([
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            &garage.bucket,
            "--key",
            "hull-test-key",
        ]));
        garage
    }

    /// The garage CLI pointed at this server.
    pub fn cli(&self) -> Command {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-c").arg(&self.config).env("RUST_LOG", "warn");
        cmd
    }

    /// `[remote]` settings for `s3://BUCKET/prefix` on this server, with a
    /// credentials file (mode 0600) written beside its config.
    pub fn settings(&self, prefix: &str, key_file: &Path) -> RemoteSettings {
        let creds = self.dir.join("credentials.toml");
        fs::write(
            &creds,
            format!(
                "access_key_id = \"{}\"\nsecret_access_key = \"{}\"\n",
                self.key_id, self.secret
            ),
        )
        .unwrap();
        fs::set_permissions(&creds, fs::Permissions::from_mode(0o600)).unwrap();
        RemoteSettings {
            endpoint: Some(self.endpoint.clone()),
            region: Some("garage".into()),
            credentials_file: Some(creds),
            ..RemoteSettings::new(format!("s3://{}/{prefix}", self.bucket), key_file)
        }
    }

    /// The bucket as an object store of its own, to look at what a
    /// [`hull_remote::Remote`] wrote.
    pub fn store(&self) -> std::sync::Arc<dyn ObjectStore> {
        // The remote's TLS provider; a plain-http endpoint needs one all
        // the same to build the client. Installed already is as good.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store = AmazonS3Builder::new()
            .with_bucket_name(&self.bucket)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("garage")
            .with_access_key_id(&self.key_id)
            .with_secret_access_key(&self.secret)
            .build()
            .expect("an S3 client for garage");
        std::sync::Arc::new(store)
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    /// Where garage keeps the objects' blocks.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        let _ = self.server.kill();
        let _ = self.server.wait();
    }
}
