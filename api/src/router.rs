//! Routes: the method and path of a request to the handler that answers
//! it, after its token is checked against the scope the route needs.
//! Handlers are a few lines over the control protocol.

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};

use crate::error::ApiError;
use crate::tokens::{Refusal, TokenScope};
use crate::{control, exec, sprites, Shared, SPRITE_VERSION};

pub type Body = Full<Bytes>;

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
    let ["v1", "sprites", rest @ ..] = segments.as_slice() else {
        return Err(ApiError::not_found(format!("no route {path}")));
    };
    let needed = match method {
        Method::GET | Method::HEAD => TokenScope::Read,
        _ => TokenScope::Admin,
    };
    let needed = match rest {
        [_, "exec" | "control", ..] => TokenScope::Exec,
        _ => needed,
    };
    authorize(state, &req, needed).await?;
    match (&method, rest) {
        (&Method::GET, []) => sprites::list(state).await,
        (&Method::POST, []) => sprites::create(state, req).await,
        (_, []) => Err(ApiError::method_not_allowed(&method, &path)),
        (_, [_, ..]) => match (&method, sandbox_path(state, rest)?) {
            (&Method::GET, []) => sprites::get(state).await,
            (&Method::GET, ["exec"]) => exec::serve(state, req).await,
            (&Method::GET, ["control"]) => control::serve(state, req).await,
            (_, []) => Err(ApiError::method_not_allowed(&method, &path)),
            _ => Err(ApiError::not_found(format!("no route {path}"))),
        },
    }
}

/// Checks the request's bearer token grants `needed`.
async fn authorize(
    state: &Shared,
    req: &Request<Incoming>,
    needed: TokenScope,
) -> Result<TokenScope, ApiError> {
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
    if granted < needed {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("this request needs a token with scope {needed}; this one has {granted}"),
        ));
    }
    Ok(granted)
}

pub fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
