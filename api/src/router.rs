//! Routes: the method and path of a request to the handler that answers
//! it, after its token is checked against the scope the route needs.
//! Handlers are a few lines over the control protocol.

use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION};
use hyper::{Method, Request, Response, StatusCode};

use crate::error::ApiError;
use crate::response::Body;
use crate::tokens::{Grant, Refusal, TokenScope};
use crate::{
    checkpoints, control, exec, files, openapi, policy, proxy, services, sessions, sprites, tunnel,
    Shared, SPRITE_VERSION,
};

/// One route: its method, its path (`{x}` stands for one segment) and the
/// token scope it needs (`None`: served without a token).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub method: &'static str,
    pub path: &'static str,
    pub scope: Option<TokenScope>,
}

const fn r(method: &'static str, path: &'static str, scope: Option<TokenScope>) -> Route {
    Route {
        method,
        path,
        scope,
    }
}

const READ: Option<TokenScope> = Some(TokenScope::Read);
const EXEC: Option<TokenScope> = Some(TokenScope::Exec);
const ADMIN: Option<TokenScope> = Some(TokenScope::Admin);

/// Every route served. The scope checked on a request comes from here,
/// and a test holds it and api/openapi.json to the same paths and methods.
pub const ROUTES: &[Route] = &[
    r("GET", "/v1/openapi.json", None),
    r("GET", "/v1/sprites", READ),
    r("POST", "/v1/sprites", ADMIN),
    r("GET", "/v1/sprites/{name}", READ),
    r("GET", "/v1/sprites/{name}/hull", READ),
    // Sessions without an upgrade; a command over a WebSocket with one,
    // which needs an exec token (checked in the match below).
    r("GET", "/v1/sprites/{name}/exec", READ),
    r("GET", "/v1/sprites/{name}/control", EXEC),
    r("GET", "/v1/sprites/{name}/proxy", EXEC),
    r("POST", "/v1/sprites/{name}/checkpoint", ADMIN),
    r("GET", "/v1/sprites/{name}/checkpoints", READ),
    r("GET", "/v1/sprites/{name}/checkpoints/{id}", READ),
    r("DELETE", "/v1/sprites/{name}/checkpoints/{id}", ADMIN),
    r("POST", "/v1/sprites/{name}/checkpoints/{id}/restore", ADMIN),
    // The scope of create: a push is hull making a copy of a checkpoint.
    r("POST", "/v1/sprites/{name}/checkpoints/{id}/push", ADMIN),
    r("GET", "/v1/sprites/{name}/services", READ),
    r("POST", "/v1/sprites/{name}/services/signal", ADMIN),
    r("GET", "/v1/sprites/{name}/services/{service}", READ),
    r("PUT", "/v1/sprites/{name}/services/{service}", ADMIN),
    r("DELETE", "/v1/sprites/{name}/services/{service}", ADMIN),
    r("POST", "/v1/sprites/{name}/services/{service}/start", ADMIN),
    r("POST", "/v1/sprites/{name}/services/{service}/stop", ADMIN),
    // Attaching, even only to watch, shows what the program printed.
    r("GET", "/v1/sprites/{name}/exec/{id}", EXEC),
    r("POST", "/v1/sprites/{name}/exec/{id}/kill", EXEC),
    r("GET", "/v1/sprites/{name}/policy/network", READ),
    r("POST", "/v1/sprites/{name}/policy/network", ADMIN),
    // A file's contents need exec; its name, size and mode are a list.
    r("GET", "/v1/sprites/{name}/fs/read", EXEC),
    r("PUT", "/v1/sprites/{name}/fs/write", EXEC),
    r("GET", "/v1/sprites/{name}/fs/list", READ),
    r("GET", "/v1/sprites/{name}/fs/stat", READ),
    r("DELETE", "/v1/sprites/{name}/fs/delete", EXEC),
    r("POST", "/v1/sprites/{name}/fs/rename", EXEC),
    r("POST", "/v1/sprites/{name}/fs/copy", EXEC),
    r("POST", "/v1/sprites/{name}/fs/chmod", EXEC),
    r("GET", "/v1/sprites/{name}/fs/watch", READ),
];

/// The route `method` and `segments` reach: `Err(true)` when the path is
/// served with other methods only, `Err(false)` when it is not served.
fn find_route(method: &Method, segments: &[&str]) -> Result<&'static Route, bool> {
    let mut path_known = false;
    // A literal segment beats `{x}`: `services/signal` is not a service.
    let mut best: Option<(&'static Route, usize)> = None;
    for route in ROUTES {
        let template: Vec<&str> = route.path.split('/').filter(|s| !s.is_empty()).collect();
        let fits = template.len() == segments.len()
            && template
                .iter()
                .zip(segments)
                .all(|(t, s)| t.starts_with('{') || t == s);
        if !fits {
            continue;
        }
        path_known = true;
        let literals = template.iter().filter(|t| !t.starts_with('{')).count();
        if route.method == method.as_str() && best.is_none_or(|(_, l)| literals > l) {
            best = Some((route, literals));
        }
    }
    best.map(|(route, _)| route).ok_or(path_known)
}

/// Answers one request; every response carries `Sprite-Version`.
pub async fn handle(state: Shared, req: Request<Incoming>) -> Response<Body> {
    let mut response = match route(&state, req).await {
        Ok(response) => response,
        Err(e) => e.into_response(),
    };
    response
        .headers_mut()
        .insert("sprite-version", HeaderValue::from_static(SPRITE_VERSION));
    response
}

/// The path's segments after `/v1/sprites/{name}`, once the name is
/// checked to be this sandbox's.
fn sandbox_path<'a>(state: &Shared, segments: &'a [&'a str]) -> Result<&'a [&'a str], ApiError> {
    match segments {
        [name, rest @ ..] if *name == state.settings.sandbox_name => Ok(rest),
        [name, ..] => Err(ApiError::not_found(format!(
            "no sprite {name:?}: this server hosts one sandbox, {:?}",
            state.settings.sandbox_name
        ))),
        [] => Ok(&[]),
    }
}

async fn route(state: &Shared, req: Request<Incoming>) -> Result<Response<Body>, ApiError> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path
        .trim_matches('/')
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let method = req.method().clone();
    let route = match find_route(&method, &segments) {
        Ok(route) => route,
        Err(true) => return Err(ApiError::method_not_allowed(&method, &path)),
        Err(false) => return Err(ApiError::not_found(format!("no route {path}"))),
    };
    let grant = match route.scope {
        Some(needed) => Some(authorize(state, &req, needed).await?),
        None => None,
    };
    // What the request opens to hulld is opened with its token's scope
    // and label (`State::open`): hulld decides what it may do, and a
    // session it starts says which token started it.
    let for_token;
    let state = match &grant {
        Some(grant) => {
            for_token = state.for_token(grant);
            &for_token
        }
        None => state,
    };
    let granted = state.granted();
    let ["v1", "sprites", rest @ ..] = segments.as_slice() else {
        return openapi::serve();
    };
    match (&method, rest) {
        (&Method::GET, []) => sprites::list(state).await,
        (&Method::POST, []) => sprites::create(state, req).await,
        (_, []) => Err(ApiError::method_not_allowed(&method, &path)),
        (_, [_, ..]) => match (&method, sandbox_path(state, rest)?) {
            (&Method::GET, []) => sprites::get(state).await,
            // Each request through the tunnel is checked by hulld against
            // the token's scope, so reading is enough to open it.
            (&Method::GET, ["hull"]) => tunnel::serve(state, req).await,
            // A command (an upgrade, or a `cmd` asked for without one,
            // which is then told it needs a WebSocket) needs exec.
            (&Method::GET, ["exec"]) if crate::ws::is_upgrade(&req) || asks_command(&req) => {
                require(granted, TokenScope::Exec)?;
                exec::serve(state, req).await
            }
            (&Method::GET, ["control"]) => control::serve(state, req).await,
            (&Method::GET, ["proxy"]) => proxy::serve(state, req).await,
            (_, []) => Err(ApiError::method_not_allowed(&method, &path)),
            (&Method::POST, ["checkpoint"]) => checkpoints::create(state, req).await,
            (&Method::GET, ["checkpoints"]) => checkpoints::list(state, &req).await,
            (&Method::GET, ["checkpoints", id]) => checkpoints::get(state, id).await,
            (&Method::DELETE, ["checkpoints", id]) => checkpoints::delete(state, id).await,
            (&Method::POST, ["checkpoints", id, "push"]) => checkpoints::push(state, id).await,
            (&Method::POST, ["checkpoints", id, "restore"]) => {
                checkpoints::restore(state, id).await
            }
            (&Method::GET, ["services"]) => services::list(state).await,
            (&Method::POST, ["services", "signal"]) => services::signal(state, req).await,
            (&Method::GET, ["services", svc]) => services::get(state, svc).await,
            (&Method::PUT, ["services", svc]) => services::put(state, svc, req).await,
            (&Method::DELETE, ["services", svc]) => services::delete(state, svc).await,
            (&Method::POST, ["services", svc, "start"]) => services::start(state, svc, &req).await,
            (&Method::POST, ["services", svc, "stop"]) => services::stop(state, svc, &req).await,
            (&Method::GET, ["exec"]) => sessions::list(state).await,
            (&Method::GET, ["exec", id]) => {
                let watch = exec::watch_only(&req)?;
                exec::attach(state, req, id, watch).await
            }
            (&Method::POST, ["exec", id, "kill"]) => sessions::kill(state, id, req).await,
            (&Method::GET, ["policy", "network"]) => policy::get(state).await,
            (&Method::POST, ["policy", "network"]) => policy::set(state, req).await,
            (_, ["fs", op]) => files::route(state, req, op).await,
            _ => Err(ApiError::not_found(format!("no route {path}"))),
        },
    }
}

/// Checks the request's bearer token grants `needed`; the token.
async fn authorize(
    state: &Shared,
    req: &Request<Incoming>,
    needed: TokenScope,
) -> Result<Grant, ApiError> {
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_string());
    let tokens = state.tokens.clone();
    let checked = tokio::task::spawn_blocking(move || tokens.check(presented.as_deref()))
        .await
        .map_err(|e| ApiError::internal(format!("the token check failed: {e}")))?
        .map_err(|e| ApiError::internal(hull_proto::error_chain(&e)))?;
    let granted = checked.map_err(|refusal| {
        let (code, message) = match refusal {
            Refusal::NoTokens => (
                "no_tokens",
                "the API has no tokens yet, so it serves no request: make one inside the VM with `hull token create --scope exec`",
            ),
            Refusal::Missing => ("missing_token", "send a token: Authorization: Bearer hull_..."),
            Refusal::Invalid => ("invalid_token", "the token is not valid (unknown, revoked or mistyped)"),
            Refusal::Expired => ("token_expired", "the token has expired: make a new one with `hull token create`"),
        };
        ApiError::new(StatusCode::UNAUTHORIZED, code, message)
    })?;
    // A valid token, whatever its scope: the connection is no longer
    // anonymous (no short deadline, never shed).
    if let Some(slot) = crate::slots::ConnectionSlot::of(req) {
        slot.authenticated();
    }
    require(Some(granted.scope), needed)?;
    Ok(granted)
}

/// Whether a request names a command to run (`?cmd=`).
fn asks_command<B>(req: &Request<B>) -> bool {
    req.uri()
        .query()
        .is_some_and(|q| q.split('&').any(|pair| pair.starts_with("cmd=")))
}

/// Checks a scope already granted covers `needed`: for a route whose need
/// depends on more than its method and path.
fn require(granted: Option<TokenScope>, needed: TokenScope) -> Result<(), ApiError> {
    match granted {
        Some(granted) if granted >= needed => Ok(()),
        Some(granted) => Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("this request needs a token with scope {needed}; this one has {granted}"),
        )),
        None => Err(ApiError::internal(
            "a route that needs a token was served without one",
        )),
    }
}

#[cfg(test)]
mod tests {
    use std::future::Future;
    use std::net::SocketAddr;
    use std::pin::Pin;
    use std::sync::{Arc, Mutex};

    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::ROUTES;
    use crate::{Api, ApiSettings, Connector, TokenScope, TokenStore};

    /// A connector that records the scope of every connection a handler
    /// opens to hulld, and opens none.
    #[derive(Default)]
    struct Recorder {
        opened: Mutex<Vec<TokenScope>>,
    }

    impl Connector for Recorder {
        fn open_as(
            &self,
            scope: TokenScope,
            _started_by: &str,
        ) -> std::io::Result<tokio::io::DuplexStream> {
            self.opened
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(scope);
            Err(std::io::Error::new(
                std::io::ErrorKind::NotConnected,
                "no hulld in this test",
            ))
        }

        fn dial(
            &self,
            _target: SocketAddr,
        ) -> Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>> {
            Box::pin(async { Err(std::io::ErrorKind::NotConnected.into()) })
        }
    }

    /// Sends one request and reads the answer to its end.
    async fn send(addr: SocketAddr, method: &str, path: &str, token: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
        let body = "{}";
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
             Authorization: Bearer {token}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(head.as_bytes()).await.unwrap();
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await.unwrap();
        String::from_utf8_lossy(&answer)
            .lines()
            .next()
            .unwrap_or("")
            .to_string()
    }

    /// Every connection a route opens to hulld is opened with the scope
    /// of the token that made the request, never a broader one, so that
    /// hulld's own check of each request is the one that decides.
    #[tokio::test]
    async fn every_route_reaches_hulld_with_its_tokens_scope_only() {
        let dir = tempfile::tempdir().unwrap();
        let tokens = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let recorder = Arc::new(Recorder::default());
        let settings = ApiSettings {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            sandbox_name: "box".into(),
            max_connections: 64,
            max_connections_per_source: 64,
            anonymous_header_timeout: std::time::Duration::from_secs(5),
            vsock_port: None,
            tls: None,
            host_token: None,
        };
        let api = Api::start(settings, recorder.clone(), tokens.clone())
            .await
            .unwrap();
        let addr = api.local_addr().unwrap();
        let mut reached = 0;
        for scope in [TokenScope::Read, TokenScope::Exec, TokenScope::Admin] {
            let (token, _) = tokens.create(scope, None, None).unwrap();
            for route in ROUTES
                .iter()
                .filter(|r| r.scope.is_some_and(|s| s <= scope))
            {
                let path = route
                    .path
                    .replace("{name}", "box")
                    .replace("{id}", "v1")
                    .replace("{service}", "web");
                let status = send(addr, route.method, &path, &token).await;
                let opened =
                    std::mem::take(&mut *recorder.opened.lock().unwrap_or_else(|p| p.into_inner()));
                assert!(
                    opened.iter().all(|&o| o == scope),
                    "{} {} with a {scope} token ({status}) reached hulld as {opened:?}",
                    route.method,
                    route.path
                );
                reached += usize::from(!opened.is_empty());
            }
        }
        // Enough routes reached hulld for the check above to mean something.
        assert!(reached >= 20, "only {reached} requests reached hulld");
    }
}
