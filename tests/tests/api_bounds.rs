//! The HTTP API's connection bounds, tried as a hostile client would:
//! upgraded connections count under
//! `api.max_connections` as long as they live, file watches share one
//! inotify instance, and clients that never present a token neither hold
//! the API nor keep a token holder out. Each attack runs under a
//! [`Siege`]: hulld keeps its pid, stays under 64 MiB and answers
//! `status` within 1 s. Floods are bounded in count and time, on loopback.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use hull_tests::attacks::api::{
    anonymous_flood, connect_std_from, hold_websockets, inotify_instances, upgrade, Anonymous,
    Upgrade,
};
use hull_tests::http::request;
use hull_tests::siege::Siege;
use hull_tests::{block_on, require_root, wait_until, Limits, TestHull};
use tokio_tungstenite::tungstenite::Message;

/// A hulld with `api_extra` in its `[api]` table; its API's address, a
/// token of `scope` and the sandbox's name.
fn start(api_extra: &str, scope: &str) -> Option<(TestHull, SocketAddr, String, String)> {
    if !require_root() {
        return None;
    }
    let hull = TestHull::start_with(Limits {
        api_extra: api_extra.to_string(),
        ..Limits::default()
    });
    let addr = block_on(hull.api_addr());
    let token = hull.api_token(scope);
    let r = request(addr, "GET", "/v1/sprites", Some(&token), None);
    assert_eq!(r.status, 200, "{r:?}; log:\n{}", hull.log());
    let name = r.json()["sprites"][0]["name"].as_str().unwrap().to_string();
    // The connection of that request has closed, and given back its place.
    std::thread::sleep(Duration::from_millis(200));
    Some((hull, addr, token, name))
}

/// A request on a raw connection from `source`, read to its end: the
/// status line and the rest, or how it failed.
fn raw_from(addr: SocketAddr, source: Ipv4Addr, token: Option<&str>) -> Result<String, String> {
    let mut stream = connect_std_from(addr, source).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut head = format!("GET /v1/sprites HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        head.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    head.push_str("\r\n");
    stream
        .write_all(head.as_bytes())
        .map_err(|e| e.to_string())?;
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => Ok(String::from_utf8_lossy(&answer).to_string()),
        Err(e) if !answer.is_empty() => {
            Ok(format!("{}\n(then {e})", String::from_utf8_lossy(&answer)))
        }
        Err(e) => Err(e.to_string()),
    }
}

/// With a read token, 1,581 idle `/hull` tunnels were accepted
/// in 0.3 s and hulld was OOM-killed; the tunnel never took a place under
/// the cap.
#[test]
fn idle_tunnels_past_the_cap_are_refused_and_hulld_holds() {
    const CAP: usize = 32;
    let Some((hull, addr, token, name)) = start(&format!("max_connections = {CAP}\n"), "read")
    else {
        return;
    };
    let siege = Siege::begin(&hull);
    let path = format!("/v1/sprites/{name}/hull");
    let kept = block_on(async {
        let mut held = hold_websockets(addr, &path, &token, 2 * CAP).await;
        let opened = held.open.len();
        assert!(
            (CAP - 2..=CAP).contains(&opened),
            "{opened} tunnels opened under a cap of {CAP}; refused {:?}, closed {:?}",
            held.refused,
            held.closed
        );
        assert_eq!(held.refused.len() + held.closed.len(), 2 * CAP - opened);
        for (status, body) in &held.refused {
            assert_eq!(*status, 503, "{body}");
            assert!(body.contains("api.max_connections"), "{body}");
        }
        assert!(
            !held.refused.is_empty(),
            "no refusal said why: every one was a closed connection: {:?}",
            held.closed
        );
        // While every place is held, a plain request is refused too, and
        // told why.
        let r = raw_from(addr, Ipv4Addr::LOCALHOST, Some(&token));
        if let Ok(answer) = &r {
            assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
            assert!(answer.contains("too_many_connections"), "{answer}");
        }
        // The tunnels that opened are live ...
        let ws = held.open.last_mut().unwrap();
        ws.send(Message::Ping(Vec::new().into())).await.unwrap();
        // ... and once half of them close, a new client gets in beside
        // the rest.
        held.open.truncate(CAP / 2);
        held.open
    });
    siege.assert_held(&hull, "64 idle /hull tunnels against a cap of 32");
    wait_until(
        Duration::from_secs(5),
        "a request after tunnels closed",
        || request(addr, "GET", "/v1/sprites", Some(&token), None).status == 200,
    );
    drop(kept);
}

/// 128 `fs/watch` WebSockets used every inotify instance root
/// has on the VM; the 129th, and every root process after it, got EMFILE.
#[test]
fn file_watches_past_the_inotify_instance_limit_share_one() {
    const WATCHES: usize = 140;
    // All of them from this one address.
    let Some((hull, addr, token, name)) = start("max_connections_per_source = 256\n", "read")
    else {
        return;
    };
    let hulld = hull.hulld_pid();
    let siege = Siege::begin(&hull);
    let path = format!("/v1/sprites/{name}/fs/watch?path=/tmp");
    block_on(async {
        let mut held = hold_websockets(addr, &path, &token, WATCHES).await;
        assert_eq!(
            held.open.len(),
            WATCHES,
            "refused {:?}, closed {:?}; log:\n{}",
            held.refused,
            held.closed,
            hull.log()
        );
        let instances = inotify_instances(hulld);
        assert!(
            instances <= 1,
            "{WATCHES} watches hold {instances} inotify instances in hulld"
        );
        // Root's other processes still get one.
        // SAFETY: inotify_init1 takes flags and returns a new fd or -1.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
        assert!(
            fd >= 0,
            "inotify_init1 failed beside {WATCHES} watches: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just opened here and is closed once.
        unsafe { libc::close(fd) };
        // Every watch still sees what happens, the first and the last.
        hull.sh("touch /tmp/after-the-watches").await;
        for i in [0, WATCHES - 1] {
            let ws = &mut held.open[i];
            let seen = tokio::time::timeout(Duration::from_secs(10), async {
                while let Some(Ok(message)) = ws.next().await {
                    if let Message::Text(text) = message {
                        if text.contains("/tmp/after-the-watches") {
                            return text.to_string();
                        }
                    }
                }
                String::new()
            })
            .await
            .unwrap_or_default();
            assert!(seen.contains("\"create\""), "watch {i} saw {seen:?}");
        }
        drop(held);
    });
    siege.assert_held(&hull, "140 fs/watch WebSockets");
    // The watches' descriptors go with their clients: a new one works.
    block_on(async {
        let mut again = hold_websockets(addr, &path, &token, 1).await;
        assert_eq!(again.open.len(), 1, "{again:?}");
        hull.sh("touch /tmp/once-more").await;
        let ws = &mut again.open[0];
        let seen = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(Ok(Message::Text(text))) = ws.next().await {
                if text.contains("/tmp/once-more") {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(seen, Ok(true));
    });
    assert!(inotify_instances(hulld) <= 1);
}

/// Requests with a token made every `every` until `until`: each must be
/// answered 200 within 1 s. The slowest.
fn token_holder(addr: SocketAddr, token: &str, until: Instant, every: Duration) -> Duration {
    let mut slowest = Duration::ZERO;
    let mut asked = 0;
    while Instant::now() < until {
        let started = Instant::now();
        let r = request(addr, "GET", "/v1/sprites", Some(token), None);
        let took = started.elapsed();
        assert_eq!(r.status, 200, "request {asked} during the flood: {r:?}");
        assert!(
            took < Duration::from_secs(1),
            "request {asked} took {took:?}"
        );
        slowest = slowest.max(took);
        asked += 1;
        std::thread::sleep(every);
    }
    assert!(asked > 5, "only {asked} requests were made");
    slowest
}

/// 256 connections that send nothing, or their headers slowly,
/// held the API for 10 s each and reconnected at once. Here they fill
/// every place there is (the per-source cap as high as the total), and a
/// client with a token still gets in each time, at once.
#[test]
fn an_anonymous_flood_at_the_cap_leaves_room_for_a_token_holder() {
    const CAP: usize = 64;
    let Some((hull, addr, token, _)) = start(
        &format!("max_connections = {CAP}\nmax_connections_per_source = {CAP}\n"),
        "read",
    ) else {
        return;
    };
    let siege = Siege::begin(&hull);
    for kind in [Anonymous::Silent, Anonymous::Slow] {
        let until = Instant::now() + Duration::from_secs(5);
        let flood = std::thread::spawn(move || {
            block_on(anonymous_flood(addr, 4 * CAP, &[], kind, until, 50_000))
        });
        // The flood fills the cap first.
        std::thread::sleep(Duration::from_millis(500));
        let slowest = token_holder(addr, &token, until, Duration::from_millis(200));
        let report = flood.join().unwrap();
        eprintln!("{kind:?} flood: {report:?}; the token holder's slowest request {slowest:?}");
        assert!(
            report.connections > 4 * CAP,
            "{kind:?}: the flood made only {} connections",
            report.connections
        );
        // None is held past the anonymous deadline (2 s), and a margin.
        assert!(
            report.longest < Duration::from_millis(3500),
            "{kind:?}: an anonymous connection was held {:?}",
            report.longest
        );
    }
    siege.assert_held(&hull, "anonymous floods at the connection cap");
}

/// One address holds at most `api.max_connections_per_source`: past it,
/// with every place held by a token holder, it is refused and told why,
/// while another address gets in, and an anonymous flood from a third
/// churns through its own share only.
#[test]
fn one_address_holds_at_most_its_share() {
    const SHARE: usize = 4;
    let Some((hull, addr, token, name)) =
        start(&format!("max_connections_per_source = {SHARE}\n"), "read")
    else {
        return;
    };
    let (other, flooder) = (Ipv4Addr::new(127, 0, 0, 2), Ipv4Addr::new(127, 0, 0, 3));
    let path = format!("/v1/sprites/{name}/hull");
    let held = block_on(async {
        let held = hold_websockets(addr, &path, &token, SHARE).await;
        assert_eq!(held.open.len(), SHARE, "{held:?}");
        match upgrade(addr, &path, &token, None).await {
            Upgrade::Refused { status, body } => {
                assert_eq!(status, 503, "{body}");
                assert!(body.contains("api.max_connections_per_source"), "{body}");
            }
            Upgrade::Closed(why) => eprintln!("refused without an answer: {why}"),
            Upgrade::Open(_) => panic!("a fifth tunnel from one address opened"),
        }
        held
    });
    let answer = raw_from(addr, Ipv4Addr::LOCALHOST, Some(&token));
    if let Ok(answer) = &answer {
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(
            answer.contains("api.max_connections_per_source"),
            "{answer}"
        );
    }
    let answer = raw_from(addr, other, Some(&token)).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");

    let siege = Siege::begin(&hull);
    let until = Instant::now() + Duration::from_secs(4);
    let flood = std::thread::spawn(move || {
        block_on(anonymous_flood(
            addr,
            64,
            &[flooder],
            Anonymous::Silent,
            until,
            50_000,
        ))
    });
    std::thread::sleep(Duration::from_millis(300));
    let mut asked = 0;
    while Instant::now() < until {
        let answer = raw_from(addr, other, Some(&token)).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        // A token holder at the flooder's own address competes with the
        // flood for that address's share, in which its connection, until
        // its headers are read, is as anonymous as the flood's: hulld
        // promises it nothing there. What it promises is the line above:
        // a flood from one address costs other addresses nothing.
        asked += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(asked > 5);
    let report = flood.join().unwrap();
    eprintln!("a flood from one address: {report:?}");
    siege.assert_held(&hull, "an anonymous flood from one address");
    drop(held);
}

/// Reads one response off a kept connection: its status and body.
fn read_response(stream: &mut std::net::TcpStream) -> (u16, String) {
    let mut bytes = Vec::new();
    let mut byte = [0u8; 1];
    while !bytes.ends_with(b"\r\n\r\n") {
        let n = stream.read(&mut byte).expect("a response head");
        assert!(
            n == 1,
            "the connection closed mid-head: {:?}",
            String::from_utf8_lossy(&bytes)
        );
        bytes.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&bytes).to_string();
    let status = head[9..12].parse().unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .unwrap_or(0);
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8_lossy(&body).to_string())
}

/// How long the server keeps a connection that sends `prefix` and then
/// (with `trickle`) a byte every 200 ms, until it closes it.
fn held_for(addr: SocketAddr, prefix: &[u8], trickle: bool) -> Duration {
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let opened = Instant::now();
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let _ = stream.write_all(prefix);
    let mut buf = [0u8; 256];
    while opened.elapsed() < Duration::from_secs(15) {
        match stream.read(&mut buf) {
            Ok(0) => return opened.elapsed(),
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if trickle && stream.write_all(b"a").is_err() {
                    return opened.elapsed();
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                if trickle && stream.write_all(b"a").is_err() {
                    return opened.elapsed();
                }
            }
            Err(_) => return opened.elapsed(),
        }
    }
    opened.elapsed()
}

/// A connection has `api.anonymous_header_timeout_ms` to present a token
/// (silent, or trickling its headers, it is closed then); one that has
/// presented a token keeps the 10 s of a request's headers, waiting
/// between requests included.
#[test]
fn an_anonymous_connection_has_a_short_deadline_and_a_token_holder_a_long_one() {
    let Some((_hull, addr, token, _)) = start("anonymous_header_timeout_ms = 1000\n", "read")
    else {
        return;
    };
    let silent = held_for(addr, b"", false);
    let trickling = held_for(
        addr,
        b"GET /v1/sprites HTTP/1.1\r\nHost: x\r\nX-Slow: ",
        true,
    );
    for (what, held) in [("silent", silent), ("trickling", trickling)] {
        assert!(
            (Duration::from_millis(800)..Duration::from_millis(2500)).contains(&held),
            "a {what} anonymous connection was held {held:?} (deadline 1 s)"
        );
    }
    // A request without a token is answered, and the connection closed
    // at the deadline all the same.
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .write_all(b"GET /v1/sprites HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (status, body) = read_response(&mut stream);
    assert_eq!(status, 401, "{body}");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut rest = Vec::new();
    let started = Instant::now();
    let _ = stream.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_millis(2500));

    // With a token: well past the anonymous deadline, the same connection
    // serves the next request.
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    let ask =
        format!("GET /v1/sprites HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\r\n");
    stream.write_all(ask.as_bytes()).unwrap();
    assert_eq!(read_response(&mut stream).0, 200);
    std::thread::sleep(Duration::from_millis(2500));
    stream.write_all(ask.as_bytes()).unwrap();
    assert_eq!(read_response(&mut stream).0, 200);
}
