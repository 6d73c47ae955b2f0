//! `GET /v1/openapi.json`: the OpenAPI 3.1 document of every route, the
//! checked-in api/openapi.json. It is served without a token: it describes
//! the published wire format and nothing of the sandbox, and a client needs
//! it before it has a token to learn how to use one.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;

use crate::error::ApiError;
use crate::response::Body;

/// The document, as checked in.
pub const DOCUMENT: &str = include_str!("../openapi.json");

pub fn serve() -> Result<Response<Body>, ApiError> {
    let mut response = Response::new(Full::new(Bytes::from_static(DOCUMENT.as_bytes())).boxed());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::DOCUMENT;
    use crate::router::ROUTES;

    const METHODS: [&str; 5] = ["get", "put", "post", "delete", "patch"];

    #[test]
    fn the_document_describes_exactly_the_routes_served() {
        let doc: serde_json::Value = serde_json::from_str(DOCUMENT).expect("openapi.json is JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..4]), Some("3.1."));
        let paths = doc["paths"].as_object().expect("openapi.json has paths");
        let documented: BTreeSet<(String, String)> = paths
            .iter()
            .flat_map(|(path, item)| {
                METHODS
                    .iter()
                    .filter(|m| item.get(**m).is_some())
                    .map(move |m| (m.to_uppercase(), path.clone()))
            })
            .collect();
        let served: BTreeSet<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_string(), r.path.to_string()))
            .collect();
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let not_served: Vec<_> = documented.difference(&served).collect();
        assert!(
            undocumented.is_empty() && not_served.is_empty(),
            "routes served but not in api/openapi.json: {undocumented:?}; \
             in api/openapi.json but not served: {not_served:?}"
        );
        // A route that needs a token says so, and one that does not, not.
        for route in ROUTES {
            let op = &paths[route.path][route.method.to_lowercase()];
            let secured = op
                .get("security")
                .is_none_or(|s| s.as_array().is_some_and(|a| !a.is_empty()));
            assert_eq!(
                secured,
                route.scope.is_some(),
                "{} {}: its security in openapi.json disagrees with the router",
                route.method,
                route.path
            );
            if let Some(scope) = route.scope {
                let says = op["x-hull-scope"].as_str();
                assert_eq!(
                    says,
                    Some(scope.as_str()),
                    "{} {}: x-hull-scope",
                    route.method,
                    route.path
                );
            }
        }
    }
}
