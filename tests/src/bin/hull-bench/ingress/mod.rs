//! The ways into the inner: a direct connection to its veth address (the
//! anchor), TCP forwarding and HTTP ingress; in the pinned run also nginx
//! and HAProxy as reverse proxies to the same server.

pub(crate) mod pinning;
mod proxies;
mod upstream;
mod wrk;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use hull_tests::{block_on, Limits, TestHull};

use crate::report::{ms, print_rows, Row};
use pinning::{clock_ticks, cpu_ticks, machine_busy_ticks, ProxyCores};
use proxies::Proxy;
use upstream::{listen_in_netns, raise_nofile, KeepAliveServer};
use wrk::{median_run, wrk, WrkRun};

/// How long and how often each wrk path runs.
#[derive(Clone, Copy)]
pub struct WrkOptions {
    pub secs: usize,
    pub runs: usize,
    /// hulld relays forwarded connections in the kernel (sockmap).
    pub forward_in_kernel: bool,
}

/// One GET on a new connection; returns the time to the last byte and the
/// body length.
fn timed_get(addr: SocketAddr, host: &str, path: &str) -> Result<(f64, usize)> {
    use std::io::{Read, Write};
    let begin = Instant::now();
    let mut s = std::net::TcpStream::connect(addr).with_context(|| format!("connect {addr}"))?;
    s.set_nodelay(true)?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = Vec::new();
    s.read_to_end(&mut out)?;
    let elapsed = ms(begin.elapsed());
    let head_end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no HTTP head")?;
    if !out.starts_with(b"HTTP/1.1 200") && !out.starts_with(b"HTTP/1.0 200") {
        bail!(
            "{addr} {host}{path}: {}",
            String::from_utf8_lossy(&out[..head_end])
        );
    }
    Ok((elapsed, out.len() - head_end - 4))
}

/// Small requests and a 256 MiB download through the three ways in, then
/// the wrk runs.
pub fn run(rounds: usize, wrk_options: WrkOptions) -> Result<()> {
    let hull = TestHull::start_with(Limits {
        network: "nat",
        memory_max: "1G",
        network_extra: format!("forward_in_kernel = {}", wrk_options.forward_in_kernel),
        ..Limits::default()
    });
    block_on(hull.sh(
        "mkdir -p /b && head -c 1024 /dev/zero > /b/small && dd if=/dev/zero of=/b/big bs=1M count=256 2>/dev/null",
    ));
    hull.add_service(
        "b",
        "exec httpd -f -p 8600 -h /b",
        &[],
        None,
        hull_proto::RestartPolicy::Always,
    );
    let out = hull.hull(&["ingress", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let inner: IpAddr = report["inner_address"]
        .as_str()
        .context("no inner address")?
        .parse()?;
    let direct = SocketAddr::new(inner, 8600);
    let forwarded = SocketAddr::from((hull.outer, 8600));
    let http = SocketAddr::from((hull.outer, hull.http_port));
    let deadline = Instant::now() + Duration::from_secs(10);
    while timed_get(forwarded, "x", "/small").is_err() {
        if Instant::now() > deadline {
            bail!("port 8600 not forwarded; log:\n{}", hull.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let ways: [(&'static str, &'static str, SocketAddr, &str); 3] = [
        (
            "anchor: GET 1 KiB, new connection, direct",
            "anchor: 256 MiB direct",
            direct,
            "x",
        ),
        (
            "GET 1 KiB, new connection, TCP forwarding",
            "256 MiB through TCP forwarding",
            forwarded,
            "x",
        ),
        (
            "GET 1 KiB, new connection, HTTP ingress",
            "256 MiB through HTTP ingress",
            http,
            "8600.localhost",
        ),
    ];
    let mut rows = Vec::new();
    let mut rates = Vec::new();
    for (name, big_name, addr, host) in ways {
        let mut samples = Vec::new();
        for _ in 0..rounds * 4 {
            samples.push(timed_get(addr, host, "/small")?.0);
        }
        rows.push(Row::new(name, samples, "ms"));
        let mut big = Vec::new();
        for _ in 0..3 {
            let (t, len) = timed_get(addr, host, "/big")?;
            if len != 256 << 20 {
                bail!("{big_name}: got {len} bytes");
            }
            big.push(t);
        }
        big.sort_by(f64::total_cmp);
        rates.push((big_name, 256.0 / (big[1] / 1e3)));
    }
    print_rows(&rows);
    println!();
    let anchor = rows[0].p50();
    for row in &rows[1..] {
        println!(
            "ratio {} / direct (p50): {:.2}",
            row.name,
            row.p50() / anchor
        );
    }
    println!();
    for (name, rate) in &rates {
        println!("{name:<44} {rate:>8.0} MiB/s (median of 3)");
    }
    println!(
        "ratio forwarding / direct throughput: {:.2}",
        rates[1].1 / rates[0].1
    );
    println!(
        "ratio HTTP ingress / direct throughput: {:.2}",
        rates[2].1 / rates[0].1
    );
    let inner_pid = hull
        .wait_running(Duration::from_secs(10))
        .inner_pid
        .context("the inner has no pid")?;
    bench_keepalive(&hull, inner_pid, direct.ip(), wrk_options)
}

/// The port of the keep-alive server the wrk rows measure.
const KEEPALIVE_PORT: u16 = 8700;

const DIRECT: &str = "anchor: direct to the inner's address";
const NGINX: &str = "anchor: nginx";
const HAPROXY: &str = "anchor: HAProxy";
const HTTP: &str = "HTTP ingress";
const FORWARD: &str = "TCP forwarding";

/// One way to the keep-alive server.
struct WrkPath {
    name: &'static str,
    url: String,
    /// The Host header, when the URL's is not the one that routes.
    host: Option<String>,
    /// The processes whose CPU time is this path's cost (none for the
    /// direct anchor).
    proxy: Vec<i32>,
}

/// A path's median run, its proxy's CPU time per request and the whole
/// machine's busy time per request, in µs.
struct PathResult {
    name: &'static str,
    run: WrkRun,
    cpu_us: Option<f64>,
    machine_us: f64,
}

/// wrk against a keep-alive HTTP server in the inner's network namespace:
/// direct, through HTTP ingress and through TCP forwarding with 1 and 64
/// connections; 64 again with the proxies on a CPU of their own, nginx and
/// HAProxy among them; then 1,000 connections held through TCP forwarding.
fn bench_keepalive(
    hull: &TestHull,
    inner_pid: i32,
    inner: IpAddr,
    options: WrkOptions,
) -> Result<()> {
    raise_nofile();
    let listener = listen_in_netns(inner_pid, KEEPALIVE_PORT)?;
    let server = KeepAliveServer::start(listener)?;
    let forwarded = SocketAddr::from((hull.outer, KEEPALIVE_PORT));
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect_timeout(&forwarded, Duration::from_millis(200)).is_err() {
        if Instant::now() > deadline {
            bail!("port {KEEPALIVE_PORT} not forwarded; log:\n{}", hull.log());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let hulld = hull.hulld_pid();
    let upstream = SocketAddr::new(inner, KEEPALIVE_PORT);
    let direct = || WrkPath {
        name: DIRECT,
        url: format!("http://{upstream}/"),
        host: None,
        proxy: vec![],
    };
    let hull_paths = || {
        [
            WrkPath {
                name: HTTP,
                url: format!("http://{}:{}/", hull.outer, hull.http_port),
                host: Some(format!("{KEEPALIVE_PORT}.localhost")),
                proxy: vec![hulld],
            },
            WrkPath {
                name: FORWARD,
                url: format!("http://{forwarded}/"),
                host: None,
                proxy: vec![hulld],
            },
        ]
    };
    let mut shared: Vec<WrkPath> = vec![direct()];
    shared.extend(hull_paths());
    for connections in [1, 64] {
        let results = wrk_paths(&shared, connections, options, None)?;
        print_results(&results, connections, options, "all on every CPU");
    }
    // On two shared cores the ratios above are CPU ratios: whatever hulld
    // spends per request is taken from wrk and the server. The usual proxy
    // methodology gives the proxy a core of its own instead, with the
    // client and the server on the same core(s) for every proxy.
    match ProxyCores::split() {
        Some(cores) => pinned_run(
            &cores,
            hulld,
            &server,
            upstream,
            direct(),
            hull_paths(),
            options,
        )?,
        None => println!("\n(one CPU only: no run with the proxies on a core of their own)"),
    }
    let held = wrk(&format!("http://{forwarded}/"), None, 1000, 10)?;
    println!();
    println!(
        "1000 keep-alive connections through TCP forwarding, 10 s: {} requests, {} errors  (target 0 errors)",
        held.requests, held.errors
    );
    Ok(())
}

/// 64 connections with every proxy (hulld, nginx, HAProxy) on the proxy
/// core and wrk and the server on the others.
fn pinned_run(
    cores: &ProxyCores,
    hulld: i32,
    server: &KeepAliveServer,
    upstream: SocketAddr,
    direct: WrkPath,
    hull_paths: [WrkPath; 2],
    options: WrkOptions,
) -> Result<()> {
    let dir = tempfile::Builder::new()
        .prefix("hull-bench-proxies-")
        .tempdir()?;
    let mut proxies = Vec::new();
    type Start = fn(&std::path::Path, SocketAddr) -> Result<Proxy>;
    let anchors: [(&'static str, &str, Start); 2] = [
        (NGINX, "nginx", Proxy::nginx),
        (HAPROXY, "haproxy", Proxy::haproxy),
    ];
    for (name, program, start) in anchors {
        if std::process::Command::new(program)
            .arg("-v")
            .output()
            .is_err()
        {
            eprintln!(
                "{program} not found (apt-get install nginx haproxy): no {name} row this run"
            );
            continue;
        }
        // Started on the proxy core, so nginx's worker is born there too.
        let proxy = cores.on_proxy_core(|| start(dir.path(), upstream))?;
        proxies.push((name, proxy));
    }
    let mut paths = vec![direct];
    for (name, proxy) in &proxies {
        paths.push(WrkPath {
            name,
            url: format!("http://{}/", proxy.addr),
            host: None,
            proxy: proxy.pids()?,
        });
    }
    paths.extend(hull_paths);
    let placement = cores.apply(hulld, server)?;
    let results = wrk_paths(&paths, 64, options, Some(cores));
    placement.undo(server)?;
    drop(proxies);
    let results = results?;
    let placement = format!(
        "wrk and the server on CPU {}, each proxy on CPU {}",
        cores.client_list(),
        cores.proxy
    );
    print_results(&results, 64, options, &placement);
    print_cpu_ratios(&results);
    Ok(())
}

/// Each hull path's CPU per request against nginx's, two ways: the
/// proxy's own CPU time, and the CPU the path adds to the whole machine
/// (its busy time per request less the direct path's in the same run).
/// The second is the one the targets are judged on: work the kernel does
/// for a path in softirqs and kworkers (a sockmap redirect's) shows in no
/// process's times.
fn print_cpu_ratios(results: &[PathResult]) {
    let find = |name: &str| results.iter().find(|r| r.name == name);
    println!();
    let (Some(nginx), Some(direct)) = (find(NGINX), find(DIRECT)) else {
        println!("(no nginx this run: no CPU ratios against it)");
        return;
    };
    let added = |r: &PathResult| r.machine_us - direct.machine_us;
    println!(
        "CPU each path adds to the whole machine per request (its machine CPU/req less direct's):"
    );
    for r in results.iter().filter(|r| r.name != DIRECT) {
        println!("  {:<38} {:>8.1} us", r.name, added(r));
    }
    for (name, target) in [(HTTP, 0.8), (FORWARD, 0.3)] {
        let Some(r) = find(name) else { continue };
        println!(
            "ratio hull {name} / nginx, CPU added to the machine per request: {:.2}  ({:.1} us vs {:.1} us; target <= {target})",
            added(r) / added(nginx),
            added(r),
            added(nginx)
        );
        if let (Some(us), Some(nginx_us)) = (r.cpu_us, nginx.cpu_us) {
            println!(
                "  the proxy process's own CPU per request: {:.2}  ({us:.1} us vs {nginx_us:.1} us)",
                us / nginx_us
            );
        }
    }
}

/// wrk on each path, `options.runs` times in turn; with `cores`, wrk
/// runs on the client cores.
fn wrk_paths(
    paths: &[WrkPath],
    connections: usize,
    options: WrkOptions,
    cores: Option<&ProxyCores>,
) -> Result<Vec<PathResult>> {
    let secs = options.secs;
    let run = |path: &WrkPath| -> Result<WrkRun> {
        // Progress, and a mark for a profiler to start at.
        eprintln!(
            "wrk: {connections} connection(s) to {} ({}) for {secs} s",
            path.url, path.name
        );
        let host = path.host.as_deref();
        match cores {
            Some(c) => c.on_client_cores(|| wrk(&path.url, host, connections, secs)),
            None => wrk(&path.url, host, connections, secs),
        }
    };
    // The paths take turns, so a slow phase of a shared VM hits all of
    // them alike; each row is the run with the median req/s.
    let mut runs: Vec<Vec<WrkRun>> = paths.iter().map(|_| Vec::new()).collect();
    let mut ticks = vec![0u64; paths.len()];
    let mut machine = vec![0u64; paths.len()];
    for _ in 0..options.runs {
        for (i, path) in paths.iter().enumerate() {
            let before = cpu_ticks(&path.proxy)?;
            let machine_before = machine_busy_ticks()?;
            runs[i].push(run(path)?);
            machine[i] += machine_busy_ticks()? - machine_before;
            ticks[i] += cpu_ticks(&path.proxy)? - before;
        }
    }
    Ok(paths
        .iter()
        .zip(runs)
        .zip(ticks.into_iter().zip(machine))
        .map(|((path, runs), (ticks, machine))| {
            let requests: u64 = runs.iter().map(|r| r.requests).sum();
            let per_request = |ticks: u64| ticks as f64 * 1e6 / clock_ticks() / requests as f64;
            PathResult {
                name: path.name,
                run: median_run(runs),
                cpu_us: (!path.proxy.is_empty()).then(|| per_request(ticks)),
                machine_us: per_request(machine),
            }
        })
        .collect())
}

fn print_results(results: &[PathResult], connections: usize, options: WrkOptions, placement: &str) {
    println!();
    println!(
        "wrk, {connections} keep-alive connection(s), {} s, 1 KiB responses, {placement}, median of {} runs:",
        options.secs, options.runs
    );
    println!(
        "{:<40} {:>9} {:>10} {:>10} {:>6} {:>14} {:>16}",
        "path", "req/s", "p50", "p99", "errors", "proxy CPU/req", "machine CPU/req"
    );
    println!("{}", "-".repeat(111));
    for r in results {
        let per_req = r.cpu_us.map(|us| format!("{us:.1} us")).unwrap_or_default();
        println!(
            "{:<40} {:>9.0} {:>7.3} ms {:>7.3} ms {:>6} {:>14} {:>13.1} us",
            r.name, r.run.rps, r.run.p50_ms, r.run.p99_ms, r.run.errors, per_req, r.machine_us
        );
    }
    let find = |name: &str| results.iter().find(|r| r.name == name).map(|r| &r.run);
    let (Some(direct), Some(http), Some(fwd)) = (find(DIRECT), find(HTTP), find(FORWARD)) else {
        return;
    };
    println!(
        "ratio HTTP ingress / direct throughput: {:.2}  (target >= 0.8)",
        http.rps / direct.rps
    );
    println!(
        "HTTP ingress added p50 latency: {:.3} ms  (target <= 0.2 ms)",
        http.p50_ms - direct.p50_ms
    );
    println!(
        "ratio TCP forwarding / direct throughput: {:.2}",
        fwd.rps / direct.rps
    );
}
