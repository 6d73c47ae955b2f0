//! What a request may cost hulld: every frame is checked for its caller's
//! scope and for the size of its decoded form before it is decoded, on
//! every endpoint (the control socket, vsock, the API's tunnel, the
//! inner's socket); service definitions are bounded in size and counts,
//! and kept once.

use hull_proto::{DaemonMsg, ErrorKind};
use hull_tests::attacks::requests::{
    empty_argv_exec, inner_socket, register_all, service_with_env, tunnel_flood,
};
use hull_tests::siege::Siege;
use hull_tests::{block_on, require_root, TestHull};

fn kinds(answers: &[Option<DaemonMsg>]) -> Vec<Option<(ErrorKind, String)>> {
    answers
        .iter()
        .map(|a| match a {
            Some(DaemonMsg::Error(e)) => Some((e.kind, e.message.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn an_exec_of_millions_of_empty_strings_is_refused_before_it_is_decoded() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let addr = block_on(hull.api_addr());
    let (read, exec) = (hull.api_token("read"), hull.api_token("exec"));
    // About 4 MiB on the wire; over 100 MB as a Vec<String>.
    let payload = empty_argv_exec(4_190_000);
    assert!(payload.len() < 4 * 1024 * 1024, "{}", payload.len());

    let siege = Siege::begin(&hull);
    let refused_by_scope = block_on(tunnel_flood(addr, &read, 32, &payload));
    let refused_by_shape = block_on(tunnel_flood(addr, &exec, 8, &payload));
    siege.assert_held(&hull, "4 MiB execs of empty strings through the tunnel");

    // Each got an answer: refused for its scope (read), for its shape
    // (exec), or told that hulld reads no more large frames just now.
    let by_scope = kinds(&refused_by_scope);
    for answer in &by_scope {
        match answer {
            Some((ErrorKind::NotPermitted, m)) => assert!(m.contains("scope exec"), "{m}"),
            Some((ErrorKind::Busy, _)) => {}
            other => panic!("a read token's exec was answered {other:?}"),
        }
    }
    assert!(
        by_scope
            .iter()
            .any(|a| matches!(a, Some((ErrorKind::NotPermitted, _)))),
        "{by_scope:?}"
    );
    let by_shape = kinds(&refused_by_shape);
    for answer in &by_shape {
        match answer {
            Some((ErrorKind::BadFrame, m)) => {
                assert!(m.contains("a request may hold at most 65536"), "{m}")
            }
            Some((ErrorKind::Busy, _)) => {}
            other => panic!("an exec token's huge exec was answered {other:?}"),
        }
    }
    // The API still runs commands.
    let out = block_on(hull.exec(&["echo", "still here"]));
    assert_eq!(out.stdout, b"still here\n");
}

#[test]
fn definitions_of_empty_variables_from_the_inner_are_refused_and_cost_nothing() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let socket = inner_socket(&hull);
    // 21,500 empty pairs fit in one 64 KiB frame of the inner's socket.
    let specs: Vec<_> = (0..40)
        .map(|i| {
            let mut spec = service_with_env(&format!("s{i}"), 0, 0);
            spec.env = vec![(String::new(), String::new()); 21_500];
            spec
        })
        .collect();
    let siege = Siege::begin(&hull);
    let answers = block_on(register_all(&socket, specs));
    siege.assert_held(&hull, "definitions of 21,500 empty variables");
    for answer in &answers {
        match answer {
            Err((ErrorKind::BadFrame, m)) => assert!(m.contains("the most hulld takes"), "{m}"),
            other => {
                panic!("a definition of 21,500 variables was answered {other:?}; all: {answers:?}")
            }
        }
    }
    let listed = block_on(async {
        hull.client()
            .await
            .services(hull_proto::ServiceRequest::List)
            .await
    })
    .unwrap();
    assert!(listed.is_empty(), "{listed:?}");
}

#[test]
fn many_legitimate_definitions_are_kept_once() {
    if !require_root() {
        return;
    }
    let hull = TestHull::start();
    let socket = inner_socket(&hull);
    // 256 services of 200 variables of 48 bytes: about 3 MB of definitions.
    let specs: Vec<_> = (0..256)
        .map(|i| {
            let mut spec = service_with_env(&format!("svc{i}"), 200, 48);
            spec.cmd = "exit 0".into();
            spec.restart = hull_proto::RestartPolicy::Never;
            spec
        })
        .collect();
    let siege = Siege::begin(&hull);
    let answers = block_on(register_all(&socket, specs));
    let report = siege.assert_held(&hull, "256 definitions of 200 variables");
    assert!(
        answers.iter().all(Result::is_ok),
        "{:?}",
        answers.iter().find(|a| a.is_err())
    );
    // Listing them all is one answer of about 5 MB, past the 4 MiB a
    // frame of requests may hold.
    let listed = block_on(async {
        let mut c = hull.client().await;
        c.services(hull_proto::ServiceRequest::List).await
    })
    .unwrap();
    assert_eq!(listed.len(), 256);
    assert_eq!(listed[0].spec.env.len(), 200);
    eprintln!(
        "peak RSS with 3 MB of definitions: {} KiB",
        report.peak_rss_kib
    );
}
