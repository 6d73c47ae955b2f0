//! Request bodies: read up to a cap, so a client cannot make hulld hold
//! more than the route needs.

use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::{Request, StatusCode};

use crate::error::ApiError;

/// The whole body, refused past `max` bytes.
pub async fn read(req: Request<Incoming>, max: usize) -> Result<bytes::Bytes, ApiError> {
    match Limited::new(req.into_body(), max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
            format!("the request body is over {max} bytes"),
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "cannot read the request body: {e}"
        ))),
    }
}

/// The body as a JSON object (an empty body is an empty object).
pub async fn read_json(
    req: Request<Incoming>,
    max: usize,
) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    let bytes = read(req, max).await?;
    if bytes.is_empty() {
        return Ok(serde_json::Map::new());
    }
    match serde_json::from_slice(&bytes) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err(ApiError::bad_request("the body must be a JSON object")),
        Err(e) => Err(ApiError::bad_request(format!(
            "the body is not valid JSON: {e}"
        ))),
    }
}

/// The body as `T`, whose serde attributes refuse unknown fields (an empty
/// body is `{}`).
pub async fn read_as<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
    max: usize,
) -> Result<T, ApiError> {
    let bytes = read(req, max).await?;
    let bytes: &[u8] = if bytes.is_empty() { b"{}" } else { &bytes };
    serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not valid: {e}")))
}
