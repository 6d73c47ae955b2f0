//! The service manager: starts the registered services on every new inner
//! in `--after` order, supervises them with their restart policy, and
//! answers `hull services`. One task owns all service state.

use std::collections::{BTreeMap, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hull_proto::{
    ExecSpec, ExitStatus, RestartPolicy, ServiceRequest, ServiceSpec, ServiceStatus, Stream,
};
use hull_services::{Registry, ServiceError};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};

use crate::launch::{InitEvent, Inner, SpawnFailure};
use crate::logs::{LogStore, SourceLog};

/// Lines of output `hull services show` includes.
const LAST_LINES: usize = 20;
const BACKOFF_FIRST: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A service that ran this long before exiting is not crash-looping.
const STABLE_AFTER: Duration = Duration::from_secs(10);
/// This many exits within the window make a crash loop.
const CRASH_LOOP_EXITS: usize = 5;
const CRASH_LOOP_WINDOW: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);
const TICK: Duration = Duration::from_millis(20);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Waiting,
    Starting,
    Running,
    Backoff,
    Stopped,
    Exited,
    Failed,
}

impl State {
    fn name(self) -> &'static str {
        match self {
            State::Waiting => "waiting",
            State::Starting => "starting",
            State::Running => "running",
            State::Backoff => "backoff",
            State::Stopped => "stopped",
            State::Exited => "exited",
            State::Failed => "failed",
        }
    }
}

struct Service {
    spec: ServiceSpec,
    state: State,
    /// Exec id, pid inside the inner, and start time of the live process.
    process: Option<(u64, i32, Instant)>,
    /// Bumped on every spawn; events of older spawns are ignored.
    generation: u64,
    restarts: u32,
    last_exit: Option<ExitStatus>,
    ready: bool,
    reason: Option<String>,
    exits: VecDeque<Instant>,
    backoff: Duration,
    next_start: Option<Instant>,
    stop_requested: bool,
    /// Requests answered once the process has exited.
    pending: Vec<(AfterStop, Reply)>,
}

impl Service {
    fn new(spec: ServiceSpec) -> Self {
        Service {
            spec,
            state: State::Waiting,
            process: None,
            generation: 0,
            restarts: 0,
            last_exit: None,
            ready: false,
            reason: None,
            exits: VecDeque::new(),
            backoff: BACKOFF_FIRST,
            next_start: None,
            stop_requested: false,
            pending: Vec::new(),
        }
    }

    fn status(&self) -> ServiceStatus {
        ServiceStatus {
            spec: self.spec.clone(),
            state: self.state.name().to_string(),
            pid: self.process.map(|(_, pid, _)| pid),
            uptime_ms: self
                .process
                .map(|(_, _, since)| since.elapsed().as_millis() as u64),
            restarts: self.restarts,
            last_exit: self.last_exit,
            ready: self.ready,
            reason: self.reason.clone(),
            last_lines: Vec::new(),
        }
    }
}

enum Event {
    Spawned {
        name: String,
        generation: u64,
        id: u64,
        pid: i32,
    },
    Exited {
        name: String,
        generation: u64,
        status: ExitStatus,
    },
}

type Reply = oneshot::Sender<Result<Vec<ServiceStatus>, ServiceError>>;

/// The handle hulld's connections use.
#[derive(Clone)]
pub struct ServiceManager {
    requests: mpsc::UnboundedSender<(ServiceRequest, Reply)>,
}

impl ServiceManager {
    pub fn start(
        registry: Arc<Mutex<Registry>>,
        logs: Arc<LogStore>,
        current: watch::Receiver<Option<Arc<Inner>>>,
    ) -> Self {
        let (requests, rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let task = Task {
            registry,
            logs,
            services: BTreeMap::new(),
            inner: None,
            events_tx,
        };
        tokio::spawn(task.run(rx, events, current));
        ServiceManager { requests }
    }

    pub async fn request(
        &self,
        request: ServiceRequest,
    ) -> Result<Vec<ServiceStatus>, ServiceError> {
        let (reply, rx) = oneshot::channel();
        let gone = || ServiceError::NotFound("(the service manager stopped)".into());
        self.requests.send((request, reply)).map_err(|_| gone())?;
        rx.await.map_err(|_| gone())?
    }
}

struct Task {
    registry: Arc<Mutex<Registry>>,
    logs: Arc<LogStore>,
    services: BTreeMap<String, Service>,
    inner: Option<Arc<Inner>>,
    events_tx: mpsc::UnboundedSender<Event>,
}

impl Task {
    async fn run(
        mut self,
        mut requests: mpsc::UnboundedReceiver<(ServiceRequest, Reply)>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut current: watch::Receiver<Option<Arc<Inner>>>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        self.on_inner(current.borrow_and_update().clone());
        loop {
            tokio::select! {
                request = requests.recv() => match request {
                    Some((request, reply)) => self.handle(request, reply).await,
                    None => return,
                },
                Some(event) = events.recv() => {
                    // A service that just started may be what others wait for.
                    let started = matches!(event, Event::Spawned { .. });
                    self.on_event(event);
                    if started {
                        self.schedule().await;
                    }
                }
                changed = current.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let inner = current.borrow_and_update().clone();
                    self.on_inner(inner);
                    self.schedule().await;
                }
                _ = tick.tick() => self.schedule().await,
            }
        }
    }

    /// A new inner (start, bounce, restore) or none (stopping): every
    /// service process died with the old one.
    fn on_inner(&mut self, inner: Option<Arc<Inner>>) {
        let same = match (&self.inner, &inner) {
            (Some(a), Some(b)) => a.generation == b.generation,
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.inner = inner;
        let specs = self.registry.lock().unwrap().list().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the service registry");
            Vec::new()
        });
        let mut old = std::mem::take(&mut self.services);
        for (name, svc) in old.iter_mut() {
            // Processes died with the old inner: stops are complete.
            let pending = std::mem::take(&mut svc.pending);
            let mut one = BTreeMap::new();
            let mut stopped = Service::new(svc.spec.clone());
            stopped.state = State::Stopped;
            stopped.stop_requested = true;
            one.insert(name.clone(), stopped);
            finish_stop(&mut one, name, pending);
        }
        for spec in specs {
            let mut svc = Service::new(spec.clone());
            if let Some(prev) = old.remove(&spec.name) {
                svc.restarts = prev.restarts;
                svc.last_exit = prev.last_exit;
                svc.generation = prev.generation;
                // A service the user stopped stays stopped across bounces.
                if prev.state == State::Stopped && prev.stop_requested {
                    svc.state = State::Stopped;
                    svc.stop_requested = true;
                }
            }
            if self.inner.is_none() && svc.state != State::Stopped {
                svc.state = State::Waiting;
            }
            self.services.insert(spec.name.clone(), svc);
        }
    }

    /// Starts what may start now and probes ports of running services.
    async fn schedule(&mut self) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let now = Instant::now();
        // Reading the inner's TCP tables walks the kernel's whole socket
        // hash (milliseconds on a big VM): only when a port is awaited.
        let awaited = self
            .services
            .values()
            .any(|s| s.state == State::Running && !s.ready && s.spec.http_port.is_some());
        let listening = if awaited {
            listening_ports(inner.pid)
        } else {
            Vec::new()
        };
        for svc in self.services.values_mut() {
            if svc.state == State::Running && !svc.ready {
                svc.ready = svc.spec.http_port.is_none_or(|p| listening.contains(&p));
            }
        }
        let satisfied = |services: &BTreeMap<String, Service>, spec: &ServiceSpec| {
            spec.after.iter().all(|dep| {
                services
                    .get(dep)
                    .is_some_and(|d| d.state == State::Running && d.ready)
            })
        };
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let svc = &self.services[&name];
            let due = match svc.state {
                State::Waiting => satisfied(&self.services, &svc.spec),
                State::Backoff => svc.next_start.is_some_and(|t| t <= now),
                _ => false,
            };
            if due {
                self.spawn(&name, &inner);
            }
        }
    }

    fn spawn(&mut self, name: &str, inner: &Arc<Inner>) {
        let svc = self.services.get_mut(name).expect("known service");
        svc.generation += 1;
        svc.state = State::Starting;
        svc.ready = false;
        svc.reason = None;
        svc.next_start = None;
        let spec = ExecSpec {
            argv: vec!["/bin/sh".into(), "-c".into(), svc.spec.cmd.clone()],
            env: svc.spec.env.clone(),
            cwd: svc.spec.cwd.clone(),
            user: svc.spec.user.clone(),
            tty: None,
        };
        let log = match self.logs.source(name) {
            Ok(log) => log,
            Err(e) => {
                tracing::error!(service = name, error = %e, "cannot open the service's log");
                return;
            }
        };
        tokio::spawn(run_process(
            inner.clone(),
            name.to_string(),
            svc.generation,
            spec,
            log,
            self.events_tx.clone(),
        ));
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Spawned {
                name,
                generation,
                id,
                pid,
            } => {
                if let Some(svc) = self.current(&name, generation) {
                    svc.state = State::Running;
                    svc.process = Some((id, pid, Instant::now()));
                    tracing::info!(service = %name, pid, "service started");
                }
            }
            Event::Exited {
                name,
                generation,
                status,
            } => {
                if let Some(svc) = self.current(&name, generation) {
                    on_exit(&name, svc, status);
                    let pending = std::mem::take(&mut svc.pending);
                    finish_stop(&mut self.services, &name, pending);
                }
            }
        }
    }

    fn current(&mut self, name: &str, generation: u64) -> Option<&mut Service> {
        self.services
            .get_mut(name)
            .filter(|s| s.generation == generation)
    }

    async fn handle(&mut self, request: ServiceRequest, reply: Reply) {
        let answer = |reply: Reply, r: Result<Vec<ServiceStatus>, ServiceError>| {
            let _ = reply.send(r);
        };
        match request {
            ServiceRequest::List => answer(
                reply,
                Ok(self.services.values().map(Service::status).collect()),
            ),
            ServiceRequest::Show(name) => {
                let result = self.get(&name).map(|s| {
                    let mut status = s.status();
                    status.last_lines = self.last_lines(&name);
                    vec![status]
                });
                answer(reply, result)
            }
            ServiceRequest::Add(spec) => {
                if let Err(e) = self.registry.lock().unwrap().add(&spec) {
                    return answer(reply, Err(e));
                }
                tracing::info!(service = %spec.name, "service registered");
                let svc = Service::new(spec.clone());
                let status = svc.status();
                self.services.insert(spec.name, svc);
                answer(reply, Ok(vec![status]))
            }
            ServiceRequest::Remove(name) => {
                if let Err(e) = self.registry.lock().unwrap().remove(&name) {
                    return answer(reply, Err(e));
                }
                self.stop(&name, AfterStop::Remove, reply).await;
            }
            ServiceRequest::Stop(name) => self.stop(&name, AfterStop::Stop, reply).await,
            ServiceRequest::Restart(name) => self.stop(&name, AfterStop::Restart, reply).await,
            ServiceRequest::Start(name) => {
                let result = self.get_mut(&name).map(|svc| {
                    svc.stop_requested = false;
                    if !matches!(svc.state, State::Running | State::Starting) {
                        svc.state = State::Waiting;
                        svc.exits.clear();
                        svc.backoff = BACKOFF_FIRST;
                    }
                    vec![svc.status()]
                });
                answer(reply, result)
            }
        }
    }

    /// The service's last lines, from its log.
    fn last_lines(&self, name: &str) -> Vec<String> {
        let mut last = VecDeque::new();
        let mut cursor = self
            .logs
            .tail_cursor(name, LAST_LINES as u64)
            .unwrap_or_else(|_| self.logs.newest_segment(name));
        while let Ok((records, next)) = self.logs.read_from(name, cursor, 1000) {
            cursor = next;
            let done = records.len() < 1000;
            for r in records {
                if last.len() == LAST_LINES {
                    last.pop_front();
                }
                last.push_back(r.line);
            }
            if done {
                break;
            }
        }
        last.into()
    }

    fn get(&self, name: &str) -> Result<&Service, ServiceError> {
        self.services
            .get(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))
    }

    fn get_mut(&mut self, name: &str) -> Result<&mut Service, ServiceError> {
        self.services
            .get_mut(name)
            .ok_or_else(|| ServiceError::NotFound(name.to_string()))
    }

    /// SIGTERM to the process group, and SIGKILL after the timeout. The
    /// reply waits in `pending` until the process has exited.
    async fn stop(&mut self, name: &str, then: AfterStop, reply: Reply) {
        let Some(svc) = self.services.get_mut(name) else {
            let _ = reply.send(Err(ServiceError::NotFound(name.to_string())));
            return;
        };
        svc.stop_requested = true;
        let running = matches!(svc.state, State::Running | State::Starting);
        match (self.inner.clone(), svc.process, running) {
            (Some(inner), Some((id, _, _)), true) => {
                svc.pending.push((then, reply));
                inner.link.kill(id, libc::SIGTERM).await;
                tokio::spawn(async move {
                    tokio::time::sleep(STOP_TIMEOUT).await;
                    // The init ignores ids whose process is gone.
                    inner.link.kill(id, libc::SIGKILL).await;
                });
            }
            _ => {
                svc.state = State::Stopped;
                svc.process = None;
                finish_stop(&mut self.services, name, vec![(then, reply)]);
            }
        }
    }
}

/// What to do once a stopped service's process is gone.
enum AfterStop {
    Stop,
    Restart,
    Remove,
}

fn finish_stop(
    services: &mut BTreeMap<String, Service>,
    name: &str,
    pending: Vec<(AfterStop, Reply)>,
) {
    for (then, reply) in pending {
        let status = match then {
            AfterStop::Stop => services.get(name).map(Service::status),
            AfterStop::Restart => services.get_mut(name).map(|svc| {
                svc.stop_requested = false;
                svc.state = State::Waiting;
                svc.exits.clear();
                svc.backoff = BACKOFF_FIRST;
                svc.status()
            }),
            AfterStop::Remove => services.remove(name).map(|s| s.status()),
        };
        let _ = reply.send(Ok(status.into_iter().collect()));
    }
}

fn on_exit(name: &str, svc: &mut Service, status: ExitStatus) {
    let ran = svc.process.map(|(_, _, since)| since.elapsed());
    svc.process = None;
    svc.last_exit = Some(status);
    svc.ready = false;
    if svc.stop_requested {
        svc.state = State::Stopped;
        return;
    }
    let wants_restart = match svc.spec.restart {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => status != ExitStatus::Code(0),
        RestartPolicy::Never => false,
    };
    if !wants_restart {
        svc.state = if status == ExitStatus::Code(0) {
            State::Exited
        } else {
            State::Failed
        };
        svc.reason = Some(format!(
            "exited ({status}); restart policy {:?}",
            svc.spec.restart
        ));
        tracing::info!(service = name, %status, "service exited");
        return;
    }
    let now = Instant::now();
    if ran.is_some_and(|d| d > STABLE_AFTER) {
        svc.backoff = BACKOFF_FIRST;
        svc.exits.clear();
    }
    svc.exits.push_back(now);
    while svc
        .exits
        .front()
        .is_some_and(|t| now.duration_since(*t) > CRASH_LOOP_WINDOW)
    {
        svc.exits.pop_front();
    }
    if svc.exits.len() >= CRASH_LOOP_EXITS {
        svc.state = State::Failed;
        svc.reason = Some(format!(
            "crash loop: exited {} times within {} s, last {status}; fix it and run `hull services start {name}`",
            svc.exits.len(),
            CRASH_LOOP_WINDOW.as_secs()
        ));
        tracing::warn!(service = name, %status, "service is crash-looping; giving up");
        return;
    }
    svc.state = State::Backoff;
    svc.next_start = Some(now + svc.backoff);
    svc.restarts += 1;
    tracing::info!(service = name, %status, backoff_ms = svc.backoff.as_millis() as u64, "service exited; restarting");
    svc.backoff = (svc.backoff * 2).min(BACKOFF_MAX);
}

/// TCP ports in LISTEN state in the inner's network namespace, read from
/// its init's view of /proc/net (no agent inside the user's code).
fn listening_ports(init_pid: i32) -> Vec<u16> {
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let Ok(text) = std::fs::read_to_string(format!("/proc/{init_pid}/net/{table}")) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // local_address is ADDR:PORT in hex; state 0A is LISTEN.
            if fields.len() > 3 && fields[3] == "0A" {
                if let Some(port) = fields[1]
                    .rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
                {
                    ports.push(port);
                }
            }
        }
    }
    ports
}

/// Runs one service process to its end, reporting to the manager.
async fn run_process(
    inner: Arc<Inner>,
    name: String,
    generation: u64,
    spec: ExecSpec,
    log: Arc<SourceLog>,
    events: mpsc::UnboundedSender<Event>,
) {
    let send = |e: Event| {
        let _ = events.send(e);
    };
    let exited = |status| Event::Exited {
        name: name.clone(),
        generation,
        status,
    };
    let mut process = match inner.link.spawn(spec).await {
        Ok(p) => p,
        Err(SpawnFailure::Refused(kind, message)) => {
            log.append(Stream::Stderr, &format!("hull: {message}"));
            send(exited(ExitStatus::Code(kind.shell_code())));
            return;
        }
        Err(SpawnFailure::InnerGone) => return,
    };
    let (id, pid, exit) = (process.id, process.pid, process.exited);
    let fds = std::mem::take(&mut process.fds);
    send(Event::Spawned {
        name: name.clone(),
        generation,
        id,
        pid,
    });
    let readers = spawn_captures(fds, &log);
    let status = match exit {
        Some(s) => Some(s),
        None => loop {
            match process.events.recv().await {
                Some(InitEvent::Exited(s)) => break Some(s),
                Some(_) => continue,
                None => break None,
            }
        },
    };
    drop(process);
    let Some(status) = status else {
        return; // the inner went away; on_inner resets every service
    };
    // Let the output readers finish (bounded: a background child may hold
    // the pipes open).
    let _ = tokio::time::timeout(
        Duration::from_millis(500),
        futures::future::join_all(readers),
    )
    .await;
    send(exited(status));
}

fn spawn_captures(fds: Vec<OwnedFd>, log: &Arc<SourceLog>) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    // fds: [stdin writer, stdout reader, stderr reader]; stdin closes here.
    for (fd, stream) in fds
        .into_iter()
        .skip(1)
        .zip([Stream::Stdout, Stream::Stderr])
    {
        // A bigger pipe means fewer wake-ups per megabyte on a chatty
        // service (root may go up to fs.pipe-max-size, 1 MiB by default).
        // SAFETY: F_SETPIPE_SZ on a pipe fd we own, with an integer argument.
        unsafe {
            libc::fcntl(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                libc::F_SETPIPE_SZ,
                1 << 20,
            )
        };
        let Ok(pipe) = pipe::Receiver::from_owned_fd(fd) else {
            continue;
        };
        handles.push(tokio::spawn(crate::logs::capture(
            pipe,
            stream,
            log.clone(),
        )));
    }
    handles
}
