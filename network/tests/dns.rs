//! The inner's name server against an upstream the test runs, on
//! loopback only: what the policy denies is REFUSED and never asked
//! upstream, what it allows is answered with its addresses admitted first,
//! over UDP and TCP, and a change of policy counts from the next query.

// Test code: a failed unwrap is the test failing.
#![allow(clippy::unwrap_used)]

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::A;
use hickory_proto::rr::{Name, RData, Record, RecordType};
use hull_network::dns::{Admit, Admitted, DnsConfig, DnsProxy};
use hull_network::EgressPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::watch;

/// An upstream that answers A queries from a table, over UDP and TCP, and
/// counts what it was asked.
struct Upstream {
    addr: SocketAddr,
    asked: Arc<AtomicUsize>,
}

fn answer_for(query: &[u8], table: &HashMap<String, Ipv4Addr>) -> Vec<u8> {
    let request = Message::from_vec(query).unwrap();
    let q = request.queries[0].clone();
    let name = q.name.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    let mut m = Message::response(request.metadata.id, OpCode::Query);
    m.queries.push(q.clone());
    match table.get(&name) {
        Some(ip) => m
            .answers
            .push(Record::from_rdata(q.name.clone(), 300, RData::A(A(*ip)))),
        None => m.metadata.response_code = ResponseCode::NXDomain,
    }
    m.to_vec().unwrap()
}

async fn upstream(table: &[(&str, Ipv4Addr)]) -> Upstream {
    let table: Arc<HashMap<String, Ipv4Addr>> =
        Arc::new(table.iter().map(|(n, ip)| (n.to_string(), *ip)).collect());
    let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let tcp = TcpListener::bind(addr).await.unwrap();
    let asked = Arc::new(AtomicUsize::new(0));
    tokio::spawn({
        let (table, asked) = (table.clone(), asked.clone());
        async move {
            let mut buf = vec![0u8; 65535];
            loop {
                let (len, from) = udp.recv_from(&mut buf).await.unwrap();
                asked.fetch_add(1, Ordering::SeqCst);
                udp.send_to(&answer_for(&buf[..len], &table), from)
                    .await
                    .unwrap();
            }
        }
    });
    tokio::spawn({
        let asked = asked.clone();
        async move {
            loop {
                let (mut s, _) = tcp.accept().await.unwrap();
                asked.fetch_add(1, Ordering::SeqCst);
                let query = read_framed(&mut s).await;
                write_framed(&mut s, &answer_for(&query, &table)).await;
            }
        }
    });
    Upstream { addr, asked }
}

async fn read_framed(s: &mut TcpStream) -> Vec<u8> {
    let mut len = [0u8; 2];
    s.read_exact(&mut len).await.unwrap();
    let mut m = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut m).await.unwrap();
    m
}

async fn write_framed(s: &mut TcpStream, m: &[u8]) {
    let mut framed = u16::try_from(m.len()).unwrap().to_be_bytes().to_vec();
    framed.extend_from_slice(m);
    s.write_all(&framed).await.unwrap();
}

/// Records what it admitted; fails when told to.
#[derive(Default)]
struct Recorder {
    admitted: Mutex<Vec<Admitted>>,
    fail: std::sync::atomic::AtomicBool,
}

impl Admit for Recorder {
    async fn admit(&self, admitted: Admitted) -> io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(io::Error::other("the set is full"));
        }
        self.admitted.lock().unwrap().push(admitted);
        Ok(())
    }
}

fn query(name: &str, id: u16) -> Vec<u8> {
    let mut m = Message::new(id, MessageType::Query, OpCode::Query);
    m.metadata.recursion_desired = true;
    m.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    m.to_vec().unwrap()
}

async fn ask_udp(server: SocketAddr, name: &str) -> Message {
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    s.send_to(&query(name, 4242), server).await.unwrap();
    let mut buf = vec![0u8; 65535];
    let len = tokio::time::timeout(Duration::from_secs(10), s.recv(&mut buf))
        .await
        .expect("no DNS answer within 10 s")
        .unwrap();
    let m = Message::from_vec(&buf[..len]).unwrap();
    assert_eq!(m.metadata.id, 4242, "the answer carries the query's id");
    m
}

fn policy(text: &str) -> Arc<EgressPolicy> {
    Arc::new(EgressPolicy::parse(text).unwrap())
}

fn addresses(m: &Message) -> Vec<Ipv4Addr> {
    m.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0),
            _ => None,
        })
        .collect()
}

const ONE_ALLOWED: &str = r#"{"rules":[{"domain":"allowed.test","action":"allow"}]}"#;

async fn start_proxy(
    upstreams: Vec<SocketAddr>,
    text: &str,
) -> (DnsProxy, watch::Sender<Arc<EgressPolicy>>, Arc<Recorder>) {
    let (tx, rx) = watch::channel(policy(text));
    let recorder = Arc::new(Recorder::default());
    let mut config = DnsConfig::new("127.0.0.1:0".parse().unwrap(), upstreams);
    config.upstream_timeout = Duration::from_millis(300);
    let proxy = DnsProxy::start(config, rx, recorder.clone()).await.unwrap();
    (proxy, tx, recorder)
}

#[tokio::test]
async fn a_denied_name_is_refused_and_never_asked_upstream() {
    let up = upstream(&[
        ("allowed.test", Ipv4Addr::new(203, 0, 113, 5)),
        ("denied.test", Ipv4Addr::new(203, 0, 113, 6)),
    ])
    .await;
    let (proxy, _tx, recorder) = start_proxy(vec![up.addr], ONE_ALLOWED).await;

    let denied = ask_udp(proxy.local_addr(), "denied.test").await;
    assert_eq!(denied.metadata.response_code, ResponseCode::Refused);
    assert!(denied.answers.is_empty());
    assert_eq!(
        up.asked.load(Ordering::SeqCst),
        0,
        "a denied name went upstream"
    );
    assert_eq!(proxy.counts().refused.load(Ordering::SeqCst), 1);

    let allowed = ask_udp(proxy.local_addr(), "Allowed.Test").await;
    assert_eq!(allowed.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&allowed), [Ipv4Addr::new(203, 0, 113, 5)]);
    assert_eq!(
        *recorder.admitted.lock().unwrap(),
        [Admitted {
            name: "allowed.test".into(),
            addrs: vec![("203.0.113.5".parse().unwrap(), Duration::from_secs(300))],
        }],
        "the answer's address was not admitted before the answer came"
    );
    assert_eq!(proxy.counts().answered.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn tcp_queries_are_judged_and_answered_alike() {
    let up = upstream(&[("allowed.test", Ipv4Addr::new(203, 0, 113, 5))]).await;
    let (proxy, _tx, _recorder) = start_proxy(vec![up.addr], ONE_ALLOWED).await;
    let mut s = TcpStream::connect(proxy.local_addr()).await.unwrap();
    for (name, code) in [
        ("allowed.test", ResponseCode::NoError),
        ("other.test", ResponseCode::Refused),
    ] {
        write_framed(&mut s, &query(name, 7)).await;
        let m = Message::from_vec(&read_framed(&mut s).await).unwrap();
        assert_eq!(m.metadata.response_code, code, "{name}");
    }
}

#[tokio::test]
async fn a_policy_change_counts_from_the_next_query() {
    let up = upstream(&[("other.test", Ipv4Addr::new(198, 51, 100, 1))]).await;
    let (proxy, tx, recorder) = start_proxy(vec![up.addr], ONE_ALLOWED).await;
    let before = ask_udp(proxy.local_addr(), "other.test").await;
    assert_eq!(before.metadata.response_code, ResponseCode::Refused);
    tx.send_replace(policy(
        r#"{"rules":[{"domain":"*.test","action":"allow"}]}"#,
    ));
    let after = ask_udp(proxy.local_addr(), "other.test").await;
    assert_eq!(after.metadata.response_code, ResponseCode::NoError);
    assert_eq!(addresses(&after), [Ipv4Addr::new(198, 51, 100, 1)]);
    // Unrestricted: answered, and nothing to admit.
    tx.send_replace(policy(r#"{"rules":[]}"#));
    let open = ask_udp(proxy.local_addr(), "other.test").await;
    assert_eq!(open.metadata.response_code, ResponseCode::NoError);
    assert_eq!(recorder.admitted.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn no_upstream_or_no_admission_is_a_servfail_not_an_address() {
    // A socket that never answers: the upstream times out.
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (proxy, _tx, _) = start_proxy(vec![silent.local_addr().unwrap()], ONE_ALLOWED).await;
    let m = ask_udp(proxy.local_addr(), "allowed.test").await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert_eq!(proxy.counts().failed.load(Ordering::SeqCst), 1);

    // The second upstream answers when the first is silent.
    let up = upstream(&[("allowed.test", Ipv4Addr::new(203, 0, 113, 5))]).await;
    let (proxy, _tx, recorder) =
        start_proxy(vec![silent.local_addr().unwrap(), up.addr], ONE_ALLOWED).await;
    let m = ask_udp(proxy.local_addr(), "allowed.test").await;
    assert_eq!(addresses(&m), [Ipv4Addr::new(203, 0, 113, 5)]);

    // An address the firewall could not take is withheld.
    recorder.fail.store(true, Ordering::SeqCst);
    let m = ask_udp(proxy.local_addr(), "allowed.test").await;
    assert_eq!(m.metadata.response_code, ResponseCode::ServFail);
    assert!(m.answers.is_empty());
}

#[tokio::test]
async fn garbage_gets_no_answer_and_the_server_keeps_serving() {
    let up = upstream(&[("allowed.test", Ipv4Addr::new(203, 0, 113, 5))]).await;
    let (proxy, _tx, _) = start_proxy(vec![up.addr], ONE_ALLOWED).await;
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for junk in [&b""[..], b"\x00", b"not a dns message at all", &[0xff; 512]] {
        s.send_to(junk, proxy.local_addr()).await.unwrap();
    }
    // A response sent as a query is not reflected either.
    let mut response = Message::from_vec(&query("allowed.test", 9)).unwrap();
    response.metadata.message_type = MessageType::Response;
    s.send_to(&response.to_vec().unwrap(), proxy.local_addr())
        .await
        .unwrap();
    let m = ask_udp(proxy.local_addr(), "allowed.test").await;
    assert_eq!(m.metadata.response_code, ResponseCode::NoError);
    let mut buf = [0u8; 512];
    let stray = tokio::time::timeout(Duration::from_millis(200), s.recv(&mut buf)).await;
    assert!(stray.is_err(), "garbage was answered");
}

#[tokio::test]
async fn a_flood_of_slow_queries_is_bounded_and_dropped_past_the_bound() {
    let silent = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let (_tx, rx) = watch::channel(policy(ONE_ALLOWED));
    let mut config = DnsConfig::new(
        "127.0.0.1:0".parse().unwrap(),
        vec![silent.local_addr().unwrap()],
    );
    config.max_in_flight = 8;
    config.upstream_timeout = Duration::from_millis(500);
    let proxy = DnsProxy::start(config, rx, Arc::new(Recorder::default()))
        .await
        .unwrap();
    let s = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    for id in 0..64u16 {
        s.send_to(&query("allowed.test", id), proxy.local_addr())
            .await
            .unwrap();
    }
    // Every query the bound let in fails upstream; the rest are dropped.
    let mut buf = vec![0u8; 512];
    let mut answers = 0;
    while tokio::time::timeout(Duration::from_secs(2), s.recv(&mut buf))
        .await
        .is_ok()
    {
        answers += 1;
    }
    let dropped = proxy.counts().dropped.load(Ordering::SeqCst);
    assert!(
        answers <= 8,
        "{answers} answers: more than 8 queries were in flight"
    );
    assert_eq!(
        answers as u64 + dropped,
        64,
        "{answers} answered, {dropped} dropped"
    );
    // Once the flood is over, queries are answered again.
    let m = ask_udp(proxy.local_addr(), "denied.test").await;
    assert_eq!(m.metadata.response_code, ResponseCode::Refused);
}
