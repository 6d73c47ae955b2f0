//! API tokens: kept in SQLite as SHA-256 hashes, each with a scope and an
//! optional expiry. A token reads `hull_<id>_<secret>`: the id finds the
//! row, the secret's hash is compared in constant time, so neither a
//! database read nor a timing measurement gives a usable token away.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

pub use hull_proto::{TokenInfo, TokenScope};

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot open the token database {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    #[error("cannot read or write the token database")]
    Db(#[from] rusqlite::Error),
    #[error("cannot draw random bytes for a token: {0}")]
    Random(String),
    #[error("no token {0}")]
    NotFound(String),
}

/// Why a presented token does not let a request through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Refusal {
    /// No token exists at all: the API serves nothing until one is made.
    NoTokens,
    /// No `Authorization: Bearer` header, or not one of ours.
    Missing,
    /// Unknown, revoked or wrong.
    Invalid,
    Expired,
}

/// A token that let a request through: what it grants, and which token
/// it is, so what the request starts can say who started it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub scope: TokenScope,
    pub id: String,
    pub name: Option<String>,
}

impl Grant {
    /// How the token is named where others see it (the session list):
    /// its name, or its id when it has none.
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.id)
    }
}

/// An admin token made outside the VM, of which hulld is given only the
/// id and the SHA-256 of the secret (`api.host_token = "ID:HEX"`, which
/// hull-init takes from the kernel command line): the secret never
/// enters the VM, so nothing in it, the inner included, can present it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostToken {
    pub id: String,
    pub sha256: [u8; 32],
}

/// The name the host's token has in `hull token list` and sessions.
pub const HOST_TOKEN_NAME: &str = "host";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not ID:SHA256 (8 hex digits, a colon, 64 hex digits)")]
pub struct BadHostToken(pub String);

impl std::str::FromStr for HostToken {
    type Err = BadHostToken;
    fn from_str(text: &str) -> Result<Self, BadHostToken> {
        let bad = || BadHostToken(text.to_owned());
        let (id, digest) = text.split_once(':').ok_or_else(bad)?;
        let is_hex = |s: &str| s.bytes().all(|b| b.is_ascii_hexdigit());
        if id.len() != 8 || !is_hex(id) || digest.len() != 64 || !is_hex(digest) {
            return Err(bad());
        }
        let mut sha256 = [0u8; 32];
        for (i, byte) in sha256.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&digest[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(HostToken {
            id: id.to_ascii_lowercase(),
            sha256,
        })
    }
}

/// What a presented token is checked against.
struct TokenRow {
    hash: Vec<u8>,
    scope: String,
    name: Option<String>,
    expires_ms: Option<i64>,
}

/// The token database; cheap to clone, its calls block (run them on a
/// blocking thread).
#[derive(Clone)]
pub struct TokenStore {
    db: Arc<Mutex<Connection>>,
}

use hull_proto::now_ms;

fn hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

fn random_hex(bytes: usize) -> Result<String, TokenError> {
    let mut buf = vec![0u8; bytes];
    getrandom::fill(&mut buf).map_err(|e| TokenError::Random(e.to_string()))?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

impl TokenStore {
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let open = |source| TokenError::Open {
            path: path.to_path_buf(),
            source,
        };
        let db = Connection::open(path).map_err(open)?;
        db.execute_batch(
            "PRAGMA journal_mode=WAL;
             CREATE TABLE IF NOT EXISTS tokens (
                 id TEXT PRIMARY KEY,
                 hash BLOB NOT NULL,
                 scope TEXT NOT NULL,
                 name TEXT,
                 created_ms INTEGER NOT NULL,
                 expires_ms INTEGER
             );",
        )
        .map_err(open)?;
        Ok(TokenStore {
            db: Arc::new(Mutex::new(db)),
        })
    }

    fn db(&self) -> std::sync::MutexGuard<'_, Connection> {
        // Every write is one statement: a panic cannot leave it half done.
        self.db
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Makes a token; the returned string is the only copy of its secret.
    pub fn create(
        &self,
        scope: TokenScope,
        ttl_ms: Option<u64>,
        name: Option<String>,
    ) -> Result<(String, TokenInfo), TokenError> {
        let id = random_hex(4)?;
        let secret = random_hex(24)?;
        let created_ms = now_ms();
        let expires_ms =
            ttl_ms.map(|ttl| created_ms.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)));
        self.db().execute(
            "INSERT INTO tokens (id, hash, scope, name, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![id, hash(&secret), scope.as_str(), name, created_ms, expires_ms],
        )?;
        let info = TokenInfo {
            id: id.clone(),
            scope,
            name,
            created_ms,
            expires_ms,
        };
        Ok((format!("hull_{id}_{secret}"), info))
    }

    /// Makes `host` the one token named "host" (an admin token): the
    /// previous boot's is revoked, so a host token lives as long as the
    /// run that made it.
    pub fn install_host(&self, host: &HostToken) -> Result<(), TokenError> {
        let mut db = self.db();
        let tx = db.transaction()?;
        tx.execute(
            "DELETE FROM tokens WHERE name = ?1 OR id = ?2",
            params![HOST_TOKEN_NAME, host.id],
        )?;
        tx.execute(
            "INSERT INTO tokens (id, hash, scope, name, created_ms, expires_ms) VALUES (?1, ?2, ?3, ?4, ?5, NULL)",
            params![
                host.id,
                host.sha256.to_vec(),
                TokenScope::Admin.as_str(),
                HOST_TOKEN_NAME,
                now_ms()
            ],
        )?;
        tx.commit()?;
        Ok(())
    }

    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let db = self.db();
        let mut stmt = db.prepare(
            "SELECT id, scope, name, created_ms, expires_ms FROM tokens ORDER BY created_ms",
        )?;
        let rows = stmt.query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get(2)?,
                row.get(3)?,
                row.get(4)?,
            ))
        })?;
        let mut out = Vec::new();
        for row in rows {
            let (id, scope, name, created_ms, expires_ms) = row?;
            // A scope this hulld does not know grants nothing: it is
            // shown as the least one.
            let scope = scope.parse().unwrap_or(TokenScope::Read);
            out.push(TokenInfo {
                id,
                scope,
                name,
                created_ms,
                expires_ms,
            });
        }
        Ok(out)
    }

    pub fn revoke(&self, id: &str) -> Result<(), TokenError> {
        match self
            .db()
            .execute("DELETE FROM tokens WHERE id = ?1", [id])?
        {
            0 => Err(TokenError::NotFound(id.to_string())),
            _ => Ok(()),
        }
    }

    /// What `presented` (the whole `hull_<id>_<secret>`) grants, and
    /// which token it is.
    pub fn check(&self, presented: Option<&str>) -> Result<Result<Grant, Refusal>, TokenError> {
        let db = self.db();
        let Some(presented) = presented else {
            let any: Option<i64> = db
                .query_row("SELECT 1 FROM tokens LIMIT 1", [], |r| r.get(0))
                .optional()?;
            return Ok(Err(match any {
                None => Refusal::NoTokens,
                Some(_) => Refusal::Missing,
            }));
        };
        let Some((id, secret)) = presented
            .strip_prefix("hull_")
            .and_then(|rest| rest.split_once('_'))
        else {
            return Ok(Err(Refusal::Invalid));
        };
        let row = db
            .query_row(
                "SELECT hash, scope, name, expires_ms FROM tokens WHERE id = ?1",
                [id],
                |r| {
                    Ok(TokenRow {
                        hash: r.get(0)?,
                        scope: r.get(1)?,
                        name: r.get(2)?,
                        expires_ms: r.get(3)?,
                    })
                },
            )
            .optional()?;
        let Some(TokenRow {
            hash: stored,
            scope,
            name,
            expires_ms,
        }) = row
        else {
            return Ok(Err(Refusal::Invalid));
        };
        if !bool::from(hash(secret).ct_eq(&stored)) {
            return Ok(Err(Refusal::Invalid));
        }
        if expires_ms.is_some_and(|at| at <= now_ms()) {
            return Ok(Err(Refusal::Expired));
        }
        let Ok(scope) = scope.parse() else {
            return Ok(Err(Refusal::Invalid));
        };
        Ok(Ok(Grant {
            scope,
            id: id.to_string(),
            name,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_token_given_as_its_hash_admits_its_secret_and_replaces_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        let secret = "ab".repeat(24);
        let digest: String = Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let host: HostToken = format!("0123abcd:{digest}").parse().unwrap();
        store.install_host(&host).unwrap();
        let bearer = format!("hull_0123abcd_{secret}");
        let grant = store.check(Some(&bearer)).unwrap().unwrap();
        assert_eq!(grant.scope, TokenScope::Admin);
        assert_eq!(grant.label(), HOST_TOKEN_NAME);
        let wrong = format!("hull_0123abcd_{}", "cd".repeat(24));
        assert_eq!(store.check(Some(&wrong)).unwrap(), Err(Refusal::Invalid));
        // The next boot's token revokes this one.
        let next: HostToken = format!("99999999:{digest}").parse().unwrap();
        store.install_host(&next).unwrap();
        assert_eq!(store.check(Some(&bearer)).unwrap(), Err(Refusal::Invalid));
        assert!(store
            .check(Some(&format!("hull_99999999_{secret}")))
            .unwrap()
            .is_ok());
        assert_eq!(store.list().unwrap().len(), 1);
        for bad in [
            "",
            "0123abcd",
            "0123abc:00",
            "0123abcd:zz",
            &format!("x:{digest}"),
        ] {
            assert!(bad.parse::<HostToken>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn tokens_are_checked_by_secret_scope_and_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::open(&dir.path().join("tokens.db")).unwrap();
        assert_eq!(store.check(None).unwrap(), Err(Refusal::NoTokens));
        let (token, info) = store
            .create(TokenScope::Exec, None, Some("ci".into()))
            .unwrap();
        let grant = store.check(Some(&token)).unwrap().unwrap();
        assert_eq!(grant.scope, TokenScope::Exec);
        assert_eq!((grant.id.as_str(), grant.label()), (info.id.as_str(), "ci"));
        assert_eq!(store.check(None).unwrap(), Err(Refusal::Missing));
        // The same id with another secret is refused.
        let forged = format!("hull_{}_{}", info.id, "0".repeat(48));
        assert_eq!(store.check(Some(&forged)).unwrap(), Err(Refusal::Invalid));
        assert_eq!(
            store.check(Some("Bearer x")).unwrap(),
            Err(Refusal::Invalid)
        );
        // Nothing of the secret is stored.
        let secret = token.rsplit('_').next().unwrap();
        for file in std::fs::read_dir(dir.path()).unwrap() {
            let raw = std::fs::read(file.unwrap().path()).unwrap();
            assert!(!raw.windows(secret.len()).any(|w| w == secret.as_bytes()));
        }
        let (unnamed, unnamed_info) = store.create(TokenScope::Read, None, None).unwrap();
        let grant = store.check(Some(&unnamed)).unwrap().unwrap();
        assert_eq!(
            grant.label(),
            unnamed_info.id,
            "an unnamed token goes by its id"
        );
        store.revoke(&unnamed_info.id).unwrap();
        let (expired, _) = store.create(TokenScope::Admin, Some(0), None).unwrap();
        assert_eq!(store.check(Some(&expired)).unwrap(), Err(Refusal::Expired));
        assert_eq!(store.list().unwrap().len(), 2);
        store.revoke(&info.id).unwrap();
        assert_eq!(store.check(Some(&token)).unwrap(), Err(Refusal::Invalid));
        assert!(matches!(
            store.revoke(&info.id),
            Err(TokenError::NotFound(_))
        ));
    }
}
