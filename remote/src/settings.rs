//! The `[remote]` settings and the object store they name.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use object_store::aws::AmazonS3Builder;
use object_store::local::LocalFileSystem;
use object_store::ObjectStore;
use serde::{Deserialize, Serialize};

use crate::chunker::ChunkSizes;
use crate::error::{RemoteError, Result};

/// `[remote]` in hull.toml.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteSettings {
    /// `s3://BUCKET/PREFIX`, or `file:///DIR` for a directory (a mounted
    /// share, or tests).
    pub url: String,
    /// The S3 endpoint (`http://127.0.0.1:3900`); AWS's when unset.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// A TOML file with `access_key_id` and `secret_access_key`, mode
    /// 0600; when unset, the AWS_* environment variables.
    pub credentials_file: Option<PathBuf>,
    /// The key file, made at the first push; never stored in the bucket.
    pub key_file: PathBuf,
    /// Chunk uploads or downloads in flight at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Bytes per second a push reads of its stream, at most; `None`: no
    /// limit. Uploads follow the stream, so this bounds them too.
    #[serde(default)]
    pub bandwidth_limit: Option<u64>,
    #[serde(default)]
    pub chunk_sizes: ChunkSizes,
}

fn default_concurrency() -> usize {
    8
}

impl RemoteSettings {
    pub fn new(url: impl Into<String>, key_file: impl Into<PathBuf>) -> Self {
        RemoteSettings {
            url: url.into(),
            endpoint: None,
            region: None,
            credentials_file: None,
            key_file: key_file.into(),
            concurrency: default_concurrency(),
            bandwidth_limit: None,
            chunk_sizes: ChunkSizes::default(),
        }
    }

    /// What the settings get wrong without touching the store: a
    /// concurrency or bandwidth of 0, chunk sizes out of order.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.concurrency == 0 {
            return Err("concurrency = 0: it must be at least 1".into());
        }
        if self.bandwidth_limit == Some(0) {
            return Err("bandwidth_limit = 0: leave it out for no limit".into());
        }
        self.chunk_sizes.validate()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Credentials {
    access_key_id: String,
    secret_access_key: String,
    session_token: Option<String>,
}

fn load_credentials(path: &Path) -> Result<Credentials> {
    let read_err = |source| RemoteError::CredentialsRead {
        path: path.to_path_buf(),
        source,
    };
    let mode = std::fs::metadata(path).map_err(read_err)?.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(RemoteError::CredentialsMode {
            path: path.to_path_buf(),
            mode,
        });
    }
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    toml::from_str(&text).map_err(|source| RemoteError::CredentialsParse {
        path: path.to_path_buf(),
        source,
    })
}

/// The store the settings name and the prefix of hull's objects in it
/// (no leading or trailing slash; empty for the root). Blocking (reads
/// the credentials file).
pub(crate) fn open_store(settings: &RemoteSettings) -> Result<(Arc<dyn ObjectStore>, String)> {
    let url = settings.url.as_str();
    let bad_url = || RemoteError::Url {
        url: url.to_string(),
    };
    let setup_err = |source| RemoteError::StoreSetup {
        url: url.to_string(),
        source,
    };
    if let Some(dir) = url.strip_prefix("file://") {
        if !dir.starts_with('/') {
            return Err(bad_url());
        }
        std::fs::create_dir_all(dir).map_err(|e| {
            setup_err(object_store::Error::Generic {
                store: "LocalFileSystem",
                source: Box::new(e),
            })
        })?;
        let store = LocalFileSystem::new_with_prefix(dir).map_err(setup_err)?;
        return Ok((Arc::new(store), String::new()));
    }
    let rest = url.strip_prefix("s3://").ok_or_else(bad_url)?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(bad_url());
    }
    let prefix = prefix.trim_matches('/').to_string();
    // reqwest is built without a default TLS provider (aws-lc-rs would
    // come with it); ring is the one the rest of the tree uses. Installing
    // fails only when a provider is in place already, which is as good.
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A few quick retries of a request, not object_store's three minutes:
    // hulld's pusher retries the whole push with its own backoff, and a
    // checkpoint should show a push failing while the endpoint is down.
    let retry = object_store::RetryConfig {
        max_retries: 3,
        retry_timeout: std::time::Duration::from_secs(30),
        ..object_store::RetryConfig::default()
    };
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_retry(retry);
    if let Some(path) = &settings.credentials_file {
        let creds = load_credentials(path)?;
        builder = builder
            .with_access_key_id(creds.access_key_id)
            .with_secret_access_key(creds.secret_access_key);
        if let Some(token) = creds.session_token {
            builder = builder.with_token(token);
        }
    }
    if let Some(endpoint) = &settings.endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(region) = &settings.region {
        builder = builder.with_region(region);
    }
    let store = builder.build().map_err(setup_err)?;
    Ok((Arc::new(store), prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_remote_section_parses_with_defaults() {
        let settings: RemoteSettings = toml::from_str(
            r#"
            url = "s3://bucket/some/prefix"
            endpoint = "http://127.0.0.1:3900"
            region = "garage"
            credentials_file = "/etc/hull/remote.toml"
            key_file = "/etc/hull/remote.key"
            "#,
        )
        .unwrap();
        assert_eq!(settings.concurrency, 8);
        assert_eq!(settings.chunk_sizes, ChunkSizes::default());
        assert_eq!(settings.key_file, PathBuf::from("/etc/hull/remote.key"));
        let unknown =
            toml::from_str::<RemoteSettings>("url = \"s3://b\"\nkey_file = \"k\"\nkye = 1");
        assert!(unknown.is_err());
    }

    #[test]
    fn a_bad_url_or_readable_credentials_are_refused_by_name() {
        for url in ["http://bucket/x", "s3:///prefix", "file://relative/dir"] {
            let err = open_store(&RemoteSettings::new(url, "/k")).unwrap_err();
            assert!(matches!(err, RemoteError::Url { .. }), "{url}: {err}");
            assert!(err.to_string().contains(url), "{err}");
        }
        let dir = tempfile::tempdir().unwrap();
        let creds = dir.path().join("remote.toml");
        std::fs::write(&creds, "access_key_id = \"a\"\nsecret_access_key = \"b\"\n").unwrap();
        std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o640))
            .unwrap();
        let settings = RemoteSettings {
            credentials_file: Some(creds.clone()),
            ..RemoteSettings::new("s3://bucket/p", "/k")
        };
        let err = open_store(&settings).unwrap_err();
        assert!(
            matches!(err, RemoteError::CredentialsMode { mode: 0o640, .. }),
            "{err}"
        );
        std::fs::set_permissions(&creds, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
        let (_, prefix) = open_store(&settings).unwrap();
        assert_eq!(prefix, "p");
    }
}
