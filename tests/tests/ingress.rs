//! Ingress end to end: ports bound in the inner are listed, forwarded on the
//! test's own loopback address and reachable through HTTP ingress; big
//! transfers, an Upgrade, a bounce in the middle of a request, private
//! URLs, and egress through the veth. Only loopback and the namespaces
//! hulld made for the test carry traffic.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use hull_proto::{BounceReport, InnerState, RestartPolicy};
use hull_tests::{block_on, inner_pids_running, require_root, wait_until, Limits, TestHull};
use sha2::{Digest, Sha256};

/// A raw HTTP/1.1 exchange (Connection: close); returns status, head, body.
fn http(addr: SocketAddr, host: &str, request_tail: &str, body: &[u8]) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let head = format!("{request_tail}Host: {host}\r\nConnection: close\r\n\r\n");
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out)
        .unwrap_or_else(|e| panic!("read from {addr}: {e}"));
    split_response(&out)
}

fn split_response(out: &[u8]) -> (u16, String, Vec<u8>) {
    let end = out
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no HTTP head in {:?}", String::from_utf8_lossy(out)));
    let head = String::from_utf8_lossy(&out[..end]).to_string();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status in {head:?}"));
    (status, head, out[end + 4..].to_vec())
}

fn get(addr: SocketAddr, host: &str, path: &str) -> (u16, String, Vec<u8>) {
    http(addr, host, &format!("GET {path} HTTP/1.1\r\n"), b"")
}

fn ports_json(hull: &TestHull) -> serde_json::Value {
    let out = hull.hull(&["ports", "--json"]);
    assert!(
        out.status.success(),
        "hull ports: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn listed(hull: &TestHull, port: u16) -> Option<serde_json::Value> {
    ports_json(hull)["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["port"] == port)
        .cloned()
}

fn wait_listed(hull: &TestHull, port: u16) -> serde_json::Value {
    let mut found = None;
    wait_until(
        Duration::from_secs(10),
        &format!("port {port} listed"),
        || {
            found = listed(hull, port).filter(|p| p["exposure"] != "pending");
            found.is_some()
        },
    );
    found.unwrap()
}

fn ingress(hull: &TestHull) -> SocketAddr {
    SocketAddr::from((hull.outer, hull.http_port))
}

fn web_root(hull: &TestHull, dir: &str, text: &str) {
    block_on(hull.sh(&format!("mkdir -p {dir} && echo {text} > {dir}/index.html")));
}

#[test]
fn wildcard_and_loopback_servers_are_listed_forwarded_and_routed() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    web_root(&hull, "/www-any", "hello-any");
    web_root(&hull, "/www-lo", "hello-lo");
    hull.add_service(
        "any",
        "exec httpd -f -p 0.0.0.0:8000 -h /www-any",
        &[],
        None,
        RestartPolicy::Always,
    );
    hull.add_service(
        "lo",
        "exec httpd -f -p 127.0.0.1:8001 -h /www-lo",
        &[],
        Some(8001),
        RestartPolicy::Always,
    );

    let any = wait_listed(&hull, 8000);
    let lo = wait_listed(&hull, 8001);
    assert_eq!(any["address"], "0.0.0.0");
    assert_eq!(lo["address"], "127.0.0.1");
    for p in [&any, &lo] {
        assert_eq!(p["command"], "httpd", "{p}");
        assert!(p["pid"].as_i64().unwrap() > 1, "{p}");
        assert_eq!(p["exposure"], "forwarded", "{p}");
    }
    assert_eq!(any["outer"], format!("{}:8000", hull.outer));

    // TCP forwarding, on the same port numbers of the test's address.
    let (status, _, body) = get(SocketAddr::from((hull.outer, 8000)), "x", "/");
    assert_eq!((status, body), (200, b"hello-any\n".to_vec()));
    let (status, _, body) = get(SocketAddr::from((hull.outer, 8001)), "x", "/");
    assert_eq!((status, body), (200, b"hello-lo\n".to_vec()));

    // HTTP ingress: by Host, and by the service that declared --http-port.
    let (status, _, body) = get(ingress(&hull), "8000.localhost", "/");
    assert_eq!((status, body), (200, b"hello-any\n".to_vec()));
    let (status, _, body) = get(ingress(&hull), "hull.example", "/");
    assert_eq!((status, body), (200, b"hello-lo\n".to_vec()));

    // Nothing on 8009: a 502 that names the port.
    let (status, _, body) = get(ingress(&hull), "8009.localhost", "/");
    assert_eq!(status, 502);
    assert!(String::from_utf8_lossy(&body).contains("8009"), "{body:?}");

    // The human table shows both.
    let table = String::from_utf8(hull.hull(&["ports"]).stdout).unwrap();
    assert!(table.contains("8000") && table.contains("8001"), "{table}");

    // Stopping one removes it from the list.
    let stop = hull.hull(&["services", "stop", "any"]);
    assert!(stop.status.success());
    let stopped = Instant::now();
    wait_until(Duration::from_secs(5), "port 8000 gone", || {
        listed(&hull, 8000).is_none()
    });
    eprintln!(
        "port 8000 left the list {:?} after the stop returned",
        stopped.elapsed()
    );
    assert!(listed(&hull, 8001).is_some());
}

/// A service `name` on `port` serving /`name`/blob (`mib` MiB of random
/// bytes) and /cgi-bin/sum (the sha256 of what is posted); returns the
/// blob's sha256.
fn blob_server(hull: &TestHull, name: &str, mib: usize, port: u16) -> String {
    let sum = block_on(hull.sh(&format!(
        "mkdir -p /{name}/cgi-bin && dd if=/dev/urandom of=/{name}/blob bs=1M count={mib} 2>/dev/null && \
         printf '#!/bin/sh\\necho Content-Type: text/plain\\necho\\nhead -c $CONTENT_LENGTH | sha256sum\\n' > /{name}/cgi-bin/sum && \
         chmod +x /{name}/cgi-bin/sum && sha256sum /{name}/blob"
    )));
    hull.add_service(
        name,
        &format!("exec httpd -f -p {port} -h /{name}"),
        &[],
        None,
        RestartPolicy::Always,
    );
    wait_listed(hull, port);
    sum.split_whitespace().next().unwrap().to_string()
}

#[test]
fn a_hundred_megabytes_go_up_and_down_through_ingress_intact() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        memory_max: "512M",
        ..Limits::default()
    });
    let want = blob_server(&hull, "big", 100, 8100);

    let (status, _, body) = get(ingress(&hull), "8100.localhost", "/blob");
    assert_eq!(status, 200);
    assert_eq!(body.len(), 100 << 20);
    assert_eq!(format!("{:x}", Sha256::digest(&body)), want);

    let upload: Vec<u8> = (0..100u32 << 20)
        .map(|i| u8::try_from((i.wrapping_mul(2654435761) >> 13) & 0xff).unwrap())
        .collect();
    let (status, _, body) = http(
        ingress(&hull),
        "8100.localhost",
        &format!(
            "POST /cgi-bin/sum HTTP/1.1\r\nContent-Length: {}\r\n",
            upload.len()
        ),
        &upload,
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let got = String::from_utf8_lossy(&body);
    assert!(
        got.contains(&format!("{:x}", Sha256::digest(&upload))),
        "the inner saw a different upload: {got}"
    );
}

/// The server is a shell script behind busybox nc: it answers the
/// handshake (with the real Sec-WebSocket-Accept) and then echoes bytes.
#[test]
fn a_websocket_upgrade_echoes_through_http_ingress() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    block_on(hull.sh(
        "cat > /ws.sh <<'EOF'\n#!/bin/sh\nkey=\nwhile IFS= read -r line; do\n  line=$(printf '%s' \"$line\" | tr -d '\\r')\n  [ -z \"$line\" ] && break\n  case \"$line\" in Sec-WebSocket-Key:*|sec-websocket-key:*) key=${line#*: };; esac\ndone\naccept=$(printf '%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11' \"$key\" | sha1sum | cut -d' ' -f1 | xxd -r -p | base64)\nprintf 'HTTP/1.1 101 Switching Protocols\\r\\nUpgrade: websocket\\r\\nConnection: Upgrade\\r\\nSec-WebSocket-Accept: %s\\r\\n\\r\\n' \"$accept\"\nexec cat\nEOF\nchmod +x /ws.sh",
    ));
    hull.add_service(
        "ws",
        "exec nc -ll -p 8200 -e /ws.sh",
        &[],
        None,
        RestartPolicy::Always,
    );
    wait_listed(&hull, 8200);

    let mut s = TcpStream::connect(ingress(&hull)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        b"GET /chat HTTP/1.1\r\nHost: 8200.localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        assert_eq!(
            s.read(&mut byte).unwrap(),
            1,
            "EOF in the 101 head: {head:?}"
        );
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_string();
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // RFC 6455's own example key and accept value.
    assert!(head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="), "{head}");
    // A masked text frame "hello ws", then raw bytes both ways.
    let frame = [
        0x81u8,
        0x88,
        1,
        2,
        3,
        4,
        b'h' ^ 1,
        b'e' ^ 2,
        b'l' ^ 3,
        b'l' ^ 4,
        b'o' ^ 1,
        b' ' ^ 2,
        b'w' ^ 3,
        b's' ^ 4,
    ];
    s.write_all(&frame).unwrap();
    let mut echo = [0u8; 14];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(echo, frame);
}

/// Web root /www on 8300 for the bounce tests. Each start of the server
/// counts itself in /root/runs; `/cgi-bin/who` notes each request it gets
/// in /root/arrivals with the run that got it, and answers with that run,
/// except that with `hold` in the query it never answers in run 1.
fn counting_web_server(hull: &TestHull) {
    block_on(hull.sh(
        "mkdir -p /www/cgi-bin && cat > /www/cgi-bin/who <<'EOF'\n#!/bin/sh\nrun=$(cat /root/runs)\necho $run >> /root/arrivals\ncase \"$run $QUERY_STRING\" in '1 hold') exec sleep 1000;; esac\nprintf 'Content-Type: text/plain\\r\\n\\r\\nanswered-by-run-%s\\n' $run\nEOF\nchmod +x /www/cgi-bin/who",
    ));
    hull.add_service(
        "web",
        "echo $(( $(cat /root/runs 2>/dev/null || echo 0) + 1 )) > /root/runs; exec httpd -f -p 8300 -h /www",
        &[],
        Some(8300),
        RestartPolicy::Always,
    );
    wait_listed(hull, 8300);
}

/// A GET through HTTP ingress on a thread of its own; the answer comes
/// back on the channel.
fn get_in_background(hull: &TestHull, path: &'static str) -> Receiver<(u16, String, Vec<u8>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let addr = ingress(hull);
    std::thread::spawn(move || {
        let _ = tx.send(get(addr, "8300.localhost", path));
    });
    rx
}

/// The run a `/cgi-bin/who` answer names (its body may come chunked).
fn answered_by(body: &[u8]) -> Option<u32> {
    let text = String::from_utf8_lossy(body);
    let (_, rest) = text.split_once("answered-by-run-")?;
    rest.split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

fn arrivals(hull: &TestHull) -> Vec<String> {
    block_on(hull.sh("cat /root/arrivals 2>/dev/null || true"))
        .lines()
        .map(str::to_owned)
        .collect()
}

/// After the one bounce `report` tells of, the request waiting on `answer`
/// was answered by the server's second run, and the runs saw it `seen`.
fn answered_by_run_2(
    hull: &TestHull,
    report: &BounceReport,
    answer: &Receiver<(u16, String, Vec<u8>)>,
    seen: &[&str],
) {
    assert_eq!(report.bounces, 1);
    let (status, _, body) = answer
        .recv_timeout(Duration::from_secs(60))
        .expect("no answer after the bounce");
    assert_eq!((status, answered_by(&body)), (200, Some(2)));
    assert_eq!(
        arrivals(hull),
        seen,
        "the runs of the server that saw the request"
    );
}

/// Bounce tests wait on the inner: a long wait_secs keeps a slow machine
/// from turning a wait into a 502.
fn bounce_limits() -> Limits {
    Limits {
        network_extra: "wait_secs = 60".into(),
        ..Limits::default()
    }
}

/// Catches an ingress that cuts a request when the server handling it dies
/// in a bounce, instead of sending it again to the server that comes back.
/// The overlap is by construction, not by timing: the old server has the
/// request (it noted it, in run 1) before the bounce is asked for, holds it
/// unanswered until the bounce kills it, and the one answer the client gets
/// comes from run 2, which exists only after the bounce.
#[test]
fn a_request_a_bounce_catches_in_the_server_is_answered_by_the_new_inner() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(bounce_limits());
    counting_web_server(&hull);
    let answer = get_in_background(&hull, "/cgi-bin/who?hold");
    wait_until(Duration::from_secs(30), "the request held by run 1", || {
        arrivals(&hull) == ["1"]
    });
    assert!(
        answer.try_recv().is_err(),
        "run 1 answered a request it holds"
    );
    let report = block_on(async { hull.client().await.bounce(0).await.unwrap() });
    answered_by_run_2(&hull, &report, &answer, &["1", "2"]);
}

/// The `holdout` service's process, which ignores SIGTERM; killed from the
/// root namespace when the test lets the bounce go on, or fails (so a
/// failed test does not sit out the bounce's whole grace).
struct Holdout<'a>(&'a TestHull);

impl Holdout<'_> {
    const ARGV: [&'static str; 2] = ["sleep", "4242"];

    fn pids(&self) -> Vec<i32> {
        inner_pids_running(self.0, &Self::ARGV)
    }

    fn release(&self) {
        for pid in self.pids() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

impl Drop for Holdout<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// Catches an ingress that answers 502 (or drops the connection) when a
/// request comes while the inner is down, instead of waiting for the port
/// to listen again. The inner is held down by a process that ignores
/// SIGTERM, under a long grace: the request is sent after hulld reports the
/// inner stopping and the old server is gone, hulld still reports it
/// stopping afterwards, and only then does the test kill that process from
/// the root namespace so the bounce can go on. No step depends on timing.
#[test]
fn a_request_sent_while_the_inner_is_down_is_answered_by_the_new_inner() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(bounce_limits());
    counting_web_server(&hull);
    hull.add_service(
        "holdout",
        &format!("trap '' TERM; exec {}", Holdout::ARGV.join(" ")),
        &[],
        None,
        RestartPolicy::Always,
    );
    let holdout = Holdout(&hull);
    wait_until(Duration::from_secs(10), "the holdout running", || {
        !holdout.pids().is_empty()
    });
    let status = || block_on(async { hull.client().await.status().await.unwrap() });
    let bounce = std::thread::spawn({
        let socket = hull.socket.clone();
        move || {
            block_on(async {
                hull_outer::client::Client::connect(&socket)
                    .await
                    .unwrap()
                    .bounce(120_000)
                    .await
            })
        }
    });
    wait_until(Duration::from_secs(30), "the inner stopping", || {
        status().state == InnerState::Stopping
    });
    wait_until(Duration::from_secs(30), "the old server gone", || {
        inner_pids_running(&hull, &["httpd", "-f", "-p", "8300", "-h", "/www"]).is_empty()
    });
    let answer = get_in_background(&hull, "/cgi-bin/who");
    // Give hulld the request while the inner is down (a bound, not a
    // measurement: the assertions below hold however long it takes).
    std::thread::sleep(Duration::from_millis(300));
    let during = status();
    assert_eq!(
        (during.state, during.bounces),
        (InnerState::Stopping, 0),
        "the inner came back before the request was sent"
    );
    assert!(
        answer.try_recv().is_err(),
        "answered while the inner was down"
    );
    holdout.release();
    let report = bounce.join().unwrap().unwrap();
    answered_by_run_2(&hull, &report, &answer, &["2"]);
    // Plain TCP cannot replay bytes a dying server swallowed, so the
    // forwarded port is checked once the bounce is over: its outer
    // listener outlived the inner's and a new connection gets through.
    let (status, _, body) = get(SocketAddr::from((hull.outer, 8300)), "x", "/cgi-bin/who");
    assert_eq!((status, answered_by(&body)), (200, Some(2)), "forwarded");
}

#[test]
fn private_ports_need_the_bearer_token() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        network_extra: "private_ports = [8400]".into(),
        ..Limits::default()
    });
    web_root(&hull, "/p", "secret");
    web_root(&hull, "/q", "public");
    hull.add_service(
        "p",
        "exec httpd -f -p 8400 -h /p",
        &[],
        None,
        RestartPolicy::Always,
    );
    hull.add_service(
        "q",
        "exec httpd -f -p 8401 -h /q",
        &[],
        None,
        RestartPolicy::Always,
    );
    wait_listed(&hull, 8400);
    wait_listed(&hull, 8401);
    let out = hull.hull(&["ingress", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let token = report["token"].as_str().unwrap().to_string();
    assert_eq!(token.len(), 64);
    let mode = std::fs::metadata(hull.state_dir.join("ingress.token")).unwrap();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode.permissions()) & 0o777,
        0o600
    );

    let req = |auth: Option<&str>| {
        let extra = auth
            .map(|a| format!("Authorization: {a}\r\n"))
            .unwrap_or_default();
        http(
            ingress(&hull),
            "8400.localhost",
            &format!("GET / HTTP/1.1\r\n{extra}"),
            b"",
        )
    };
    assert_eq!(req(None).0, 401);
    assert_eq!(req(Some("Bearer nope")).0, 401);
    let mut wrong = token.clone().into_bytes();
    wrong[10] = if wrong[10] == b'a' { b'b' } else { b'a' };
    assert_eq!(
        req(Some(&format!(
            "Bearer {}",
            String::from_utf8(wrong).unwrap()
        )))
        .0,
        401
    );
    let (status, _, body) = req(Some(&format!("Bearer {token}")));
    assert_eq!((status, body), (200, b"secret\n".to_vec()));
    // Not private: no token needed.
    let (status, _, body) = get(ingress(&hull), "8401.localhost", "/");
    assert_eq!((status, body), (200, b"public\n".to_vec()));
    assert_eq!(listed(&hull, 8400).unwrap()["private"], true);
    // The raw forward of the same port would skip the token: a private
    // port is reached through HTTP ingress only.
    assert_eq!(listed(&hull, 8400).unwrap()["exposure"], "private");
    let raw = std::net::TcpStream::connect_timeout(
        &SocketAddr::from((hull.outer, 8400)),
        Duration::from_secs(2),
    );
    assert!(
        raw.is_err(),
        "private port 8400 is forwarded raw, without the token"
    );
    let (status, _, body) = http(
        SocketAddr::from((hull.outer, 8401)),
        "x",
        "GET / HTTP/1.1\r\n",
        b"",
    );
    assert_eq!(
        (status, body),
        (200, b"public\n".to_vec()),
        "public 8401 raw"
    );
}

/// `expose` is the list of inner ports reachable from outside at all: HTTP
/// ingress reached any port by `Host: PORT.x`.
#[test]
fn http_ingress_keeps_to_the_expose_list() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        network_extra: "expose = \"8401\"".into(),
        ..Limits::default()
    });
    web_root(&hull, "/p", "hidden");
    web_root(&hull, "/q", "shown");
    for (name, port, dir) in [("p", 8400, "/p"), ("q", 8401, "/q")] {
        hull.add_service(
            name,
            &format!("exec httpd -f -p {port} -h {dir}"),
            &[],
            None,
            RestartPolicy::Always,
        );
    }
    wait_listed(&hull, 8401);
    wait_listed(&hull, 8400);
    let (status, _, body) = get(ingress(&hull), "8400.localhost", "/");
    assert_eq!(
        status,
        403,
        "port 8400 is outside expose: {}",
        String::from_utf8_lossy(&body)
    );
    assert!(String::from_utf8_lossy(&body).contains("8400"));
    let (status, _, body) = get(ingress(&hull), "8401.localhost", "/");
    assert_eq!((status, body), (200, b"shown\n".to_vec()));
}

/// A network namespace of the test's own, reached from the root namespace
/// through a veth in 198.18.0.0/15 (the benchmarking range): a stand-in for
/// the world outside the VM. Removed on drop.
struct OutsideNetns {
    name: String,
    link: String,
    router_ip: std::net::Ipv4Addr,
    server_ip: std::net::Ipv4Addr,
}

impl OutsideNetns {
    fn create() -> OutsideNetns {
        let id = std::process::id() % 0x4000;
        let name = format!("hull-out-{id}");
        let link = format!("hullout{id}");
        let third = u8::try_from(id >> 6).unwrap();
        let fourth = u8::try_from((id & 0x3f) << 2).unwrap();
        let base = std::net::Ipv4Addr::new(198, 18, third, fourth);
        let router_ip = std::net::Ipv4Addr::from(u32::from(base) + 1);
        let server_ip = std::net::Ipv4Addr::from(u32::from(base) + 2);
        let outside = OutsideNetns {
            name,
            link,
            router_ip,
            server_ip,
        };
        let (n, l) = (outside.name.as_str(), outside.link.as_str());
        let (r, sv) = (format!("{router_ip}/30"), format!("{server_ip}/30"));
        for args in [
            vec!["netns", "add", n],
            vec![
                "link", "add", l, "type", "veth", "peer", "name", "eth0", "netns", n,
            ],
            vec!["addr", "add", &r, "dev", l],
            vec!["link", "set", l, "up"],
            vec!["-n", n, "addr", "add", &sv, "dev", "eth0"],
            vec!["-n", n, "link", "set", "eth0", "up"],
            vec!["-n", n, "link", "set", "lo", "up"],
        ] {
            let out = std::process::Command::new("ip")
                .args(&args)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "ip {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        outside
    }

    /// A listener on the server address, made inside the namespace.
    fn listen(&self) -> std::net::TcpListener {
        let ns = std::fs::File::open(format!("/var/run/netns/{}", self.name)).unwrap();
        let ip = self.server_ip;
        std::thread::spawn(move || {
            use std::os::fd::AsFd;
            nix::sched::setns(ns.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            std::net::TcpListener::bind((ip, 0)).unwrap()
        })
        .join()
        .unwrap()
    }
}

impl Drop for OutsideNetns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[test]
fn the_inner_reaches_a_server_through_its_veth_but_not_hulld() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        network: "nat",
        ..Limits::default()
    });
    let out = hull.hull(&["ingress", "--json"]);
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let gateway = report["gateway"]
        .as_str()
        .expect("a gateway in nat mode")
        .to_string();
    let inner = report["inner_address"].as_str().unwrap().to_string();

    // A server beyond the VM, played by a network namespace of the
    // test's own behind a veth of its own: the inner's packets to it are
    // forwarded and masqueraded, as to any address outside.
    let outside = OutsideNetns::create();
    let server = outside.listen();
    let port = server.local_addr().unwrap().port();
    let serve = std::thread::spawn(move || {
        let (mut conn, peer) = server.accept().unwrap();
        let mut line = [0u8; 5];
        conn.read_exact(&mut line).unwrap();
        conn.write_all(b"pong\n").unwrap();
        (peer, line)
    });
    let got = block_on(hull.sh(&format!("echo ping | nc -w 5 {} {port}", outside.server_ip)));
    assert_eq!(got, "pong\n");
    let (peer, line) = serve.join().unwrap();
    assert_eq!(&line, b"ping\n");
    assert_eq!(
        peer.ip(),
        std::net::IpAddr::V4(outside.router_ip),
        "masqueraded behind the VM (the inner is {inner})"
    );

    // The inner's resolv.conf is hulld's.
    let resolv = block_on(hull.sh("cat /etc/resolv.conf"));
    assert!(resolv.contains("Written by hulld"), "{resolv}");

    // hulld's listeners: its HTTP ingress on the outer address is the
    // inner's own loopback from inside, and via the gateway nothing
    // listens; the control socket is not in the inner's mount namespace.
    let socket = hull.socket.display().to_string();
    let probe = block_on(hull.exec(&[
        "sh",
        "-c",
        &format!(
            "nc -w 2 {outer} {http} </dev/null; echo a=$?; nc -w 2 {gateway} {http} </dev/null; echo b=$?; test -e {socket}; echo c=$?",
            outer = hull.outer,
            http = hull.http_port,
        ),
    ]));
    let text = String::from_utf8_lossy(&probe.stdout);
    assert!(
        text.contains("a=1") && text.contains("b=1") && text.contains("c=1"),
        "{text}"
    );
}

/// The inner listens on the HTTP ingress port itself: that port is not
/// forwarded, `hull ports` says why, and HTTP ingress still reaches it.
#[test]
fn the_ingress_port_in_the_inner_is_reached_through_http_ingress() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    web_root(&hull, "/t", "via-http");
    let port = hull.http_port;
    hull.add_service(
        "t",
        &format!("exec httpd -f -p {port} -h /t"),
        &[],
        None,
        RestartPolicy::Always,
    );
    let entry = wait_listed(&hull, port);
    assert_eq!(entry["exposure"], "not-forwarded", "{entry}");
    let table = String::from_utf8(hull.hull(&["ports"]).stdout).unwrap();
    assert!(
        table.contains("not forwarded: hulld's HTTP ingress listens on"),
        "{table}"
    );
    let (status, _, body) = get(ingress(&hull), &format!("{port}.localhost"), "/");
    assert_eq!((status, body), (200, b"via-http\n".to_vec()));
}

/// Many connections at once through one forwarded port, each with its own
/// request and answer.
#[test]
fn hundreds_of_concurrent_forwarded_connections_each_get_their_answer() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        pids_max: 2048,
        ..Limits::default()
    });
    block_on(hull.sh("mkdir -p /c && for i in $(seq 0 9); do echo file-$i > /c/f$i; done"));
    hull.add_service(
        "c",
        "exec httpd -f -p 8500 -h /c",
        &[],
        None,
        RestartPolicy::Always,
    );
    wait_listed(&hull, 8500);
    let addr = SocketAddr::from((hull.outer, 8500));
    // Open them all first, so they are concurrent, then ask on each. In
    // waves: the forwarder dials the inner's port for each connection it
    // accepts, and busybox httpd listens with a backlog of 9, so 500 dials
    // at once overflow its queue, and the kernel's recovery from that
    // (retransmitted SYNs and SYN-ACKs) is what a burst would test, not
    // the forwarder.
    let conns: Vec<TcpStream> = (0..500)
        .map(|i| {
            if i % 25 == 24 {
                std::thread::sleep(Duration::from_millis(50));
            }
            TcpStream::connect(addr).unwrap()
        })
        .collect();
    let threads: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(i, mut s)| {
            std::thread::spawn(move || {
                // busybox httpd listens with a backlog of 9: most of the
                // forwarder's 500 upstream connects wait for SYN
                // retransmits (1, 2, 4, 8, 16 s...), past 30 s when the
                // machine is busy. The wait is the upstream's, not hull's.
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                let req = format!(
                    "GET /f{} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    i % 10
                );
                s.write_all(req.as_bytes()).unwrap();
                let mut out = Vec::new();
                s.read_to_end(&mut out).unwrap();
                let (status, _, body) = split_response(&out);
                assert_eq!(
                    (status, body),
                    (200, format!("file-{}\n", i % 10).into_bytes()),
                    "connection {i}"
                );
            })
        })
        .collect();
    let failed = threads
        .into_iter()
        .map(std::thread::JoinHandle::join)
        .filter(Result::is_err)
        .count();
    if failed > 0 {
        let log = hull.log();
        let relay_errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ended with an error") || l.contains("WARN"))
            .take(20)
            .collect();
        panic!("{failed} of 500 connections got no answer; hulld said:\n{relay_errors:#?}");
    }
}

/// Where a client connects for `url` and the Host it sends, as curl or a
/// browser does: a name under `localhost` is loopback (127.0.0.1).
fn target_of(url: &str, host_header: Option<&str>) -> (SocketAddr, String) {
    let rest = url
        .strip_prefix("http://")
        .unwrap_or_else(|| panic!("not an http URL: {url}"));
    let authority = rest.split('/').next().unwrap();
    let (host, port) = authority
        .rsplit_once(':')
        .unwrap_or_else(|| panic!("no port in {url}"));
    let port: u16 = port.parse().unwrap();
    let ip: std::net::IpAddr = if host == "localhost" || host.ends_with(".localhost") {
        std::net::Ipv4Addr::LOCALHOST.into()
    } else {
        host.trim_matches(|c| c == '[' || c == ']')
            .parse()
            .unwrap_or_else(|e| panic!("{host} in {url} is neither localhost nor an address: {e}"))
    };
    (
        SocketAddr::new(ip, port),
        host_header.unwrap_or(authority).to_string(),
    )
}

#[test]
fn ports_prints_urls_that_connect_and_the_inner_may_read_them() {
    if !require_root() {
        return;
    }
    // The test's ingress listens on its own loopback address, not
    // 127.0.0.1: where `PORT.localhost` does not reach.
    let hull = TestHull::start();
    assert_ne!(hull.outer, std::net::Ipv4Addr::LOCALHOST);
    web_root(&hull, "/www-url", "hello-url");
    hull.add_service(
        "web",
        "exec httpd -f -p 0.0.0.0:8300 -h /www-url",
        &[],
        None,
        RestartPolicy::Always,
    );
    // A port below 1024 is not forwarded unless exposed: HTTP ingress
    // reaches it.
    hull.add_service(
        "low",
        "exec httpd -f -p 0.0.0.0:81 -h /www-url",
        &[],
        None,
        RestartPolicy::Always,
    );
    let p = wait_listed(&hull, 8300);
    let low = wait_listed(&hull, 81);
    // A forwarded port's URL is its forwarded address: no Host needed.
    assert_eq!(p["http_url"], format!("http://{}:8300/", hull.outer), "{p}");
    assert_eq!(p["http_host"], serde_json::Value::Null, "{p}");
    // One that is not forwarded is reached through HTTP ingress, which
    // listens on the test's own address: the Host header names the port.
    assert_eq!(
        (low["http_url"].clone(), low["http_host"].clone()),
        (
            format!("http://{}:{}/", hull.outer, hull.http_port).into(),
            "81.localhost".into()
        ),
        "{low}"
    );
    for q in [&p, &low] {
        let url = q["http_url"].as_str().unwrap_or_else(|| panic!("{q}"));
        let (addr, host) = target_of(url, q["http_host"].as_str());
        let (status, _, body) = get(addr, &host, "/");
        assert_eq!((status, body), (200, b"hello-url\n".to_vec()), "{q}");
    }
    // The table gives commands that work as pasted.
    let table = String::from_utf8(hull.hull(&["ports"]).stdout).unwrap();
    assert!(
        table.contains(&format!("http://{}:8300/", hull.outer)),
        "{table}"
    );
    assert!(
        table.contains(&format!(
            "curl -H 'Host: 81.localhost' http://{}:{}/",
            hull.outer, hull.http_port
        )),
        "{table}"
    );

    // From inside the inner: the same report, and where ingress listens.
    let inside = block_on(hull.sh("hull --json ports"));
    let inside: serde_json::Value = serde_json::from_str(&inside)
        .unwrap_or_else(|e| panic!("hull ports in the inner ({e}): {inside:?}"));
    let mine = inside["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["port"] == 8300)
        .unwrap_or_else(|| panic!("{inside}"));
    assert_eq!(mine["http_url"], p["http_url"], "{mine}");
    // Its owner is named by its pid inside the inner, as the inner's own
    // tools name it, whoever asks.
    let pid = mine["pid"].as_i64().unwrap_or_else(|| panic!("{mine}"));
    let inside = block_on(hull.sh(&format!("tr '\\0' ' ' < /proc/{pid}/cmdline")));
    assert!(
        inside.contains("0.0.0.0:8300"),
        "pid {pid} in the inner: {inside:?}"
    );
    assert_eq!(p["pid"], mine["pid"], "{p}");
    let ingress = block_on(hull.sh("hull --json ingress"));
    let ingress: serde_json::Value = serde_json::from_str(&ingress)
        .unwrap_or_else(|e| panic!("hull ingress in the inner ({e}): {ingress:?}"));
    assert_eq!(
        ingress["http"],
        format!("{}:{}", hull.outer, hull.http_port),
        "{ingress}"
    );
    assert_eq!(ingress["token"], "", "the inner got the bearer token");
    let help = block_on(hull.sh("hull --help"));
    assert!(
        help.contains("ports") && help.contains("ingress"),
        "help inside the inner: {help}"
    );
}

/// utime + stime of every thread of a process, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// With `forward_in_kernel`, TCP forwarding moves the bytes in the kernel
/// (a sockmap redirect):
/// hulld spends a small part of the CPU on a big download that HTTP
/// ingress, which copies, spends on the same one (copying, forwarding
/// took as much: 32 ticks to 34); and the bytes and the end of the
/// stream arrive intact both ways.
#[test]
fn forwarded_bytes_are_moved_by_the_kernel_not_copied_by_hulld() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start_with(Limits {
        memory_max: "512M",
        network_extra: "forward_in_kernel = true".into(),
        ..Limits::default()
    });
    let want = blob_server(&hull, "fwd", 128, 8130);
    let hulld = hull.hulld_pid();
    let forwarded = SocketAddr::from((hull.outer, 8130));

    let spent = |f: &dyn Fn()| {
        let before = cpu_ticks(hulld);
        f();
        cpu_ticks(hulld) - before
    };
    let download = |addr: SocketAddr, host: &str| {
        let (status, _, body) = get(addr, host, "/blob");
        assert_eq!(status, 200);
        assert_eq!(body.len(), 128 << 20);
        assert_eq!(format!("{:x}", Sha256::digest(&body)), want);
    };
    let copied = spent(&|| {
        for _ in 0..2 {
            download(ingress(&hull), "8130.localhost")
        }
    });
    let redirected = spent(&|| {
        for _ in 0..2 {
            download(forwarded, "x")
        }
    });
    eprintln!(
        "hulld's CPU ticks for 256 MiB: {copied} through HTTP ingress, {redirected} forwarded"
    );
    assert!(
        copied >= 4 && redirected * 2 <= copied,
        "hulld spent {redirected} ticks forwarding what HTTP ingress copied in {copied}: \
         the forwarded bytes went through hulld\n{}",
        hull.log()
    );

    let upload: Vec<u8> = (0..32u32 << 20)
        .map(|i| u8::try_from((i.wrapping_mul(2654435761) >> 13) & 0xff).unwrap())
        .collect();
    // busybox's CGI answer is not quite HTTP (a bare \n after its
    // header), so this one is read raw.
    let mut s = TcpStream::connect(forwarded).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    write!(
        s,
        "POST /cgi-bin/sum HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
        upload.len()
    )
    .unwrap();
    s.write_all(&upload).unwrap();
    let mut answer = Vec::new();
    s.read_to_end(&mut answer).unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.contains(&format!("{:x}", Sha256::digest(&upload))),
        "the inner saw a different upload: {answer}"
    );
}
