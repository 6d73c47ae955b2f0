//! The inner's network namespace and the thread that creates sockets in it.
//!
//! Network namespaces are per thread: a thread that has unshared
//! CLONE_NEWNET creates every socket in the new namespace, and a socket keeps
//! its namespace for life. So one dedicated thread unshares once and then
//! makes sockets on request; the tokio runtime uses them like any other.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::mpsc as std_mpsc;
use std::sync::Arc;

use nix::sched::{unshare, CloneFlags};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::oneshot;

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("cannot start the thread that owns the inner's network namespace")]
    Thread(#[source] io::Error),
    #[error("unshare(CLONE_NEWNET) for the inner's network namespace failed")]
    Unshare(#[source] nix::Error),
    #[error("cannot open {path}")]
    Open {
        path: &'static str,
        source: io::Error,
    },
    #[error("the network namespace thread exited")]
    Gone,
}

type Job = Box<dyn FnOnce() + Send>;

/// The inner's network namespace: an fd that keeps it alive (passed to the
/// helper, which setns(2)es into it before forking the init) and the thread
/// that lives in it.
pub struct InnerNetns {
    ns: OwnedFd,
    jobs: std_mpsc::Sender<Job>,
}

impl InnerNetns {
    /// Creates a new, empty network namespace (loopback only, down). The
    /// thread enters `runtime` so that tokio sockets it creates register with
    /// the runtime's reactor.
    pub fn create(runtime: tokio::runtime::Handle) -> Result<Arc<Self>, NetnsError> {
        let (jobs, queue) = std_mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = std_mpsc::channel();
        std::thread::Builder::new()
            .name("inner-netns".into())
            .spawn(move || {
                let _entered = runtime.enter();
                let setup = unshare(CloneFlags::CLONE_NEWNET)
                    .map_err(NetnsError::Unshare)
                    .and_then(|()| {
                        std::fs::File::open("/proc/thread-self/ns/net")
                            .map(OwnedFd::from)
                            .map_err(|source| NetnsError::Open {
                                path: "/proc/thread-self/ns/net",
                                source,
                            })
                    });
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup);
                if ok {
                    while let Ok(job) = queue.recv() {
                        job();
                    }
                }
            })
            .map_err(NetnsError::Thread)?;
        let ns = ready_rx.recv().map_err(|_| NetnsError::Gone)??;
        Ok(Arc::new(InnerNetns { ns, jobs }))
    }

    /// The namespace fd, for setns(2) in the helper.
    pub fn fd(&self) -> RawFd {
        self.ns.as_raw_fd()
    }

    /// Runs `f` on the namespace's thread, where every socket it creates
    /// belongs to the inner's namespace.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| NetnsError::Gone)?;
        rx.await.map_err(|_| NetnsError::Gone)
    }

    /// A fresh TCP socket inside the inner's namespace.
    pub async fn tcp_socket(&self, v6: bool) -> io::Result<TcpSocket> {
        let fd = self
            .run(move || new_socket(v6))
            .await
            .map_err(|e| io::Error::other(e.to_string()))??;
        Ok(TcpSocket::from_std_stream(std::net::TcpStream::from(fd)))
    }
}

fn new_socket(v6: bool) -> io::Result<OwnedFd> {
    let domain = if v6 { libc::AF_INET6 } else { libc::AF_INET };
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens TCP connections to ports of the inner, from inside its namespace,
/// so that a server bound only to the inner's 127.0.0.1 is reachable.
#[derive(Clone)]
pub struct Dialer {
    netns: Option<Arc<InnerNetns>>,
}

impl Dialer {
    pub fn new(netns: Arc<InnerNetns>) -> Self {
        Dialer { netns: Some(netns) }
    }

    /// Dials in hulld's own namespace; for tests of the relays.
    pub fn host() -> Self {
        Dialer { netns: None }
    }

    /// Connects to `port` on the address the inner's listener is bound to:
    /// its loopback for a wildcard or loopback bind, else that address.
    pub async fn connect(&self, port: u16, bound: Option<IpAddr>) -> io::Result<TcpStream> {
        let ip = match bound {
            None | Some(IpAddr::V4(Ipv4Addr::UNSPECIFIED)) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Some(IpAddr::V6(Ipv6Addr::UNSPECIFIED)) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            Some(ip) => ip,
        };
        let addr = SocketAddr::new(ip, port);
        match &self.netns {
            Some(ns) => {
                let socket = ns.tcp_socket(ip.is_ipv6()).await?;
                socket.set_nodelay(true)?;
                socket.connect(addr).await
            }
            None => {
                let stream = TcpStream::connect(addr).await?;
                stream.set_nodelay(true)?;
                Ok(stream)
            }
        }
    }
}
