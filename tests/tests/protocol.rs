//! Bad frames on the control socket cost only their own connection.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use hull_proto::{ClientMsg, DaemonMsg, ErrorKind, Hello};
use hull_tests::{block_on, require_root, TestHull};

fn frame(body: &[u8]) -> Vec<u8> {
    let mut f = u32::try_from(body.len()).unwrap().to_be_bytes().to_vec();
    f.extend_from_slice(body);
    f
}

fn hello_frame() -> Vec<u8> {
    frame(&rmp_serde::to_vec(&ClientMsg::Hello(Hello::new("raw test"))).unwrap())
}

/// Reads frames until EOF; returns the decoded replies.
fn replies(stream: &mut UnixStream) -> Vec<DaemonMsg> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut bytes = Vec::new();
    stream
        .read_to_end(&mut bytes)
        .expect("hulld must close the connection after a bad frame");
    let mut out = Vec::new();
    let mut rest = &bytes[..];
    while rest.len() >= 4 {
        let len = u32::from_be_bytes(rest[..4].try_into().unwrap()) as usize;
        out.push(rmp_serde::from_slice(&rest[4..4 + len]).unwrap());
        rest = &rest[4 + len..];
    }
    out
}

fn assert_bad_frame(replies: &[DaemonMsg]) {
    match replies.last() {
        Some(DaemonMsg::Error(report)) => {
            assert_eq!(report.kind, ErrorKind::BadFrame, "{report:?}")
        }
        other => panic!("expected a BadFrame error last, got {other:?} in {replies:?}"),
    }
}

fn assert_hulld_fine(hull: &TestHull) {
    block_on(async {
        let mut c = hull.client().await;
        c.status().await.unwrap();
        assert_eq!(hull.sh("echo fine").await, "fine\n");
    });
}

#[test]
fn malformed_truncated_and_huge_frames_get_an_error() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();

    // Garbage where a message should be.
    let mut s = UnixStream::connect(&hull.socket).unwrap();
    s.write_all(&hello_frame()).unwrap();
    s.write_all(&frame(b"\xc1\xc1\xc1 not msgpack")).unwrap();
    let r = replies(&mut s);
    assert!(matches!(r.first(), Some(DaemonMsg::Hello(_))), "{r:?}");
    assert_bad_frame(&r);
    assert_hulld_fine(&hull);

    // A frame cut short by the client hanging up.
    let mut s = UnixStream::connect(&hull.socket).unwrap();
    s.write_all(&hello_frame()).unwrap();
    s.write_all(&1000u32.to_be_bytes()).unwrap();
    s.write_all(b"only a few bytes").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert_bad_frame(&replies(&mut s));
    assert_hulld_fine(&hull);

    // A 1 GiB length prefix: refused before any of it is buffered.
    let mut s = UnixStream::connect(&hull.socket).unwrap();
    s.write_all(&hello_frame()).unwrap();
    s.write_all(&(1u32 << 30).to_be_bytes()).unwrap();
    assert_bad_frame(&replies(&mut s));
    assert_hulld_fine(&hull);

    // Garbage instead of the hello.
    let mut s = UnixStream::connect(&hull.socket).unwrap();
    s.write_all(&frame(b"hello?")).unwrap();
    assert_bad_frame(&replies(&mut s));
    assert_hulld_fine(&hull);
}

#[test]
fn another_protocol_version_is_refused_clearly() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let mut s = UnixStream::connect(&hull.socket).unwrap();
    let old = ClientMsg::Hello(Hello {
        version: 999,
        peer: "future hull".into(),
    });
    s.write_all(&frame(&rmp_serde::to_vec(&old).unwrap()))
        .unwrap();
    let r = replies(&mut s);
    match r.last() {
        Some(DaemonMsg::Error(report)) => {
            assert_eq!(report.kind, ErrorKind::Version);
            assert!(report.message.contains("999"), "{}", report.message);
        }
        other => panic!("expected a version error, got {other:?}"),
    }
    assert_hulld_fine(&hull);
}

#[test]
fn the_socket_is_private_to_root() {
    if !require_root() {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let hull = TestHull::start();
    let mode = std::fs::metadata(&hull.socket)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}
