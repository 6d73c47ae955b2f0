//! API errors as JSON bodies with stable codes: `{"error": CODE,
//! "message": TEXT}`, the shape the Sprites SDKs parse.

use hyper::{Response, StatusCode};

/// An error answered to a client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable, for scripts: `no_tokens`, `unauthorized`, `not_found`, ...
    pub code: &'static str,
    pub message: String,
    /// The errno name of a files API error (`ENOENT`, `EISDIR`, ...),
    /// answered as `"code"`, which the Sprites SDKs map to exceptions.
    pub errno: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            errno: None,
        }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn method_not_allowed(method: &hyper::Method, path: &str) -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            format!("{method} is not served on {path}"),
        )
    }

    /// hulld's own answer to a request it could not carry out.
    pub fn daemon(e: hull_client::ClientError) -> Self {
        use hull_client::ClientError;
        use hull_proto::ErrorKind;
        match &e {
            ClientError::Daemon(hull_proto::ErrorReport {
                kind: ErrorKind::File(errno),
                message,
            }) => {
                let failure = hull_proto::files::Failure::of(Some(*errno));
                let mut error = Self::new(
                    crate::files::failure_status(failure.code),
                    failure.code,
                    message.clone(),
                );
                error.errno = Some(failure.errno);
                error
            }
            ClientError::Daemon(report) => {
                let (status, code) = match report.kind {
                    ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                    ErrorKind::BadRequest => (StatusCode::BAD_REQUEST, "bad_request"),
                    ErrorKind::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
                    ErrorKind::InnerUnavailable => {
                        (StatusCode::SERVICE_UNAVAILABLE, "sandbox_unavailable")
                    }
                    ErrorKind::Service => (StatusCode::UNPROCESSABLE_ENTITY, "service_refused"),
                    ErrorKind::NotRunning => (StatusCode::CONFLICT, "not_running"),
                    ErrorKind::Spawn(_) => (StatusCode::UNPROCESSABLE_ENTITY, "spawn_failed"),
                    ErrorKind::Storage => (StatusCode::INSUFFICIENT_STORAGE, "storage"),
                    _ => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
                };
                Self::new(status, code, report.message.clone())
            }
            _ => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                hull_proto::error_chain(&e),
            ),
        }
    }

    pub fn into_response(self) -> Response<crate::response::Body> {
        let mut body = serde_json::json!({ "error": self.code, "message": self.message });
        if let Some(errno) = self.errno {
            body["code"] = errno.into();
        }
        crate::response::json_response(self.status, &body)
    }
}
