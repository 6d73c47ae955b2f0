//! The HTTP ingress: one listener in hulld's namespace that routes each
//! request, by its Host, to a port of the inner and relays it there (hyper,
//! HTTP/1.1, bodies streamed, upgrades spliced).
//!
//! A request for a port nobody listens on yet waits for it while the inner
//! bounces or restores, or while a declared service starts, so a browser
//! left open on a dev server sees a slow answer instead of an error page.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::port_policy::PortPolicy;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::{Body, Incoming};
use hyper::client::conn::http1 as client_http1;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::server::conn::http1 as server_http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioIo, TokioTimer};
use subtle::ConstantTimeEq;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::budget::{out_of_fds, ConnLimits, ACCEPT_BACKOFF};
use crate::ports::{listener_went_away, wait_listening};
use crate::{Dialer, FdBudget, PortTable, Throttle};

/// The body of every response the ingress returns: a proxied one streams
/// the inner's body, an error carries a short text.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// A registered service that declared `--http-port`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpRoute {
    pub service: String,
    pub port: u16,
    /// Why the service failed, while it is failed: nothing will listen on
    /// its port until someone starts it, so requests get 503 at once.
    pub failed: Option<String>,
}

#[derive(Debug, Clone)]
pub struct HttpIngressConfig {
    /// How long a request waits for its port during a bounce or restore.
    pub wait: Duration,
    /// Bearer token for private ports (None: nothing is private).
    pub token: Option<Arc<str>>,
    /// Which ports are exposed at all, and which need the token.
    pub policy: PortPolicy,
    /// Peer networks whose connections are dropped at accept: the inner's
    /// own subnet, so the inner cannot reach hulld's listeners through it.
    pub refuse_from: Vec<(IpAddr, u8)>,
    /// hulld's fds that client connections (and theirs into the inner)
    /// may take; past it connections are closed at accept.
    pub budget: Arc<FdBudget>,
    /// Client connections at once, in all and per source (shared with
    /// the forwarder).
    pub conns: Arc<ConnLimits>,
}

impl Default for HttpIngressConfig {
    fn default() -> Self {
        HttpIngressConfig {
            wait: Duration::from_secs(10),
            token: None,
            policy: PortPolicy::default(),
            refuse_from: Vec::new(),
            budget: FdBudget::unlimited(),
            conns: Arc::new(ConnLimits::default()),
        }
    }
}

/// The ingress: routes and the port table are watched, so a service added
/// or an inner restarted takes effect on the next request.
pub struct HttpIngress {
    pub dialer: Dialer,
    pub ports: watch::Receiver<PortTable>,
    pub routes: watch::Receiver<Vec<HttpRoute>>,
    pub config: HttpIngressConfig,
}

/// How long a failed bodiless request waits for the port table to change
/// before it is sent again.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Without a timer hyper never times out a client that trickles its header.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The shortest time a connect to the inner is given.
const CONNECT_MIN: Duration = Duration::from_secs(1);
/// The largest answer to an idempotent request that is read whole before
/// it is passed on, so that it can be asked for again if the server dies
/// half-way through it.
const WHOLE_ANSWER_LIMIT: u64 = 256 * 1024;
/// How long a request waits for the previous one's upstream connection to
/// finish reading its response before it dials a new one.
const REUSE_WAIT: Duration = Duration::from_millis(50);

/// Upstream connections kept by one client connection, by port: a browser
/// that keeps its connection alive gets one kept alive to the inner too, so
/// a page with many assets does not dial (through the namespace thread) per
/// request. Requests on one HTTP/1 connection are sequential, so the lock
/// is never contended.
type Upstreams = Arc<Mutex<HashMap<u16, client_http1::SendRequest<ProxyBody>>>>;

/// A request that cannot be forwarded: the status and a short text body.
type Failure = (StatusCode, String);

impl HttpIngress {
    /// Accepts connections forever, one task each.
    pub async fn serve(self: Arc<Self>, listener: TcpListener) {
        let (failed, no_fds, too_many) = (
            Throttle::default(),
            Throttle::default(),
            Throttle::default(),
        );
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    if let Some(suppressed) = failed.hit() {
                        warn!(error = %e, out_of_fds = out_of_fds(&e), suppressed, "http ingress: accept failed; backing off");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let peer_ip = crate::peer::canonical_ip(peer.ip());
            if crate::peer::refused(peer_ip, &self.config.refuse_from) {
                debug!(%peer, "http ingress: connection from a refused network dropped");
                drop(stream);
                continue;
            }
            let admission = match self.config.conns.admit(peer_ip) {
                Ok(admission) => admission,
                Err(why) => {
                    if let Some(suppressed) = too_many.hit() {
                        warn!(%peer, ?why, suppressed, "http ingress: connection refused: too many open");
                    }
                    drop(stream);
                    continue;
                }
            };
            // The client's fd and, at most, one kept into the inner.
            let Some(lease) = self.config.budget.take(2) else {
                if let Some(suppressed) = no_fds.hit() {
                    warn!(suppressed, "http ingress: connection refused: the fds hulld gives to requests are all in use");
                }
                drop(stream);
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                this.serve_connection(stream, peer_ip).await;
                drop((lease, admission));
            });
        }
    }

    async fn serve_connection(self: Arc<Self>, stream: TcpStream, peer: IpAddr) {
        // Small writes (headers, WebSocket frames) must not wait for Nagle.
        let _ = stream.set_nodelay(true);
        let upstreams = Upstreams::default();
        let service = service_fn(move |req| {
            let this = self.clone();
            let upstreams = upstreams.clone();
            async move { Ok::<_, Infallible>(this.handle(req, peer, &upstreams).await) }
        });
        let mut builder = server_http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT);
        if let Err(e) = builder
            .serve_connection(TokioIo::new(stream), service)
            .with_upgrades()
            .await
        {
            debug!(%peer, error = %e, "http ingress: connection ended with an error");
        }
    }

    async fn handle(
        &self,
        req: Request<Incoming>,
        peer: IpAddr,
        upstreams: &Upstreams,
    ) -> Response<ProxyBody> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        // Two Hosts give the router one name and the inner's server
        // another (RFC 9112 §3.2: answer 400).
        if req.headers().get_all(header::HOST).iter().nth(1).is_some() {
            return text(
                StatusCode::BAD_REQUEST,
                "more than one Host header\n".to_owned(),
            );
        }
        let host = request_host(&req);
        let port = {
            let routes = self.routes.borrow();
            route(host.as_deref(), &routes)
        };
        let resp = match &port {
            Err(message) => text(StatusCode::BAD_REQUEST, message.clone()),
            Ok(None) => text(
                StatusCode::BAD_GATEWAY,
                "no service declares --http-port; use a Host of the form PORT.<anything>\n"
                    .to_owned(),
            ),
            Ok(Some(port)) => {
                self.proxy(req, *port, host.as_deref(), peer, upstreams)
                    .await
            }
        };
        let port = port.ok().flatten();
        debug!(
            %peer, %method, path, host = host.as_deref().unwrap_or(""), port,
            status = resp.status().as_u16(), elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "http ingress request"
        );
        resp
    }

    async fn proxy(
        &self,
        mut req: Request<Incoming>,
        port: u16,
        host: Option<&str>,
        peer: IpAddr,
        upstreams: &Upstreams,
    ) -> Response<ProxyBody> {
        if !self.config.policy.exposes(port) {
            return text(
                StatusCode::FORBIDDEN,
                format!("port {port} is not exposed (the `expose` setting leaves it out)\n"),
            );
        }
        if self.is_private(port) && !self.authorized(req.headers_mut()) {
            let mut resp = text(
                StatusCode::UNAUTHORIZED,
                format!("port {port} is private: send Authorization: Bearer <token>\n"),
            );
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return resp;
        }
        if req.method() == Method::CONNECT {
            return text(
                StatusCode::METHOD_NOT_ALLOWED,
                "CONNECT is not supported by the ingress\n".to_owned(),
            );
        }

        let upgrade = req.headers().contains_key(header::UPGRADE);
        if let Err((status, message)) = prepare_request(&mut req, port, host, peer, upgrade) {
            return text(status, message);
        }
        let downstream = upgrade.then(|| hyper::upgrade::on(&mut req));
        let mut req = req.map(|body| body.boxed());

        if let Some(downstream) = downstream {
            let mut sender = match self.fresh_sender(port).await {
                Ok(s) => s,
                Err((status, message)) => return text(status, message),
            };
            let mut resp = match sender.send_request(req).await {
                Ok(r) => r,
                Err(e) => return upstream_failed(port, &e),
            };
            if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                let upstream = hyper::upgrade::on(&mut resp);
                tokio::spawn(splice(downstream, upstream, sender, port));
            }
            return finish_response(resp.map(|body| body.boxed()));
        }

        // A kept connection may have been closed by the inner since its last
        // response; hyper hands the request back when it wrote none of it,
        // and then a fresh connection gets it.
        // A request without a body can be sent again as it was: if the
        // server it reached dies before answering (a bounce caught it
        // mid-request), it goes to the server that comes back.
        let replay = req.body().is_end_stream().then(|| {
            let mut again = Request::new(());
            *again.method_mut() = req.method().clone();
            *again.uri_mut() = req.uri().clone();
            *again.version_mut() = req.version();
            *again.headers_mut() = req.headers().clone();
            again
        });
        // The server may also die between its head and the end of its body.
        // An idempotent request may then be sent again too (RFC 9110
        // §9.2.2), as long as nothing of the answer has gone out yet; so a
        // small answer to one is read whole before its head is passed on.
        let whole_answer = replay.is_some() && req.method().is_idempotent();
        let deadline = tokio::time::Instant::now() + self.config.wait;
        let mut kept = self.kept_sender(port, upstreams).await;
        loop {
            let reused = kept.is_some();
            let mut sender = match kept.take() {
                Some(s) => s,
                None => match self.fresh_sender(port).await {
                    Ok(s) => s,
                    Err((status, message)) => return text(status, message),
                },
            };
            let failure = match sender.try_send_request(req).await {
                Ok(resp) => {
                    lock(upstreams).insert(port, sender);
                    if !(whole_answer && small_body(&resp)) {
                        return finish_response(resp.map(|body| body.boxed()));
                    }
                    match read_whole(resp).await {
                        Ok(resp) => return finish_response(resp),
                        Err(e) => e,
                    }
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if reused => {
                        debug!(
                            port,
                            "http ingress: kept connection was closed, dialing again"
                        );
                        req = back;
                        continue;
                    }
                    _ => e.into_error(),
                },
            };
            match &replay {
                Some(template) if tokio::time::Instant::now() < deadline => {
                    debug!(port, error = %failure, "http ingress: upstream failed before a whole answer; sending again");
                    let mut table = self.ports.clone();
                    let _ = tokio::time::timeout(RETRY_PAUSE, table.changed()).await;
                    req = template
                        .clone()
                        .map(|()| Empty::new().map_err(|never| match never {}).boxed());
                }
                _ => return upstream_failed(port, &failure),
            }
        }
    }

    async fn kept_sender(
        &self,
        port: u16,
        upstreams: &Upstreams,
    ) -> Option<client_http1::SendRequest<ProxyBody>> {
        let mut sender = lock(upstreams).remove(&port)?;
        if sender.is_closed() {
            return None;
        }
        // The previous response's end may still be on its way through the
        // upstream connection's task.
        match tokio::time::timeout(REUSE_WAIT, sender.ready()).await {
            Ok(Ok(())) => Some(sender),
            _ => None,
        }
    }

    fn is_private(&self, port: u16) -> bool {
        self.config.token.is_some() && self.config.policy.is_private(port)
    }

    /// Checks the bearer token and removes it: it is hull's, not the
    /// inner's, and the user's code has no business seeing it.
    fn authorized(&self, headers: &mut HeaderMap) -> bool {
        let Some(token) = self.config.token.as_deref() else {
            return true;
        };
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, given)| bool::from(given.trim().as_bytes().ct_eq(token.as_bytes())))
            .unwrap_or(false);
        if ok {
            headers.remove(header::AUTHORIZATION);
        }
        ok
    }

    async fn fresh_sender(
        &self,
        port: u16,
    ) -> Result<client_http1::SendRequest<ProxyBody>, Failure> {
        let stream = self.dial(port).await?;
        let (sender, conn) = client_http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| upstream_failure(port, &e))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                debug!(port, error = %e, "http ingress: upstream connection ended with an error");
            }
        });
        Ok(sender)
    }

    /// Connects to `port` in the inner, waiting for it to listen when the
    /// inner is coming back or the port is a declared service's.
    async fn dial(&self, port: u16) -> Result<TcpStream, Failure> {
        let declared = self.routes.borrow().iter().any(|r| r.port == port);
        let mut table = self.ports.clone();
        let deadline = Instant::now() + self.config.wait;
        let mut pause = Duration::from_millis(20);
        let not_listening = |why: &str| {
            (
                StatusCode::BAD_GATEWAY,
                format!("nothing listens on port {port} in the inner{why}\n"),
            )
        };
        loop {
            let found = table.borrow_and_update().find(port).cloned();
            let listening = match found {
                Some(l) => l,
                None => {
                    if let Some(failure) = self.failed_service(port) {
                        return Err(failure);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    let mut routes = self.routes.clone();
                    tokio::select! {
                        found = wait_listening(&mut table, port, left, declared) => match found {
                            Some(l) => l,
                            None => return Err(not_listening("")),
                        },
                        failure = service_fails(&mut routes, port) => return Err(failure),
                    }
                }
            };
            let connect = self.dialer.connect(port, Some(listening.addr));
            // A connect started just before the deadline still gets a fair
            // chance: only a hung one (a frozen inner's full backlog) ends here.
            let limit = deadline
                .saturating_duration_since(Instant::now())
                .max(CONNECT_MIN);
            match tokio::time::timeout(limit, connect).await {
                Ok(Ok(stream)) => return Ok(stream),
                // The table is one scan behind: the listener may have just
                // closed because the inner or the service is going down.
                // Wait for the next scan (or a short pause) and look again.
                Ok(Err(e)) if listener_went_away(&e) => {
                    if let Some(failure) = self.failed_service(port) {
                        return Err(failure);
                    }
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(not_listening(&format!(" ({e})")));
                    }
                    debug!(port, error = %e, "http ingress: the port went away, waiting for it");
                    if let Ok(Err(_)) = tokio::time::timeout(pause.min(left), table.changed()).await
                    {
                        // No more scans will come; pause so this is no busy loop.
                        tokio::time::sleep(pause.min(left)).await;
                    }
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                Ok(Err(e)) => {
                    return Err((
                        StatusCode::BAD_GATEWAY,
                        format!("cannot connect to port {port} in the inner: {e}\n"),
                    ))
                }
                Err(_) => {
                    return Err((
                        StatusCode::GATEWAY_TIMEOUT,
                        format!("connecting to port {port} in the inner timed out\n"),
                    ))
                }
            }
        }
    }
}

impl HttpIngress {
    /// 503 naming the service whose port this is, if it has failed.
    fn failed_service(&self, port: u16) -> Option<Failure> {
        failed_route(&self.routes.borrow(), port)
    }
}

fn failed_route(routes: &[HttpRoute], port: u16) -> Option<Failure> {
    let r = routes.iter().find(|r| r.port == port)?;
    let why = r.failed.as_ref()?;
    Some((
        StatusCode::SERVICE_UNAVAILABLE,
        format!(
            "service {} (port {port}) has failed: {why}\nstart it again with: hull services start {}\n",
            r.service, r.service
        ),
    ))
}

/// Resolves once the service declaring `port` has failed; never if the
/// routes are no longer published.
async fn service_fails(routes: &mut watch::Receiver<Vec<HttpRoute>>, port: u16) -> Failure {
    loop {
        if let Some(failure) = failed_route(&routes.borrow_and_update(), port) {
            return failure;
        }
        if routes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere cannot leave a map of senders inconsistent.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Relays the bytes of an upgraded connection (WebSocket, ...) both ways
/// until either side closes.
async fn splice(
    downstream: hyper::upgrade::OnUpgrade,
    upstream: hyper::upgrade::OnUpgrade,
    sender: client_http1::SendRequest<ProxyBody>,
    port: u16,
) {
    let (down, up) = tokio::join!(downstream, upstream);
    // Held until here so that hyper never sees the upstream connection as
    // abandoned before it has handed it over.
    drop(sender);
    let (down, up) = match (down, up) {
        (Ok(d), Ok(u)) => (d, u),
        (Err(e), _) | (_, Err(e)) => {
            debug!(port, error = %e, "http ingress: upgrade failed");
            return;
        }
    };
    let mut down = TokioIo::new(down);
    let mut up = TokioIo::new(up);
    match tokio::io::copy_bidirectional(&mut down, &mut up).await {
        Ok((to_inner, from_inner)) => {
            debug!(
                port,
                to_inner, from_inner, "http ingress: upgraded connection closed"
            )
        }
        Err(e) => debug!(port, error = %e, "http ingress: upgraded connection failed"),
    }
}

/// The Host the client asked for: the authority of an absolute-form target
/// wins over the Host header (RFC 9112 §3.2.2), else the Host header.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    if let Some(authority) = req.uri().authority() {
        return Some(authority.as_str().to_owned());
    }
    req.headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .map(|s| s.trim().to_owned())
        .filter(|s| !s.is_empty())
}

/// The first DNS label of a Host value, or None for an IP literal (so that
/// `127.0.0.1:8080` is not read as port 127).
fn first_label(host: &str) -> Option<&str> {
    if host.starts_with('[') {
        return None;
    }
    let name = match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|b| b.is_ascii_digit()) => name,
        _ => host,
    };
    if name.parse::<IpAddr>().is_ok() {
        return None;
    }
    name.split('.').next().filter(|l| !l.is_empty())
}

/// Which inner port a request for `host` goes to: `None` when nothing
/// routes it, an error (for a 400) when its first label is a number that
/// is no port, which no service name can be either.
fn route(host: Option<&str>, routes: &[HttpRoute]) -> Result<Option<u16>, String> {
    if let Some(label) = host.and_then(first_label) {
        if label.bytes().all(|b| b.is_ascii_digit()) {
            return match label.parse::<u16>() {
                Ok(port) if port != 0 => Ok(Some(port)),
                _ => Err(format!(
                    "{label:?} in the Host is not a port: use 1-65535, as in 8000.localhost\n"
                )),
            };
        }
        if let Some(r) = routes
            .iter()
            .find(|r| r.service.eq_ignore_ascii_case(label))
        {
            return Ok(Some(r.port));
        }
    }
    Ok(routes
        .iter()
        .min_by(|a, b| a.service.cmp(&b.service))
        .map(|r| r.port))
}

/// Hop-by-hop headers (RFC 9110 §7.6.1); Proxy-* are matched by prefix.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes hop-by-hop headers, those named by Connection included; an
/// upgrade keeps `Connection: upgrade` and its `Upgrade`.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    let upgrade_value = headers.get(header::UPGRADE).cloned();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    let proxy: Vec<HeaderName> = headers
        .keys()
        .filter(|k| k.as_str().starts_with("proxy-"))
        .cloned()
        .collect();
    for name in proxy {
        headers.remove(name);
    }
    if upgrade {
        if let Some(value) = upgrade_value {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            headers.insert(header::UPGRADE, value);
        }
    }
}

fn prepare_request(
    req: &mut Request<Incoming>,
    port: u16,
    host: Option<&str>,
    peer: IpAddr,
    upgrade: bool,
) -> Result<(), Failure> {
    let absolute = req.uri().authority().is_some();
    // The inner's server expects origin-form, whatever form the client used.
    let target = req
        .uri()
        .path_and_query()
        .map(|pq| pq.as_str())
        .unwrap_or("/");
    let target: Uri = target.parse().map_err(|_| {
        (
            StatusCode::BAD_REQUEST,
            "the request target is not valid\n".to_owned(),
        )
    })?;
    *req.uri_mut() = target;
    *req.version_mut() = Version::HTTP_11;

    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    // hyper already answered it with its own 100 Continue.
    headers.remove(header::EXPECT);

    // The Host the request was routed by is the one the inner's server
    // sees: an absolute-form target's authority replaces any Host header
    // (RFC 9112 §3.2.2), so routing and the server never disagree.
    if absolute {
        if let Some(value) = host.and_then(|h| HeaderValue::from_str(h).ok()) {
            headers.insert(header::HOST, value);
        }
    }
    if !headers.contains_key(header::HOST) {
        let value = host
            .and_then(|h| HeaderValue::from_str(h).ok())
            .unwrap_or_else(|| {
                HeaderValue::from_str(&format!("localhost:{port}"))
                    .unwrap_or_else(|_| HeaderValue::from_static("localhost"))
            });
        headers.insert(header::HOST, value);
    }

    let xff = HeaderName::from_static("x-forwarded-for");
    let prior: Vec<&str> = headers
        .get_all(&xff)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    let chain = if prior.is_empty() {
        peer.to_string()
    } else {
        format!("{}, {peer}", prior.join(", "))
    };
    let chain = HeaderValue::from_str(&chain)
        .or_else(|_| HeaderValue::from_str(&peer.to_string()))
        .map_err(|_| (StatusCode::BAD_REQUEST, "bad X-Forwarded-For\n".to_owned()))?;
    headers.insert(xff, chain);
    headers.insert(
        HeaderName::from_static("x-forwarded-proto"),
        HeaderValue::from_static("http"),
    );
    let xfh = HeaderName::from_static("x-forwarded-host");
    match host.and_then(|h| HeaderValue::from_str(h).ok()) {
        Some(v) => {
            headers.insert(xfh, v);
        }
        None => {
            headers.remove(xfh);
        }
    }
    Ok(())
}

fn finish_response(resp: Response<ProxyBody>) -> Response<ProxyBody> {
    let upgrade = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers, upgrade);
    Response::from_parts(parts, body)
}

/// Whether an answer's body has a declared length small enough to hold
/// before passing it on. A streamed body of unknown length (server-sent
/// events, a long download) is relayed as it comes.
fn small_body(resp: &Response<Incoming>) -> bool {
    resp.status() != StatusCode::SWITCHING_PROTOCOLS
        && resp
            .body()
            .size_hint()
            .exact()
            .is_some_and(|len| len <= WHOLE_ANSWER_LIMIT)
}

async fn read_whole(resp: Response<Incoming>) -> Result<Response<ProxyBody>, hyper::Error> {
    let (parts, body) = resp.into_parts();
    let bytes = body.collect().await?.to_bytes();
    Ok(Response::from_parts(
        parts,
        Full::new(bytes).map_err(|never| match never {}).boxed(),
    ))
}

fn upstream_failed(port: u16, e: &hyper::Error) -> Response<ProxyBody> {
    let (status, message) = upstream_failure(port, e);
    text(status, message)
}

fn upstream_failure(port: u16, e: &hyper::Error) -> Failure {
    debug!(port, error = %e, "http ingress: upstream request failed");
    (
        StatusCode::BAD_GATEWAY,
        format!("the server on port {port} in the inner failed: {e}\n"),
    )
}

fn text(status: StatusCode, body: String) -> Response<ProxyBody> {
    let mut resp = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, SocketAddr};
    use std::sync::atomic::{AtomicUsize, Ordering};

    use http_body_util::StreamBody;
    use hyper::body::{Body, Frame};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::task::JoinSet;

    use super::*;
    use crate::ListeningPort;

    const LOCAL: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);
    /// Every await on the network in a test is bounded, so a bug fails the
    /// test instead of hanging the run.
    const LIMIT: Duration = Duration::from_secs(20);

    fn listening(port: u16) -> ListeningPort {
        ListeningPort {
            port,
            addr: LOCAL,
            inode: 0,
            uid: 0,
        }
    }

    fn table(ports: &[u16], inner_running: bool) -> PortTable {
        PortTable {
            ports: ports.iter().copied().map(listening).collect(),
            inner_running,
            recently_gone: HashMap::new(),
            scanned_at: None,
        }
    }

    fn config() -> HttpIngressConfig {
        HttpIngressConfig {
            wait: Duration::from_secs(10),
            ..HttpIngressConfig::default()
        }
    }

    fn routes(list: &[(&str, u16)]) -> Vec<HttpRoute> {
        list.iter()
            .map(|&(service, port)| HttpRoute {
                service: service.to_owned(),
                port,
                failed: None,
            })
            .collect()
    }

    struct Proxy {
        addr: SocketAddr,
        ports: watch::Sender<PortTable>,
        _routes: Arc<watch::Sender<Vec<HttpRoute>>>,
    }

    async fn start_proxy(
        config: HttpIngressConfig,
        ports: PortTable,
        routes: Vec<HttpRoute>,
    ) -> Proxy {
        let (ports_tx, ports_rx) = watch::channel(ports);
        let (routes_tx, routes_rx) = watch::channel(routes);
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let ingress = Arc::new(HttpIngress {
            dialer: Dialer::host(),
            ports: ports_rx,
            routes: routes_rx,
            config,
        });
        tokio::spawn(ingress.serve(listener));
        Proxy {
            addr,
            ports: ports_tx,
            _routes: Arc::new(routes_tx),
        }
    }

    /// A small upstream: `/echo` streams the request body back, anything
    /// else answers with what it saw. Aborting its task closes every one of
    /// its connections too (they live in its JoinSet).
    async fn run_upstream(listener: TcpListener, name: &'static str, conns: Arc<AtomicUsize>) {
        let mut tasks = JoinSet::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            conns.fetch_add(1, Ordering::SeqCst);
            tasks.spawn(async move {
                let service = service_fn(move |req| async move {
                    Ok::<_, Infallible>(upstream_answer(name, req))
                });
                let _ = server_http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    }

    fn upstream_answer(name: &str, req: Request<Incoming>) -> Response<ProxyBody> {
        if req.uri().path() == "/echo" {
            return Response::new(req.into_body().boxed());
        }
        let h = |n: &str| {
            req.headers()
                .get_all(n)
                .iter()
                .map(|v| v.to_str().unwrap_or("?").to_owned())
                .collect::<Vec<_>>()
                .join("|")
        };
        let info = format!(
            "name={name}\ntarget={}\nhost={}\nxff={}\nxfp={}\nxfh={}\nauth={}\n",
            req.uri(),
            h("host"),
            h("x-forwarded-for"),
            h("x-forwarded-proto"),
            h("x-forwarded-host"),
            h("authorization"),
        );
        text(StatusCode::OK, info)
    }

    /// Starts an upstream on a fresh loopback port.
    async fn upstream(name: &'static str) -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        tokio::spawn(run_upstream(listener, name, conns.clone()));
        (port, conns)
    }

    /// A loopback port nothing listens on (bound once, then released).
    async fn free_port() -> u16 {
        let l = TcpListener::bind((LOCAL, 0)).await.unwrap();
        l.local_addr().unwrap().port()
    }

    type Client<B> = client_http1::SendRequest<B>;

    async fn connect<B>(proxy: SocketAddr) -> Client<B>
    where
        B: Body + Send + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = TcpStream::connect(proxy).await.unwrap();
        let (sender, conn) = client_http1::handshake(TokioIo::new(stream)).await.unwrap();
        tokio::spawn(conn);
        sender
    }

    fn get(host: &str) -> Request<Full<Bytes>> {
        Request::get("/hello?x=1")
            .header(header::HOST, host)
            .body(Full::new(Bytes::new()))
            .unwrap()
    }

    async fn call(
        client: &mut Client<Full<Bytes>>,
        req: Request<Full<Bytes>>,
    ) -> (StatusCode, HeaderMap, String) {
        let run = async {
            let resp = client.send_request(req).await.unwrap();
            let (parts, body) = resp.into_parts();
            let body = body.collect().await.unwrap().to_bytes();
            (
                parts.status,
                parts.headers,
                String::from_utf8_lossy(&body).into_owned(),
            )
        };
        tokio::time::timeout(LIMIT, run)
            .await
            .expect("request hung")
    }

    async fn fetch(
        proxy: SocketAddr,
        req: Request<Full<Bytes>>,
    ) -> (StatusCode, HeaderMap, String) {
        let mut client = connect(proxy).await;
        call(&mut client, req).await
    }

    #[tokio::test]
    async fn http_routes_by_port_label() {
        let (a, _) = upstream("a").await;
        let (b, _) = upstream("b").await;
        let proxy = start_proxy(config(), table(&[a, b], true), routes(&[("web", a)])).await;

        let (status, _, body) = fetch(proxy.addr, get(&format!("{b}.localhost:8080"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("name=b\n"), "{body}");
        assert!(body.contains("target=/hello?x=1\n"), "{body}");
        assert!(
            body.contains(&format!("host={b}.localhost:8080\n")),
            "{body}"
        );

        let (_, _, body) = fetch(proxy.addr, get(&format!("{a}.anything.example"))).await;
        assert!(body.contains("name=a\n"), "{body}");

        // No port label: the only route.
        let (_, _, body) = fetch(proxy.addr, get("localhost:8080")).await;
        assert!(body.contains("name=a\n"), "{body}");

        // Absolute-form target: its authority routes.
        let req = Request::get(format!("http://{b}.localhost:8080/abs?q"))
            .header(header::HOST, format!("{a}.localhost"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (_, _, body) = fetch(proxy.addr, req).await;
        assert!(body.contains("name=b\n"), "{body}");
        assert!(body.contains("target=/abs?q\n"), "{body}");
        // ... and is the Host the inner's server sees: one that routed by
        // the target and told the server another name would let a request
        // reach a service under a name it was not routed by.
        assert!(
            body.contains(&format!("host={b}.localhost:8080\n")),
            "{body}"
        );
    }

    #[tokio::test]
    async fn http_more_than_one_host_is_400() {
        let (a, _) = upstream("a").await;
        let (b, _) = upstream("b").await;
        let proxy = start_proxy(config(), table(&[a, b], true), Vec::new()).await;
        let req = Request::get("/")
            .header(header::HOST, format!("{a}.localhost"))
            .header(header::HOST, format!("{b}.localhost"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let (status, _, body) = fetch(proxy.addr, req).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(body.contains("Host"), "{body}");
    }

    #[tokio::test]
    async fn http_routes_by_service_name() {
        let (a, _) = upstream("a").await;
        let (b, _) = upstream("b").await;
        let proxy = start_proxy(
            config(),
            table(&[a, b], true),
            routes(&[("zeta", a), ("api", b)]),
        )
        .await;
        for (host, want) in [
            ("zeta.localhost:8080", "a"),
            ("API.example", "b"),
            // Neither a port nor a service: the first route by name.
            ("other.localhost", "b"),
            // An IP literal is not read as port 127.
            ("127.0.0.1:8080", "b"),
        ] {
            let (status, _, body) = fetch(proxy.addr, get(host)).await;
            assert_eq!(status, StatusCode::OK, "{host}: {body}");
            assert!(body.contains(&format!("name={want}\n")), "{host}: {body}");
        }
    }

    #[tokio::test]
    async fn http_no_route_is_502() {
        let proxy = start_proxy(config(), table(&[], true), Vec::new()).await;
        let (status, _, body) = fetch(proxy.addr, get("localhost:8080")).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains("--http-port"), "{body}");
        assert!(body.contains("PORT."), "{body}");
    }

    #[tokio::test]
    async fn http_nothing_listens_is_quick_502() {
        let port = free_port().await;
        let proxy = start_proxy(config(), table(&[], true), Vec::new()).await;
        let started = Instant::now();
        let (status, _, body) = fetch(proxy.addr, get(&format!("{port}.localhost"))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(
            body.contains(&format!("nothing listens on port {port} in the inner")),
            "{body}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "took {:?} with the inner running",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn http_waits_for_the_port_while_the_inner_starts() {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let proxy = start_proxy(config(), table(&[], false), Vec::new()).await;
        let publish = proxy.ports.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            tokio::spawn(run_upstream(listener, "late", Arc::default()));
            publish.send_replace(table(&[port], true));
        });
        let started = Instant::now();
        let (status, _, body) = fetch(proxy.addr, get(&format!("{port}.localhost"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("name=late\n"), "{body}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    async fn http_refused_port_is_retried_then_502() {
        // The table says the port listens but nothing does: the proxy keeps
        // trying for `wait`, then names the port.
        let port = free_port().await;
        let cfg = HttpIngressConfig {
            wait: Duration::from_millis(400),
            ..config()
        };
        let proxy = start_proxy(cfg, table(&[port], true), Vec::new()).await;
        let started = Instant::now();
        let (status, _, body) = fetch(proxy.addr, get(&format!("{port}.localhost"))).await;
        assert_eq!(status, StatusCode::BAD_GATEWAY);
        assert!(body.contains(&format!("port {port}")), "{body}");
        assert!(started.elapsed() >= Duration::from_millis(350));
        assert!(started.elapsed() < Duration::from_secs(3));

        // And a listener that comes back within `wait` gets the request.
        let proxy = start_proxy(config(), table(&[port], true), Vec::new()).await;
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let listener = TcpListener::bind((LOCAL, port)).await.unwrap();
            run_upstream(listener, "back", Arc::default()).await;
        });
        let (status, _, body) = fetch(proxy.addr, get(&format!("{port}.localhost"))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("name=back\n"), "{body}");
    }

    #[tokio::test]
    async fn http_private_port_needs_the_token() {
        let (a, _) = upstream("a").await;
        let (b, _) = upstream("b").await;
        let cfg = HttpIngressConfig {
            token: Some(Arc::from("s3cret-token")),
            policy: PortPolicy {
                private_ports: vec![a],
                ..PortPolicy::default()
            },
            ..config()
        };
        let proxy = start_proxy(cfg, table(&[a, b], true), Vec::new()).await;
        let host = format!("{a}.localhost");
        let with_auth = |value: &str| {
            let mut req = get(&host);
            req.headers_mut()
                .insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            req
        };

        let (status, headers, _) = fetch(proxy.addr, get(&host)).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        for wrong in [
            "Bearer nope-nope-nope",
            "Bearer s3cret-toke",
            "Basic s3cret-token",
        ] {
            let (status, headers, _) = fetch(proxy.addr, with_auth(wrong)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{wrong}");
            assert_eq!(headers[header::WWW_AUTHENTICATE], "Bearer");
        }
        let (status, _, body) = fetch(proxy.addr, with_auth("Bearer s3cret-token")).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("name=a\n"), "{body}");
        // hull's token is not handed to the user's code.
        assert!(body.contains("auth=\n"), "{body}");

        // Ports not listed stay public.
        let (status, _, _) = fetch(proxy.addr, get(&format!("{b}.localhost"))).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn http_private_all() {
        let (a, _) = upstream("a").await;
        let cfg = HttpIngressConfig {
            token: Some(Arc::from("tok")),
            policy: PortPolicy {
                private_all: true,
                ..PortPolicy::default()
            },
            ..config()
        };
        let proxy = start_proxy(cfg, table(&[a], true), routes(&[("web", a)])).await;
        let (status, _, _) = fetch(proxy.addr, get("web.localhost")).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        let mut req = get("web.localhost");
        req.headers_mut().insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer tok"),
        );
        let (status, _, _) = fetch(proxy.addr, req).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[tokio::test]
    async fn http_forwarded_headers() {
        let (a, _) = upstream("a").await;
        let proxy = start_proxy(config(), table(&[a], true), Vec::new()).await;
        let host = format!("{a}.localhost:8080");

        let (_, _, body) = fetch(proxy.addr, get(&host)).await;
        assert!(body.contains("xff=127.0.0.1\n"), "{body}");
        assert!(body.contains("xfp=http\n"), "{body}");
        assert!(body.contains(&format!("xfh={host}\n")), "{body}");

        let mut req = get(&host);
        req.headers_mut().insert(
            HeaderName::from_static("x-forwarded-for"),
            HeaderValue::from_static("10.1.2.3"),
        );
        req.headers_mut().insert(
            HeaderName::from_static("x-forwarded-proto"),
            HeaderValue::from_static("https"),
        );
        let (_, _, body) = fetch(proxy.addr, req).await;
        assert!(body.contains("xff=10.1.2.3, 127.0.0.1\n"), "{body}");
        assert!(body.contains("xfp=http\n"), "{body}");

        // A HEAD keeps the length the upstream announced, with no body.
        let (_, get_headers, get_body) = fetch(proxy.addr, get(&host)).await;
        let mut head = get(&host);
        *head.method_mut() = Method::HEAD;
        let (status, headers, body) = fetch(proxy.addr, head).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body.is_empty());
        assert_eq!(
            headers.get(header::CONTENT_LENGTH),
            get_headers.get(header::CONTENT_LENGTH)
        );
        assert_eq!(
            get_headers[header::CONTENT_LENGTH],
            get_body.len().to_string().as_str()
        );
    }

    #[tokio::test]
    async fn http_keeps_upstream_connection_and_redials_after_restart() {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let first = tokio::spawn(run_upstream(listener, "first", conns.clone()));
        let proxy = start_proxy(config(), table(&[port], true), Vec::new()).await;
        let host = format!("{port}.localhost");

        let mut client = connect(proxy.addr).await;
        for _ in 0..3 {
            let (status, _, body) = call(&mut client, get(&host)).await;
            assert_eq!(status, StatusCode::OK, "{body}");
        }
        assert_eq!(
            conns.load(Ordering::SeqCst),
            1,
            "one kept upstream connection"
        );

        // The server goes away with its connections and comes back.
        first.abort();
        let _ = first.await;
        let listener = TcpListener::bind((LOCAL, port)).await.unwrap();
        tokio::spawn(run_upstream(listener, "second", conns.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (status, _, body) = call(&mut client, get(&host)).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(body.contains("name=second\n"), "{body}");
    }

    /// An upstream whose first connection answers a head and part of the
    /// body, then dies (a bounce caught it mid-answer); later ones answer
    /// whole. Counts connections.
    async fn upstream_dying_mid_answer() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let conns = Arc::new(AtomicUsize::new(0));
        let count = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let nth = count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match stream.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    let answer: &[u8] = if nth == 0 {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nhalf"
                    } else {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\nwhole answer"
                    };
                    let _ = stream.write_all(answer).await;
                });
            }
        });
        (port, conns)
    }

    #[tokio::test]
    async fn http_an_answer_cut_short_is_asked_for_again() {
        let (port, conns) = upstream_dying_mid_answer().await;
        let proxy = start_proxy(config(), table(&[port], true), Vec::new()).await;
        let (status, _, body) = fetch(proxy.addr, get(&format!("{port}.localhost"))).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "whole answer"));
        assert_eq!(conns.load(Ordering::SeqCst), 2, "sent once more");
    }

    #[tokio::test]
    async fn http_a_post_is_not_sent_again_once_answered() {
        // The server has acted on a POST once it answers; a second one could
        // act twice. The client sees the answer break off instead.
        let (port, conns) = upstream_dying_mid_answer().await;
        let proxy = start_proxy(config(), table(&[port], true), Vec::new()).await;
        let req = Request::post("/act")
            .header(header::HOST, format!("{port}.localhost"))
            .body(Full::new(Bytes::new()))
            .unwrap();
        let mut client = connect(proxy.addr).await;
        let resp = tokio::time::timeout(LIMIT, client.send_request(req))
            .await
            .expect("request hung")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let body = tokio::time::timeout(LIMIT, resp.into_body().collect())
            .await
            .expect("body hung");
        assert!(body.is_err(), "a cut answer must not look whole");
        assert_eq!(conns.load(Ordering::SeqCst), 1, "sent once");
    }

    /// xorshift64: a reproducible byte stream without buffering it.
    struct Noise(u64);

    impl Noise {
        fn chunk(&mut self, len: usize) -> Bytes {
            let mut out = Vec::with_capacity(len + 8);
            while out.len() < len {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                out.extend_from_slice(&self.0.to_le_bytes());
            }
            out.truncate(len);
            Bytes::from(out)
        }
    }

    /// FNV-1a, fed incrementally.
    fn fnv(mut h: u64, data: &[u8]) -> u64 {
        for &b in data {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x100_0000_01b3);
        }
        h
    }
    const FNV_START: u64 = 0xcbf2_9ce4_8422_2325;

    #[tokio::test]
    async fn http_streams_20_mb_both_ways() {
        const TOTAL: usize = 20 << 20;
        const CHUNK: usize = 64 << 10;
        let (a, _) = upstream("a").await;
        let proxy = start_proxy(config(), table(&[a], true), Vec::new()).await;

        let mut expected = FNV_START;
        let mut noise = Noise(0x9e37_79b9_7f4a_7c15);
        for _ in 0..TOTAL / CHUNK {
            expected = fnv(expected, &noise.chunk(CHUNK));
        }

        let chunks = futures::stream::unfold(
            (Noise(0x9e37_79b9_7f4a_7c15), TOTAL / CHUNK),
            |(mut noise, left)| async move {
                if left == 0 {
                    return None;
                }
                let frame = Frame::data(noise.chunk(CHUNK));
                Some((Ok::<_, Infallible>(frame), (noise, left - 1)))
            },
        );
        let req = Request::post("/echo")
            .header(header::HOST, format!("{a}.localhost"))
            .body(StreamBody::new(chunks))
            .unwrap();
        let mut client = connect(proxy.addr).await;
        let run = async move {
            let resp = client.send_request(req).await.unwrap();
            assert_eq!(resp.status(), StatusCode::OK);
            let mut body = resp.into_body();
            let (mut got, mut len) = (FNV_START, 0usize);
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame.unwrap().into_data() {
                    got = fnv(got, &data);
                    len += data.len();
                }
            }
            (got, len)
        };
        let (got, len) = tokio::time::timeout(Duration::from_secs(120), run)
            .await
            .expect("the 20 MB echo hung");
        assert_eq!(len, TOTAL);
        assert_eq!(got, expected);
    }

    async fn read_head(stream: &mut TcpStream) -> String {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            let n = stream.read(&mut byte).await.unwrap();
            assert_eq!(
                n,
                1,
                "EOF inside a head: {:?}",
                String::from_utf8_lossy(&head)
            );
            head.push(byte[0]);
        }
        String::from_utf8_lossy(&head).into_owned()
    }

    #[tokio::test]
    async fn http_upgrade_is_spliced() {
        let listener = TcpListener::bind((LOCAL, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (head_tx, head_rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let head = read_head(&mut s).await;
            let _ = head_tx.send(head);
            s.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n",
            )
            .await
            .unwrap();
            let mut buf = [0u8; 4096];
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => {
                        if s.write_all(&buf[..n]).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let proxy = start_proxy(config(), table(&[port], true), Vec::new()).await;

        let run = async {
            let mut client = TcpStream::connect(proxy.addr).await.unwrap();
            let request = format!(
                "GET /ws HTTP/1.1\r\nHost: {port}.localhost\r\nConnection: keep-alive, Upgrade\r\nUpgrade: echo\r\n\r\n"
            );
            client.write_all(request.as_bytes()).await.unwrap();
            let head = read_head(&mut client).await;
            assert!(head.starts_with("HTTP/1.1 101"), "{head}");
            assert!(
                head.to_ascii_lowercase().contains("upgrade: echo"),
                "{head}"
            );

            let upstream_head = head_rx.await.unwrap().to_ascii_lowercase();
            assert!(
                upstream_head.contains("upgrade: echo\r\n"),
                "{upstream_head}"
            );
            assert!(
                upstream_head.contains("connection: upgrade\r\n"),
                "{upstream_head}"
            );

            for message in [&b"hello through the proxy"[..], &[0u8, 1, 2, 255, 254][..]] {
                client.write_all(message).await.unwrap();
                let mut back = vec![0u8; message.len()];
                client.read_exact(&mut back).await.unwrap();
                assert_eq!(back, message);
            }
        };
        tokio::time::timeout(LIMIT, run)
            .await
            .expect("upgrade hung");
    }

    #[tokio::test]
    async fn http_refuse_from_drops_the_connection() {
        let (a, _) = upstream("a").await;
        let cfg = HttpIngressConfig {
            refuse_from: vec![(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 0)), 8)],
            ..config()
        };
        let proxy = start_proxy(cfg, table(&[a], true), Vec::new()).await;
        let run = async {
            let mut s = TcpStream::connect(proxy.addr).await.unwrap();
            let request = format!("GET / HTTP/1.1\r\nHost: {a}.localhost\r\n\r\n");
            // The write may already fail if the reset came first.
            let _ = s.write_all(request.as_bytes()).await;
            let mut buf = [0u8; 64];
            s.read(&mut buf).await
        };
        match tokio::time::timeout(LIMIT, run).await.expect("no EOF") {
            Ok(0) | Err(_) => {}
            Ok(n) => panic!("got {n} bytes from a refused peer"),
        }

        // A network that does not contain the peer lets it through.
        let cfg = HttpIngressConfig {
            refuse_from: vec![(IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 8)],
            ..config()
        };
        let proxy = start_proxy(cfg, table(&[a], true), Vec::new()).await;
        let (status, _, _) = fetch(proxy.addr, get(&format!("{a}.localhost"))).await;
        assert_eq!(status, StatusCode::OK);
    }

    #[test]
    fn http_route_rules() {
        let r = routes(&[("web", 3000), ("api", 4000)]);
        assert_eq!(route(Some("8000.localhost:8080"), &r), Ok(Some(8000)));
        assert_eq!(route(Some("8000"), &r), Ok(Some(8000)));
        assert_eq!(route(Some("web.example.com"), &r), Ok(Some(3000)));
        assert_eq!(route(Some("nothing"), &r), Ok(Some(4000)));
        assert_eq!(route(None, &r), Ok(Some(4000)));
        assert_eq!(route(Some("[::1]:8080"), &r), Ok(Some(4000)));
        assert_eq!(route(Some("10.0.0.1"), &r), Ok(Some(4000)));
        assert_eq!(route(Some("8000.localhost"), &[]), Ok(Some(8000)));
        assert_eq!(route(Some("web.localhost"), &[]), Ok(None));
    }

    #[tokio::test]
    async fn http_a_host_that_is_no_port_is_400() {
        let r = routes(&[("web", 3000)]);
        for host in ["99999.localhost", "0.localhost:8080", "70000"] {
            let message = route(Some(host), &r).unwrap_err();
            assert!(message.contains("not a port"), "{host}: {message}");
        }
        let proxy = start_proxy(config(), table(&[3000], true), r).await;
        let (status, _, body) = fetch(proxy.addr, get("99999.localhost")).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert!(
            body.contains("\"99999\" in the Host is not a port"),
            "{body}"
        );
    }

    #[tokio::test]
    async fn http_a_failed_service_is_503_at_once() {
        let mut r = routes(&[("web", 3000)]);
        r[0].failed = Some("crash loop: exited 5 times within 30 s".into());
        // The inner is running and the port is declared: without the failure
        // the request would wait the whole `wait` for the port.
        let proxy = start_proxy(config(), table(&[], true), r.clone()).await;
        let started = Instant::now();
        for host in ["localhost", "web.localhost", "3000.localhost"] {
            let (status, _, body) = fetch(proxy.addr, get(host)).await;
            assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{host}: {body}");
            assert!(
                body.contains("service web (port 3000) has failed: crash loop"),
                "{body}"
            );
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn http_a_service_failing_ends_a_wait_for_its_port() {
        let r = routes(&[("web", 3000)]);
        let proxy = start_proxy(config(), table(&[], true), r.clone()).await;
        let routes_tx = proxy._routes.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let mut failed = r;
            failed[0].failed = Some("exited (exit code 1); restart policy never".into());
            routes_tx.send_replace(failed);
        });
        let started = Instant::now();
        let (status, _, body) = fetch(proxy.addr, get("web.localhost")).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[test]
    fn http_hop_by_hop() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("proxy-authorization", "Basic x"),
            ("te", "trailers"),
            ("trailer", "x-sum"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("x-kept", "yes"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        let mut plain = h.clone();
        strip_hop_by_hop(&mut plain, false);
        let names: Vec<&str> = plain.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["x-kept"]);

        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert_eq!(h[header::UPGRADE], "websocket");
        assert!(!h.contains_key("x-private"));
        assert!(!h.contains_key("transfer-encoding"));
    }
}
