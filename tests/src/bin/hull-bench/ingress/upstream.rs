//! The keep-alive HTTP server the wrk runs measure, inside the inner's
//! network namespace.

use anyhow::{Context, Result};

/// 1,000 connections need more descriptors than the usual soft limit of
/// 1024, here and in wrk, which inherits it.
pub fn raise_nofile() {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    if let Ok((_, hard)) = getrlimit(Resource::RLIMIT_NOFILE) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}

/// A listening socket made inside the inner's network namespace. busybox
/// httpd closes every connection after one answer, so keep-alive is
/// measured against a server of our own whose socket lives where a
/// service's would: the forwarder and the ingress treat it like any other.
pub fn listen_in_netns(inner_pid: i32, port: u16) -> Result<std::net::TcpListener> {
    let ns = std::fs::File::open(format!("/proc/{inner_pid}/ns/net"))
        .with_context(|| format!("open /proc/{inner_pid}/ns/net"))?;
    // A thread of its own: setns moves only the calling thread, and this one
    // ends right after, so no other work runs in the inner's namespace.
    std::thread::spawn(move || -> Result<std::net::TcpListener> {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
            .context("setns into the inner's network namespace")?;
        let listener = std::net::TcpListener::bind(("0.0.0.0", port))
            .with_context(|| format!("bind 0.0.0.0:{port} in the inner"))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the setns thread panicked"))?
}

/// hyper serving a fixed 1 KiB body on its own runtime; dropped, it stops.
pub struct KeepAliveServer {
    runtime: Option<tokio::runtime::Runtime>,
    /// Its runtime's threads, to pin them.
    threads: std::sync::Arc<std::sync::Mutex<Vec<i32>>>,
}

impl KeepAliveServer {
    pub fn start(listener: std::net::TcpListener) -> Result<KeepAliveServer> {
        let threads = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let record = threads.clone();
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .on_thread_start(move || {
                record.lock().unwrap().push(nix::unistd::gettid().as_raw());
            })
            .build()?;
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let body = bytes::Bytes::from(vec![b'x'; 1024]);
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let body = body.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_req| {
                        let body = body.clone();
                        async move {
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(
                                http_body_util::Full::new(body),
                            ))
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(KeepAliveServer {
            runtime: Some(runtime),
            threads,
        })
    }

    /// Sets the CPUs of the server's threads; returns what the first had.
    pub fn set_affinity(&self, cpus: &nix::sched::CpuSet) -> Result<nix::sched::CpuSet> {
        use nix::sched::{sched_getaffinity, sched_setaffinity};
        use nix::unistd::Pid;
        let threads = self.threads.lock().unwrap().clone();
        let first = *threads.first().context("the server has no threads")?;
        let before = sched_getaffinity(Pid::from_raw(first))?;
        for tid in threads {
            sched_setaffinity(Pid::from_raw(tid), cpus)
                .with_context(|| format!("set the CPUs of the server's thread {tid}"))?;
        }
        Ok(before)
    }
}

impl Drop for KeepAliveServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}
