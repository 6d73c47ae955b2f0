//! The service manager's state machine against a fake inner, on tokio's
//! paused clock: backoff, crash loops, readiness, stops across bounces and
//! restores, with no real time spent and no timing noise.

// Test code: a failed unwrap is the test failing.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hull_logs::{LogLimits, LogStore};
use hull_proto::{ExecSpec, ExitStatus, RestartPolicy, ServiceRequest, ServiceSpec, ServiceStatus};
use hull_services::{
    HostProcess, InnerCause, InnerHost, PortProbe, Registry, ServiceManager, SpawnFailure,
};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;

/// How a fake process ends.
#[derive(Clone, Copy)]
enum Behaviour {
    /// Exits at once with this code.
    ExitAt0(i32),
    /// Runs until killed.
    Runs,
}

#[derive(Default)]
struct Record {
    /// (service command, when) of every spawn.
    spawns: Vec<(String, Instant)>,
    /// Exit senders of running processes, by exec id.
    running: BTreeMap<u64, oneshot::Sender<ExitStatus>>,
    next_id: u64,
}

struct FakeInner {
    generation: u64,
    cause: InnerCause,
    behaviour: BTreeMap<String, Behaviour>,
    record: Arc<Mutex<Record>>,
}

impl InnerHost for FakeInner {
    fn generation(&self) -> u64 {
        self.generation
    }

    fn cause(&self) -> InnerCause {
        self.cause.clone()
    }

    async fn spawn(&self, spec: ExecSpec) -> Result<HostProcess, SpawnFailure> {
        let cmd = spec.argv[2].clone();
        let mut record = self.record.lock().unwrap();
        record.spawns.push((cmd.clone(), Instant::now()));
        record.next_id += 1;
        let id = record.next_id;
        let exit: HostProcess = match self.behaviour.get(&cmd).copied().unwrap_or(Behaviour::Runs) {
            Behaviour::ExitAt0(code) => HostProcess {
                id,
                pid: 100,
                fds: Vec::new(),
                exit: Box::pin(async move { Some(ExitStatus::Code(code)) }),
            },
            Behaviour::Runs => {
                let (tx, rx) = oneshot::channel();
                record.running.insert(id, tx);
                HostProcess {
                    id,
                    pid: 100,
                    fds: Vec::new(),
                    exit: Box::pin(async move { rx.await.ok() }),
                }
            }
        };
        Ok(exit)
    }

    async fn kill(&self, id: u64, signal: i32) {
        if let Some(tx) = self.record.lock().unwrap().running.remove(&id) {
            let _ = tx.send(ExitStatus::Signal(signal));
        }
    }
}

/// Ports the test says are listening; every scan is "fresh".
#[derive(Default)]
struct FakePorts(Mutex<Option<Vec<u16>>>);

impl PortProbe for FakePorts {
    fn listening_since(&self, _since: std::time::Instant) -> Option<Vec<u16>> {
        self.0.lock().unwrap().clone()
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    manager: ServiceManager,
    logs: Arc<LogStore>,
    current: watch::Sender<Option<Arc<FakeInner>>>,
    record: Arc<Mutex<Record>>,
    ports: Arc<FakePorts>,
    behaviour: BTreeMap<String, Behaviour>,
}

fn spec(name: &str, cmd: &str) -> ServiceSpec {
    ServiceSpec {
        name: name.into(),
        cmd: cmd.into(),
        env: Vec::new(),
        cwd: None,
        user: None,
        after: Vec::new(),
        http_port: None,
        restart: RestartPolicy::Always,
    }
}

impl Fixture {
    fn new(specs: &[ServiceSpec], behaviour: &[(&str, Behaviour)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut registry = Registry::open(&dir.path().join("services.db")).unwrap();
        for s in specs {
            registry.add(s).unwrap();
        }
        let logs = LogStore::open(dir.path().join("logs"), LogLimits::default()).unwrap();
        let (current, rx) = watch::channel(None);
        let ports = Arc::new(FakePorts::default());
        let (manager, _task) = ServiceManager::start(
            registry,
            logs.clone(),
            rx,
            ports.clone() as Arc<dyn PortProbe>,
        )
        .unwrap();
        Fixture {
            _dir: dir,
            manager,
            logs,
            current,
            record: Arc::new(Mutex::new(Record::default())),
            ports,
            behaviour: behaviour
                .iter()
                .map(|(cmd, b)| (cmd.to_string(), *b))
                .collect(),
        }
    }

    /// A new inner, as a start, bounce or restore brings.
    fn new_inner(&self, generation: u64) {
        self.new_inner_for(generation, InnerCause::Boot);
    }

    fn new_inner_for(&self, generation: u64, cause: InnerCause) {
        self.current.send_replace(Some(Arc::new(FakeInner {
            generation,
            cause,
            behaviour: self.behaviour.clone(),
            record: self.record.clone(),
        })));
    }

    fn spawn_times(&self, cmd: &str) -> Vec<Instant> {
        self.record
            .lock()
            .unwrap()
            .spawns
            .iter()
            .filter(|(c, _)| c == cmd)
            .map(|(_, t)| *t)
            .collect()
    }

    async fn state(&self, name: &str) -> String {
        self.status(name)
            .await
            .map(|s| s.state)
            .unwrap_or_else(|| "absent".into())
    }

    async fn status(&self, name: &str) -> Option<ServiceStatus> {
        let list = self.manager.request(ServiceRequest::List).await.unwrap();
        list.into_iter().find(|s| s.spec.name == name)
    }

    /// A bounce as the supervisor does it: the old inner is withdrawn
    /// first, then its processes die of the SIGTERM the init forwards, and
    /// a new inner comes.
    async fn bounce(&self, generation: u64) {
        self.current.send_replace(None);
        let running = std::mem::take(&mut self.record.lock().unwrap().running);
        for (_, exit) in running {
            let _ = exit.send(ExitStatus::Signal(libc::SIGTERM));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.new_inner_for(generation, InnerCause::Bounce);
    }

    /// The marker records in `name`'s log: (event, text).
    fn markers(&self, name: &str) -> Vec<(&'static str, String)> {
        let (records, _) = self
            .logs
            .read_from(name, hull_logs::Cursor::default(), 1000)
            .unwrap();
        records
            .into_iter()
            .filter_map(|r| Some((r.marker?.name(), r.line)))
            .collect()
    }
}

#[tokio::test(start_paused = true)]
async fn a_crash_loop_backs_off_doubling_then_fails() {
    let f = Fixture::new(
        &[spec("crash", "false")],
        &[("false", Behaviour::ExitAt0(1))],
    );
    f.new_inner(1);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let times = f.spawn_times("false");
    assert_eq!(times.len(), 5, "five starts, then the crash loop gives up");
    assert_eq!(f.state("crash").await, "failed");
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // Backoff 100 ms doubling, checked on a 20 ms scheduling tick.
    for (gap, want_ms) in gaps.iter().zip([100u64, 200, 400, 800]) {
        let want = Duration::from_millis(want_ms);
        assert!(
            *gap >= want && *gap <= want + Duration::from_millis(40),
            "gaps {gaps:?}: expected about {want_ms} ms"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn a_service_waits_for_the_port_of_what_it_comes_after() {
    let mut web = spec("web", "web");
    web.http_port = Some(8000);
    let mut worker = spec("worker", "worker");
    worker.after = vec!["web".into()];
    let f = Fixture::new(&[web, worker], &[]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(f.spawn_times("web").len(), 1);
    assert!(
        f.spawn_times("worker").is_empty(),
        "worker started before web's port listened"
    );
    assert_eq!(f.state("worker").await, "waiting");
    *f.ports.0.lock().unwrap() = Some(vec![8000]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        f.spawn_times("worker").len(),
        1,
        "worker did not start once web listened"
    );
}

#[tokio::test(start_paused = true)]
async fn a_stopped_service_stays_stopped_past_backoff_and_bounces() {
    let f = Fixture::new(&[spec("svc", "svc")], &[]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.state("svc").await, "running");
    f.manager
        .request(ServiceRequest::Stop("svc".into()))
        .await
        .unwrap();
    assert_eq!(f.state("svc").await, "stopped");
    // Well past the longest backoff, and through a bounce.
    tokio::time::sleep(Duration::from_secs(60)).await;
    f.new_inner(2);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        f.spawn_times("svc").len(),
        1,
        "a stopped service was started again"
    );
    assert_eq!(f.state("svc").await, "stopped");
    f.manager
        .request(ServiceRequest::Start("svc".into()))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.spawn_times("svc").len(), 2);
}

#[tokio::test(start_paused = true)]
async fn a_restore_replaces_the_definitions_and_says_what_changed() {
    let f = Fixture::new(&[spec("a", "a"), spec("b", "b")], &[]);
    let recorded = f.manager.snapshot().await.unwrap();
    f.manager
        .request(ServiceRequest::Add(spec("c", "c")))
        .await
        .unwrap();
    f.manager
        .request(ServiceRequest::Remove("a".into()))
        .await
        .unwrap();
    let mut definitions = f.manager.definitions();
    let names = |d: &watch::Receiver<hull_services::Definitions>| -> Vec<String> {
        d.borrow().iter().map(|s| s.name.clone()).collect()
    };
    assert_eq!(names(&definitions), ["b", "c"]);
    let replaced = f.manager.replace(recorded).await.unwrap();
    assert_eq!(replaced.removed, ["c"]);
    assert_eq!(replaced.added, ["a"]);
    definitions.changed().await.unwrap();
    assert_eq!(names(&definitions), ["a", "b"]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(f.spawn_times("a").len(), 1);
    assert!(f.spawn_times("c").is_empty());
}

#[tokio::test(start_paused = true)]
async fn bounces_count_as_inner_starts_not_restarts() {
    let f = Fixture::new(&[spec("svc", "svc")], &[]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_millis(100)).await;
    for generation in 2..=4 {
        f.bounce(generation).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(f.state("svc").await, "running");
    }
    let s = f.status("svc").await.unwrap();
    assert_eq!(f.spawn_times("svc").len(), 4, "one start per inner");
    assert_eq!(s.restarts, 0, "a bounce counted as a restart");
    assert_eq!(s.inner_starts, 4);
}

#[tokio::test(start_paused = true)]
async fn restarts_count_exits_restarted_by_the_policy() {
    let f = Fixture::new(
        &[spec("flaky", "flaky")],
        &[("flaky", Behaviour::ExitAt0(1))],
    );
    f.new_inner(1);
    // 100 + 200 ms of backoff: three starts on this inner.
    tokio::time::sleep(Duration::from_millis(350)).await;
    let s = f.status("flaky").await.unwrap();
    assert_eq!(f.spawn_times("flaky").len(), 3);
    // Each exit counts as it schedules its restart: the third is due at 700 ms.
    assert_eq!(s.state, "backoff");
    assert_eq!(s.restarts, 3);
    assert_eq!(s.inner_starts, 1);
}

#[tokio::test(start_paused = true)]
async fn a_service_behind_a_failed_after_says_what_it_waits_for() {
    let mut web = spec("web", "false");
    web.restart = RestartPolicy::Never;
    let mut db = spec("db", "db");
    db.http_port = Some(5432);
    let mut worker = spec("worker", "worker");
    worker.after = vec!["web".into(), "db".into()];
    let f = Fixture::new(&[web, db, worker], &[("false", Behaviour::ExitAt0(1))]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let web = f.status("web").await.unwrap();
    assert_eq!(web.state, "failed");
    assert_eq!(
        web.reason.as_deref(),
        Some("exited (exit code 1); restart policy never")
    );
    let worker = f.status("worker").await.unwrap();
    assert_eq!(worker.state, "waiting");
    assert_eq!(
        worker.reason.as_deref(),
        Some("waiting for web (failed), db (port 5432 not listening yet)")
    );
    // The note follows what changes: db's port listens, web is still down.
    *f.ports.0.lock().unwrap() = Some(vec![5432]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let worker = f.status("worker").await.unwrap();
    assert_eq!(worker.reason.as_deref(), Some("waiting for web (failed)"));
    assert!(f.spawn_times("worker").is_empty());
}

#[tokio::test(start_paused = true)]
async fn restart_never_is_not_restarted_after_exit_but_starts_on_every_inner() {
    let mut once = spec("once", "once");
    once.restart = RestartPolicy::Never;
    let f = Fixture::new(&[once], &[("once", Behaviour::ExitAt0(0))]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        f.spawn_times("once").len(),
        1,
        "never: run again after it exited"
    );
    assert_eq!(f.state("once").await, "exited");
    f.bounce(2).await;
    tokio::time::sleep(Duration::from_secs(60)).await;
    assert_eq!(
        f.spawn_times("once").len(),
        2,
        "never: not started on the new inner"
    );
    let s = f.status("once").await.unwrap();
    assert_eq!((s.restarts, s.inner_starts), (0, 2));
}

#[tokio::test(start_paused = true)]
async fn the_log_marks_each_start_and_what_brought_a_new_inner() {
    let f = Fixture::new(
        &[spec("svc", "svc"), spec("flaky", "flaky")],
        &[("flaky", Behaviour::ExitAt0(1))],
    );
    f.new_inner(1);
    tokio::time::sleep(Duration::from_millis(150)).await;
    f.bounce(2).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    f.current.send_replace(None);
    f.new_inner_for(3, InnerCause::Restore("v3".into()));
    tokio::time::sleep(Duration::from_millis(100)).await;
    // The fake's every process is pid 100.
    assert_eq!(
        f.markers("svc"),
        [
            ("start", "svc started (pid 100)".to_string()),
            ("bounce", "inner bounced".to_string()),
            ("start", "svc started (pid 100)".to_string()),
            ("restore", "inner restored to checkpoint v3".to_string()),
            ("start", "svc started (pid 100)".to_string()),
        ]
    );
    let flaky = f.markers("flaky");
    assert_eq!(flaky[0], ("start", "flaky started (pid 100)".to_string()));
    assert_eq!(
        flaky[1],
        ("restart", "flaky restarted (pid 100)".to_string())
    );
}

/// Once every service runs and is ready, the manager sleeps until
/// something happens: no scheduling tick wakes hulld (or a sleeping VM)
/// fifty times a second for nothing. Each wake of the runtime is a park
/// and an unpark of its one worker.
#[tokio::test(start_paused = true)]
async fn an_idle_manager_does_not_wake() {
    let mut web = spec("web", "web");
    web.http_port = Some(8000);
    let mut worker = spec("worker", "worker");
    worker.after = vec!["web".into()];
    let f = Fixture::new(
        &[web, worker, spec("once", "true")],
        &[("true", Behaviour::ExitAt0(0))],
    );
    *f.ports.0.lock().unwrap() = Some(vec![8000]);
    f.new_inner(1);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(f.state("web").await, "running");
    assert_eq!(f.state("worker").await, "running");
    // `true` exited 0 under restart=always: it backs off and restarts, so
    // the manager must still wake for that deadline.
    let restarts_before = f.spawn_times("true").len();

    let metrics = tokio::runtime::Handle::current().metrics();
    let parks = || metrics.worker_park_count(0);
    let before = parks();
    tokio::time::sleep(Duration::from_secs(60)).await;
    let woke = parks() - before;
    assert!(
        f.spawn_times("true").len() > restarts_before,
        "the backoff deadline of `true` passed without a restart"
    );
    // `true` restarts at most a few times before its crash loop fails
    // it; each costs a few wakes. A 20 ms tick would cost 3,000.
    assert!(woke < 100, "the runtime woke {woke} times in 60 s of idle");
}
