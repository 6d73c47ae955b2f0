//! nginx and HAProxy as reverse proxies in front of the same keep-alive
//! server, the anchors hull's ingress is measured against: loopback only,
//! configured in the bench's own temporary directory, in the foreground,
//! and stopped when dropped.

use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::pinning::children;

/// One proxy process (and its workers) listening on `addr`.
pub struct Proxy {
    pub addr: SocketAddr,
    child: Child,
}

impl Proxy {
    /// The processes whose CPU time is this proxy's: nginx's master and
    /// its worker, HAProxy's one process.
    pub fn pids(&self) -> Result<Vec<i32>> {
        let main = self.child.id() as i32;
        let mut pids = vec![main];
        pids.extend(children(main)?);
        Ok(pids)
    }

    /// nginx with one worker, the upstream kept alive as a reverse proxy
    /// in production would keep it.
    pub fn nginx(dir: &Path, upstream: SocketAddr) -> Result<Proxy> {
        let addr = free_loopback_port()?;
        let d = dir.display();
        let config = format!(
            "worker_processes 1;
daemon off;
pid {d}/nginx.pid;
error_log {d}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    upstream inner {{
        server {upstream};
        keepalive 128;
    }}
    server {{
        listen {addr};
        location / {{
            proxy_pass http://inner;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
        }}
    }}
}}
"
        );
        let path = dir.join("nginx.conf");
        std::fs::write(&path, config)?;
        // -e: the error log before the configuration is read, which
        // otherwise is the package's /var/log/nginx/error.log.
        let mut cmd = Command::new("nginx");
        cmd.arg("-p")
            .arg(dir)
            .arg("-e")
            .arg(dir.join("nginx-error.log"))
            .arg("-c")
            .arg(&path);
        Self::spawn("nginx", addr, cmd, dir)
    }

    /// HAProxy with one thread, keep-alive on both sides (its default).
    pub fn haproxy(dir: &Path, upstream: SocketAddr) -> Result<Proxy> {
        let addr = free_loopback_port()?;
        let config = format!(
            "global
    nbthread 1
    maxconn 4096
defaults
    mode http
    option forwardfor
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend bench
    bind {addr}
    default_backend inner
backend inner
    server inner {upstream}
"
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, config)?;
        let mut cmd = Command::new("haproxy");
        cmd.arg("-db").arg("-f").arg(&path);
        Self::spawn("haproxy", addr, cmd, dir)
    }

    fn spawn(name: &'static str, addr: SocketAddr, mut cmd: Command, dir: &Path) -> Result<Proxy> {
        let log = std::fs::File::create(dir.join(format!("{name}.out")))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("run {name} (apt-get install nginx haproxy)"))?;
        let mut proxy = Proxy { addr, child };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            if let Some(status) = proxy.child.try_wait()? {
                let out =
                    std::fs::read_to_string(dir.join(format!("{name}.out"))).unwrap_or_default();
                bail!("{name} exited ({status}) before listening on {addr}: {out}");
            }
            if Instant::now() > deadline {
                bail!("{name} does not listen on {addr} after 10 s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(proxy)
    }
}

impl Drop for Proxy {
    /// SIGTERM, so that nginx's master stops its worker and waits for it;
    /// SIGKILL to all of them when that takes more than five seconds.
    fn drop(&mut self) {
        let pids = self.pids().unwrap_or_default();
        let _ = kill(Pid::from_raw(self.child.id() as i32), Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for pid in pids {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// A loopback port nothing listens on now.
fn free_loopback_port() -> Result<SocketAddr> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?)
}
