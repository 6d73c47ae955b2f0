//! The service manager: starts the registered services on every new inner
//! in `--after` order, supervises them with their restart policy, and
//! answers `hull services`. One task owns all service state, the registry
//! included; everyone else sends it messages.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use hull_logs::{LogStore, SourceLog};
use hull_proto::{
    ExecSpec, ExitStatus, LogMarker, RestartPolicy, ServiceRequest, ServiceSpec, ServiceStatus,
    Stream,
};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
// The manager's clock is tokio's, so its state machine can be tested on a
// paused clock.
use tokio::time::Instant;

use crate::host::{HostProcess, InnerCause, InnerHost, PortProbe, SpawnFailure};
use crate::registry::{Registry, ServiceError};

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
    spec: Arc<ServiceSpec>,
    state: State,
    /// Exec id, pid inside the inner, and start time of the live process.
    process: Option<(u64, i32, Instant)>,
    /// Bumped on every spawn; events of older spawns are ignored.
    generation: u64,
    /// Starts by the restart policy after an exit.
    restarts: u32,
    /// Inners (boot, bounce, restore, a restart of a dead inner) it was
    /// started on.
    inner_starts: u32,
    /// It has been spawned on the current inner.
    spawned_here: bool,
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
    fn new(spec: Arc<ServiceSpec>) -> Self {
        Service {
            spec,
            state: State::Waiting,
            process: None,
            generation: 0,
            restarts: 0,
            inner_starts: 0,
            spawned_here: false,
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
            spec: ServiceSpec::clone(&self.spec),
            state: self.state.name().to_string(),
            pid: self.process.map(|(_, pid, _)| pid),
            uptime_ms: self.process.map(|(_, _, since)| {
                u64::try_from(since.elapsed().as_millis()).unwrap_or(u64::MAX)
            }),
            restarts: self.restarts,
            inner_starts: self.inner_starts,
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

/// What a restore changed in the definitions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Replaced {
    /// Registered before, not recorded in the checkpoint.
    pub removed: Vec<String>,
    /// Recorded in the checkpoint, not registered before.
    pub added: Vec<String>,
}

enum Command {
    Request(ServiceRequest, Reply),
    /// The definitions as JSON, for a checkpoint.
    Snapshot(oneshot::Sender<Result<String, ServiceError>>),
    /// Replace every definition (a restore), before the next inner starts.
    Replace(String, oneshot::Sender<Result<Replaced, ServiceError>>),
}

/// The handle hulld holds; cheap to clone.
#[derive(Clone)]
pub struct ServiceManager {
    commands: mpsc::UnboundedSender<Command>,
    definitions: watch::Receiver<Definitions>,
    failed: watch::Receiver<Failed>,
}

/// The registered definitions, each kept once: the manager's table, the
/// routing that follows it and every answer share these.
pub type Definitions = Vec<Arc<ServiceSpec>>;

/// The services in state `failed` on the current inner, with why.
pub type Failed = BTreeMap<String, String>;

impl ServiceManager {
    /// Starts the manager task, the only owner of `registry` from now on.
    /// It follows `current` (the running inner, `None` while there is
    /// none). The task ends when every handle is dropped; its join handle
    /// tells the caller if it panicked.
    pub fn start<H: InnerHost>(
        registry: Registry,
        logs: Arc<LogStore>,
        current: watch::Receiver<Option<Arc<H>>>,
        ports: Arc<dyn PortProbe>,
    ) -> Result<(Self, JoinHandle<()>), ServiceError> {
        for one in registry.set_aside() {
            tracing::warn!(service = %one.name, why = %one.why, "a stored service definition was set aside: it stays in services.db's set_aside table and is not started");
        }
        let specs: Definitions = registry.list()?.into_iter().map(Arc::new).collect();
        let (commands, rx) = mpsc::unbounded_channel();
        let (events_tx, events) = mpsc::unbounded_channel();
        let services = specs
            .iter()
            .map(|spec| (spec.name.clone(), Service::new(spec.clone())))
            .collect();
        let (definitions_tx, definitions) = watch::channel(specs);
        let (failed_tx, failed) = watch::channel(Failed::new());
        let task = Task {
            failed: failed_tx,
            registry: Some(registry),
            logs,
            ports,
            services,
            inner: None,
            events_tx,
            definitions: definitions_tx,
        };
        let join = tokio::spawn(task.run(rx, events, current));
        Ok((
            ServiceManager {
                commands,
                definitions,
                failed,
            },
            join,
        ))
    }

    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T, ServiceError>>) -> Command,
    ) -> Result<T, ServiceError> {
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(command(reply))
            .map_err(|_| ServiceError::ManagerGone)?;
        rx.await.map_err(|_| ServiceError::ManagerGone)?
    }

    /// Answers one `hull services` request.
    pub async fn request(
        &self,
        request: ServiceRequest,
    ) -> Result<Vec<ServiceStatus>, ServiceError> {
        self.ask(|reply| Command::Request(request, reply)).await
    }

    /// The definitions as JSON, to record with a checkpoint.
    pub async fn snapshot(&self) -> Result<String, ServiceError> {
        self.ask(Command::Snapshot).await
    }

    /// Replaces every definition with those in `json` (a restore); the
    /// next inner starts exactly these.
    pub async fn replace(&self, json: String) -> Result<Replaced, ServiceError> {
        self.ask(|reply| Command::Replace(json, reply)).await
    }

    /// Follows the registered definitions (for HTTP routing).
    pub fn definitions(&self) -> watch::Receiver<Definitions> {
        self.definitions.clone()
    }

    /// Follows which services have failed (for HTTP ingress, which answers
    /// at once instead of waiting for a port that will not come).
    pub fn failed(&self) -> watch::Receiver<Failed> {
        self.failed.clone()
    }
}

struct Task<H> {
    /// `None` only while a blocking call has it.
    registry: Option<Registry>,
    logs: Arc<LogStore>,
    ports: Arc<dyn PortProbe>,
    services: BTreeMap<String, Service>,
    inner: Option<Arc<H>>,
    events_tx: mpsc::UnboundedSender<Event>,
    definitions: watch::Sender<Definitions>,
    failed: watch::Sender<Failed>,
}

impl<H: InnerHost> Task<H> {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut current: watch::Receiver<Option<Arc<H>>>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let first = current.borrow_and_update().clone();
        self.on_inner(first);
        loop {
            // Before each wait: the first inner may have come before this
            // task ran, and anything since may have made a service due
            // (a start command, a service that started and is what others
            // wait for, an exit that began a backoff, a tick).
            self.schedule();
            self.publish_failed();
            tokio::select! {
                // A new inner first: the supervisor publishes it before it
                // signals the old one, so an exit queued meanwhile belongs
                // to the old inner and must not count as a restart.
                biased;
                changed = current.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    let inner = current.borrow_and_update().clone();
                    self.on_inner(inner);
                }
                command = commands.recv() => match command {
                    Some(Command::Request(request, reply)) => self.handle(request, reply).await,
                    Some(Command::Snapshot(reply)) => {
                        let _ = reply.send(self.registry(|r| r.to_json()).await);
                    }
                    Some(Command::Replace(json, reply)) => {
                        let _ = reply.send(self.replace(json).await);
                    }
                    None => return,
                },
                Some(event) = events.recv() => self.on_event(event),
                _ = tick.tick(), if self.polling() => {}
            }
        }
    }

    fn publish_failed(&self) {
        let failed: Failed = self
            .services
            .iter()
            .filter(|(_, s)| s.state == State::Failed)
            .map(|(name, s)| (name.clone(), s.reason.clone().unwrap_or_default()))
            .collect();
        self.failed.send_if_modified(|now| {
            let changed = *now != failed;
            *now = failed;
            changed
        });
    }

    /// Runs `f` on the registry on a blocking thread: SQLite fsyncs.
    async fn registry<T: Send + 'static>(
        &mut self,
        f: impl FnOnce(&mut Registry) -> Result<T, ServiceError> + Send + 'static,
    ) -> Result<T, ServiceError> {
        let Some(mut registry) = self.registry.take() else {
            return Err(ServiceError::ManagerGone);
        };
        let (registry, result) = tokio::task::spawn_blocking(move || {
            let result = f(&mut registry);
            (registry, result)
        })
        .await
        // The closure panicked: the registry is lost with it, and so is
        // this task (hulld exits and the next one starts clean).
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()));
        self.registry = Some(registry);
        result
    }

    /// The registered definitions: the table less services being removed
    /// (they stay in it until their process has exited).
    fn defined(&self) -> Definitions {
        self.services
            .values()
            .filter(|s| {
                !s.pending
                    .iter()
                    .any(|(then, _)| matches!(then, AfterStop::Remove))
            })
            .map(|s| s.spec.clone())
            .collect()
    }

    /// Publishes the definitions after a change of the registry.
    fn publish(&self) {
        let specs = self.defined();
        self.definitions.send_if_modified(|now| {
            let changed = *now != specs;
            *now = specs;
            changed
        });
    }

    async fn replace(&mut self, json: String) -> Result<Replaced, ServiceError> {
        let (before, after) = self
            .registry(move |r| {
                let before = r.list()?;
                r.replace_all(&json)?;
                Ok((before, r.list()?))
            })
            .await?;
        let names = |specs: &[ServiceSpec]| -> BTreeSet<String> {
            specs.iter().map(|s| s.name.clone()).collect()
        };
        let (old, new) = (names(&before), names(&after));
        let replaced = Replaced {
            removed: old.difference(&new).cloned().collect(),
            added: new.difference(&old).cloned().collect(),
        };
        self.reload(after.into_iter().map(Arc::new).collect());
        Ok(replaced)
    }

    /// A new inner (start, bounce, restore) or none (stopping): every
    /// service process died with the old one.
    fn on_inner(&mut self, inner: Option<Arc<H>>) {
        let same = match (&self.inner, &inner) {
            (Some(a), Some(b)) => a.generation() == b.generation(),
            (None, None) => true,
            _ => false,
        };
        if same {
            return;
        }
        self.inner = inner;
        let specs = self.defined();
        self.reload(specs);
    }

    /// Rebuilds the service table from `specs` with every process gone,
    /// keeping counters and stops the user asked for.
    fn reload(&mut self, specs: Definitions) {
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
                svc.inner_starts = prev.inner_starts;
                svc.last_exit = prev.last_exit;
                // Events of the old inner's process are stale from now on.
                svc.generation = prev.generation + 1;
                // A service the user stopped stays stopped across bounces.
                if prev.state == State::Stopped && prev.stop_requested {
                    svc.state = State::Stopped;
                    svc.stop_requested = true;
                }
            }
            self.services.insert(spec.name.clone(), svc);
        }
        self.publish();
    }

    /// Whether a service's next step waits on time rather than on an
    /// event: a backoff's deadline, or a port that is listened on only
    /// once a scan sees it. Otherwise the manager sleeps until a message.
    fn polling(&self) -> bool {
        self.services
            .values()
            .any(|s| s.state == State::Backoff || (s.state == State::Running && !s.ready))
    }

    /// Starts what may start now and checks ports of running services.
    fn schedule(&mut self) {
        let Some(inner) = self.inner.clone() else {
            return;
        };
        let now = Instant::now();
        // The oldest start still waiting for its port: a scan from before
        // it could list a port of the previous inner.
        let awaited = self
            .services
            .values()
            .filter(|s| s.state == State::Running && !s.ready && s.spec.http_port.is_some())
            .filter_map(|s| s.process.map(|(_, _, since)| since))
            .max();
        let listening = awaited.and_then(|since| self.ports.listening_since(since.into_std()));
        if let Some(listening) = listening {
            for svc in self.services.values_mut() {
                if svc.state == State::Running && !svc.ready {
                    svc.ready = svc.spec.http_port.is_none_or(|p| listening.contains(&p));
                }
            }
        }
        for svc in self.services.values_mut() {
            if svc.state == State::Running && svc.spec.http_port.is_none() {
                svc.ready = true;
            }
        }
        let names: Vec<String> = self.services.keys().cloned().collect();
        for name in names {
            let Some(svc) = self.services.get(&name) else {
                continue;
            };
            let due = match svc.state {
                State::Waiting => blocked_on(&self.services, &svc.spec).is_empty(),
                State::Backoff => svc.next_start.is_some_and(|t| t <= now),
                _ => false,
            };
            if due {
                self.spawn(&name, &inner);
            }
        }
    }

    fn spawn(&mut self, name: &str, inner: &Arc<H>) {
        let Some(svc) = self.services.get_mut(name) else {
            return;
        };
        svc.generation += 1;
        // What the log marks before this process's output.
        let mut markers = Vec::new();
        if !svc.spawned_here {
            svc.spawned_here = true;
            svc.inner_starts += 1;
            markers.extend(inner_marker(&inner.cause()));
        }
        let kind = if svc.state == State::Backoff {
            LogMarker::Restart
        } else {
            LogMarker::Start
        };
        markers.push((kind, format!("{name} {}", kind_text(kind))));
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
        tokio::spawn(run_process(
            inner.clone(),
            self.logs.clone(),
            name.to_string(),
            svc.generation,
            spec,
            markers,
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
                    on_exit(&name, svc, status, Instant::now());
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
            ServiceRequest::List => {
                hull_proto::panic_point("services:list-panics");
                answer(
                    reply,
                    Ok(self.services.values().map(|s| self.status(s)).collect()),
                )
            }
            ServiceRequest::Show(name) => match self.get(&name) {
                Ok(svc) => {
                    // Reading the log walks files: off the task, and the
                    // reply goes when the lines are in.
                    let mut status = self.status(svc);
                    let logs = self.logs.clone();
                    tokio::spawn(async move {
                        let lines =
                            tokio::task::spawn_blocking(move || last_lines(&logs, &name)).await;
                        status.last_lines = lines.unwrap_or_default();
                        let _ = reply.send(Ok(vec![status]));
                    });
                }
                Err(e) => answer(reply, Err(e)),
            },
            ServiceRequest::Add(spec) => {
                let spec = Arc::new(spec);
                let stored = spec.clone();
                if let Err(e) = self.registry(move |r| r.add(&stored)).await {
                    return answer(reply, Err(e));
                }
                tracing::info!(service = %spec.name, "service registered");
                let svc = Service::new(spec.clone());
                let status = svc.status();
                self.services.insert(spec.name.clone(), svc);
                self.publish();
                answer(reply, Ok(vec![status]))
            }
            ServiceRequest::Remove(name) => {
                let removed = name.clone();
                if let Err(e) = self.registry(move |r| r.remove(&removed)).await {
                    return answer(reply, Err(e));
                }
                self.stop(&name, AfterStop::Remove, STOP_TIMEOUT, reply)
                    .await;
                self.publish();
                // Its logs go with it, so names ever used do not pile up;
                // awaited, so a new service of the name starts a new log.
                let logs = self.logs.clone();
                let source = name.clone();
                match tokio::task::spawn_blocking(move || logs.remove(&source)).await {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(service = %name, error = %e, "cannot delete a removed service's logs")
                    }
                    Err(e) => {
                        tracing::warn!(service = %name, error = %e, "deleting a removed service's logs failed")
                    }
                }
            }
            ServiceRequest::Signal { name, signal } => {
                let result = self.signal(&name, signal).await;
                answer(reply, result)
            }
            ServiceRequest::Stop(name) => {
                self.stop(&name, AfterStop::Stop, STOP_TIMEOUT, reply).await
            }
            ServiceRequest::StopWithin { name, timeout_ms } => {
                let timeout = Duration::from_millis(timeout_ms);
                self.stop(&name, AfterStop::Stop, timeout, reply).await
            }
            ServiceRequest::Restart(name) => {
                self.stop(&name, AfterStop::Restart, STOP_TIMEOUT, reply)
                    .await
            }
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

    /// A service's status; a waiting one says on what, as of now.
    fn status(&self, svc: &Service) -> ServiceStatus {
        let mut status = svc.status();
        if svc.state == State::Waiting {
            let blocked = blocked_on(&self.services, &svc.spec);
            if !blocked.is_empty() {
                status.reason = Some(format!("waiting for {}", blocked.join(", ")));
            } else if self.inner.is_none() {
                status.reason = Some("waiting for the inner to start".into());
            }
        }
        status
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

    /// `signal` to the process group of a running service; what it does to
    /// the service shows in its state later, as any exit would.
    async fn signal(
        &mut self,
        name: &str,
        signal: i32,
    ) -> Result<Vec<ServiceStatus>, ServiceError> {
        let svc = self.get(name)?;
        let running = matches!(svc.state, State::Running | State::Starting);
        match (self.inner.clone(), svc.process, running) {
            (Some(inner), Some((id, _, _)), true) => {
                let status = self.status(svc);
                inner.kill(id, signal).await;
                Ok(vec![status])
            }
            _ => Err(ServiceError::NotRunning(name.to_string())),
        }
    }

    /// SIGTERM to the process group, and SIGKILL after `timeout`. The
    /// reply waits in `pending` until the process has exited.
    async fn stop(&mut self, name: &str, then: AfterStop, timeout: Duration, reply: Reply) {
        let Some(svc) = self.services.get_mut(name) else {
            let _ = reply.send(Err(ServiceError::NotFound(name.to_string())));
            return;
        };
        svc.stop_requested = true;
        let running = matches!(svc.state, State::Running | State::Starting);
        match (self.inner.clone(), svc.process, running) {
            (Some(inner), Some((id, _, _)), true) => {
                svc.pending.push((then, reply));
                inner.kill(id, libc::SIGTERM).await;
                tokio::spawn(async move {
                    tokio::time::sleep(timeout).await;
                    // The init ignores ids whose process is gone.
                    inner.kill(id, libc::SIGKILL).await;
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

/// What `spec` still waits for among its `--after` services, each with
/// where it stands: `web (failed)`, `db (port 5432 not listening yet)`.
fn blocked_on(services: &BTreeMap<String, Service>, spec: &ServiceSpec) -> Vec<String> {
    spec.after
        .iter()
        .filter_map(|dep| {
            let Some(d) = services.get(dep) else {
                return Some(format!("{dep} (not registered)"));
            };
            match (d.state, d.ready, d.spec.http_port) {
                (State::Running, true, _) => None,
                (State::Running, false, Some(port)) => {
                    Some(format!("{dep} (port {port} not listening yet)"))
                }
                // Spawned, not yet seen by a scheduling pass.
                (State::Running, false, None) => Some(format!("{dep} (starting)")),
                (state, _, _) => Some(format!("{dep} ({})", state.name())),
            }
        })
        .collect()
}

/// The service's last lines, from its log (reads files: a blocking thread).
fn last_lines(logs: &LogStore, name: &str) -> Vec<String> {
    let mut last = VecDeque::new();
    let mut cursor = logs
        .tail_cursor(name, LAST_LINES as u64)
        .unwrap_or_else(|_| logs.newest_segment(name));
    while let Ok((records, next)) = logs.read_from(name, cursor, 1000) {
        cursor = next;
        let done = records.len() < 1000;
        for r in records {
            if last.len() == LAST_LINES {
                last.pop_front();
            }
            last.push_back(match r.marker {
                Some(_) => format!("-- {} --", r.line),
                None => r.line,
            });
        }
        if done {
            break;
        }
    }
    last.into()
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

fn on_exit(name: &str, svc: &mut Service, status: ExitStatus, now: Instant) {
    let ran = svc.process.map(|(_, _, since)| now.duration_since(since));
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
            "exited ({status}); restart policy {}",
            svc.spec.restart.name()
        ));
        tracing::info!(service = name, %status, "service exited");
        return;
    }
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
    tracing::info!(service = name, %status, backoff_ms = u64::try_from(svc.backoff.as_millis()).unwrap_or(u64::MAX), "service exited; restarting");
    svc.backoff = (svc.backoff * 2).min(BACKOFF_MAX);
}

/// The marker of a new inner in its services' logs; none for a boot.
fn inner_marker(cause: &InnerCause) -> Option<(LogMarker, String)> {
    match cause {
        InnerCause::Boot => None,
        InnerCause::Bounce => Some((LogMarker::Bounce, "inner bounced".into())),
        InnerCause::Restore(id) => Some((
            LogMarker::Restore,
            format!("inner restored to checkpoint {id}"),
        )),
        InnerCause::Recovery => Some((
            LogMarker::InnerRestart,
            "inner restarted: its init died".into(),
        )),
    }
}

fn kind_text(kind: LogMarker) -> &'static str {
    if kind == LogMarker::Restart {
        "restarted"
    } else {
        "started"
    }
}

/// Runs one service process to its end, reporting to the manager.
/// `markers` go into its log before its output, the last one (its start)
/// with the pid once it is known.
async fn run_process<H: InnerHost>(
    inner: Arc<H>,
    logs: Arc<LogStore>,
    name: String,
    generation: u64,
    spec: ExecSpec,
    markers: Vec<(LogMarker, String)>,
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
    // Opening a source creates its directory and segment file.
    let source = name.clone();
    let log = match tokio::task::spawn_blocking(move || logs.source(&source)).await {
        Ok(Ok(log)) => log,
        Ok(Err(e)) => {
            tracing::error!(service = %name, error = %e, "cannot open the service's log");
            send(exited(ExitStatus::Code(125)));
            return;
        }
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    };
    let process = match inner.spawn(spec).await {
        Ok(p) => p,
        Err(SpawnFailure::Refused(kind, message)) => {
            log.append(Stream::Stderr, &format!("hull: {message}"));
            send(exited(ExitStatus::Code(kind.shell_code())));
            return;
        }
        Err(SpawnFailure::InnerGone) => return,
    };
    let HostProcess { id, pid, fds, exit } = process;
    for (kind, text) in markers {
        let text = match kind {
            LogMarker::Start | LogMarker::Restart => format!("{text} (pid {pid})"),
            _ => text,
        };
        log.append_marker(kind, &text);
    }
    send(Event::Spawned {
        name: name.clone(),
        generation,
        id,
        pid,
    });
    let readers = spawn_captures(fds, &log);
    let Some(status) = exit.await else {
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
        handles.push(tokio::spawn(hull_logs::capture(pipe, stream, log.clone())));
    }
    handles
}
