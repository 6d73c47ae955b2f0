//! The service registry: what the user registered to run in the inner after
//! every start (boot, bounce, restore), persisted in SQLite, validated at
//! `add`, and ordered by `--after`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use rusqlite::{params, Connection, OptionalExtension};

pub use hull_proto::{RestartPolicy, ServiceSpec};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("service name {0:?} is not valid: use {rule}; \"exec\" and \"hulld\" are reserved", rule = hull_proto::NAME_RULE)]
    Name(String),
    #[error("service {0}: the command is empty")]
    EmptyCommand(String),
    #[error("a service named {0} is already registered; remove it first")]
    Duplicate(String),
    #[error("service {name}: --after {after}: no such service")]
    UnknownAfter { name: String, after: String },
    #[error("service {name}: --after makes a cycle: {cycle}")]
    Cycle { name: String, cycle: String },
    #[error("no service named {0}")]
    NotFound(String),
    #[error("service {0} is not running, so it cannot be signalled")]
    NotRunning(String),
    #[error("the service manager is not running (hulld is shutting down)")]
    ManagerGone,
    #[error("service {name}: {max} services are registered, the most hulld keeps (daemon.max_services); remove one first")]
    TooMany { name: String, max: usize },
    #[error("cannot remove {name}: {dependents} must start after it; remove those first")]
    HasDependents { name: String, dependents: String },
    #[error("service registry {path}")]
    Db {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("service definitions are not valid JSON")]
    Json(#[from] serde_json::Error),
}

type Result<T> = std::result::Result<T, ServiceError>;

/// Names that are not free for services: they are the log sources of
/// non-interactive execs and of hulld itself.
pub const RESERVED_NAMES: [&str; 2] = ["exec", "hulld"];

fn valid_name(name: &str) -> bool {
    if RESERVED_NAMES.contains(&name) {
        return false;
    }
    hull_proto::valid_name(name)
}

/// Checks `new` against the services already registered.
pub fn validate(existing: &[ServiceSpec], new: &ServiceSpec) -> Result<()> {
    if !valid_name(&new.name) {
        return Err(ServiceError::Name(new.name.clone()));
    }
    if new.cmd.trim().is_empty() {
        return Err(ServiceError::EmptyCommand(new.name.clone()));
    }
    if existing.iter().any(|s| s.name == new.name) {
        return Err(ServiceError::Duplicate(new.name.clone()));
    }
    for after in &new.after {
        if after == &new.name {
            return Err(ServiceError::Cycle {
                name: new.name.clone(),
                cycle: format!("{0} -> {0}", new.name),
            });
        }
        if !existing.iter().any(|s| &s.name == after) {
            return Err(ServiceError::UnknownAfter {
                name: new.name.clone(),
                after: after.clone(),
            });
        }
    }
    // Every --after names an existing service, and existing ones only name
    // each other, so a new service cannot close a cycle; check anyway, for
    // sets that arrive whole (a restore).
    let mut all = existing.to_vec();
    all.push(new.clone());
    start_order(&all).map(|_| ())
}

/// The services in an order where each comes after everything it waits for.
pub fn start_order(specs: &[ServiceSpec]) -> Result<Vec<String>> {
    let mut waiting: BTreeMap<&str, BTreeSet<&str>> = specs
        .iter()
        .map(|s| {
            (
                s.name.as_str(),
                s.after.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    let mut order = Vec::new();
    while !waiting.is_empty() {
        let ready: Vec<&str> = waiting
            .iter()
            .filter(|(_, deps)| deps.iter().all(|d| !waiting.contains_key(d)))
            .map(|(n, _)| *n)
            .collect();
        if ready.is_empty() {
            let stuck: Vec<&str> = waiting.keys().copied().collect();
            return Err(ServiceError::Cycle {
                name: stuck[0].to_string(),
                cycle: stuck.join(", "),
            });
        }
        for name in ready {
            waiting.remove(name);
            order.push(name.to_string());
        }
    }
    Ok(order)
}

/// Services a registry holds by default: each is a process in the inner
/// and a log source and a task in hulld, so their count is bounded.
pub const MAX_SERVICES: usize = 256;

/// The registry in SQLite (its own file beside the checkpoint catalog).
pub struct Registry {
    path: PathBuf,
    conn: Connection,
    max: usize,
}

impl Registry {
    pub fn open(path: &Path) -> Result<Self> {
        let db = |source| ServiceError::Db {
            path: path.to_path_buf(),
            source,
        };
        let conn = Connection::open(path).map_err(db)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(db)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(db)?;
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(db)?;
        if version < 1 {
            conn.execute_batch(
                "CREATE TABLE services (name TEXT PRIMARY KEY, seq INTEGER NOT NULL, spec TEXT NOT NULL);
                 PRAGMA user_version = 1;",
            )
            .map_err(db)?;
        }
        Ok(Registry {
            path: path.to_path_buf(),
            conn,
            max: MAX_SERVICES,
        })
    }

    /// At most `max` services; an add past it is refused.
    pub fn with_max(self, max: usize) -> Self {
        Registry { max, ..self }
    }

    fn db(&self) -> impl Fn(rusqlite::Error) -> ServiceError + '_ {
        move |source| ServiceError::Db {
            path: self.path.clone(),
            source,
        }
    }

    /// All services, in the order they were added.
    pub fn list(&self) -> Result<Vec<ServiceSpec>> {
        let mut stmt = self
            .conn
            .prepare("SELECT spec FROM services ORDER BY seq")
            .map_err(self.db())?;
        let texts: Vec<String> = stmt
            .query_map([], |r| r.get(0))
            .map_err(self.db())?
            .collect::<std::result::Result<_, _>>()
            .map_err(self.db())?;
        texts
            .iter()
            .map(|t| serde_json::from_str(t).map_err(ServiceError::from))
            .collect()
    }

    pub fn get(&self, name: &str) -> Result<ServiceSpec> {
        let text: Option<String> = self
            .conn
            .query_row("SELECT spec FROM services WHERE name = ?1", [name], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.db())?;
        match text {
            Some(t) => Ok(serde_json::from_str(&t)?),
            None => Err(ServiceError::NotFound(name.to_string())),
        }
    }

    /// Validates and stores `spec`; nothing is stored when it is refused.
    pub fn add(&self, spec: &ServiceSpec) -> Result<()> {
        let existing = self.list()?;
        validate(&existing, spec)?;
        if existing.len() >= self.max {
            return Err(ServiceError::TooMany {
                name: spec.name.clone(),
                max: self.max,
            });
        }
        let seq: i64 = self
            .conn
            .query_row("SELECT COALESCE(MAX(seq), 0) + 1 FROM services", [], |r| {
                r.get(0)
            })
            .map_err(self.db())?;
        self.conn
            .execute(
                "INSERT INTO services (name, seq, spec) VALUES (?1, ?2, ?3)",
                params![spec.name, seq, serde_json::to_string(spec)?],
            )
            .map_err(self.db())?;
        Ok(())
    }

    pub fn remove(&self, name: &str) -> Result<()> {
        let all = self.list()?;
        if !all.iter().any(|s| s.name == name) {
            return Err(ServiceError::NotFound(name.to_string()));
        }
        let dependents: Vec<&str> = all
            .iter()
            .filter(|s| s.after.iter().any(|a| a == name))
            .map(|s| s.name.as_str())
            .collect();
        if !dependents.is_empty() {
            return Err(ServiceError::HasDependents {
                name: name.to_string(),
                dependents: dependents.join(", "),
            });
        }
        self.conn
            .execute("DELETE FROM services WHERE name = ?1", [name])
            .map_err(self.db())?;
        Ok(())
    }

    /// The whole registry as JSON, as a checkpoint records it.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.list()?)?)
    }

    /// Replaces every definition with those recorded in `json` (a restore).
    pub fn replace_all(&mut self, json: &str) -> Result<()> {
        let specs: Vec<ServiceSpec> = serde_json::from_str(json)?;
        start_order(&specs)?;
        let path = self.path.clone();
        let db = |source| ServiceError::Db {
            path: path.clone(),
            source,
        };
        let tx = self.conn.transaction().map_err(db)?;
        tx.execute("DELETE FROM services", []).map_err(db)?;
        for (i, spec) in specs.iter().enumerate() {
            tx.execute(
                "INSERT INTO services (name, seq, spec) VALUES (?1, ?2, ?3)",
                params![spec.name, i as i64 + 1, serde_json::to_string(spec)?],
            )
            .map_err(db)?;
        }
        tx.commit().map_err(db)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_errors_name_each_cause_once() {
        let json = serde_json::from_str::<Vec<ServiceSpec>>("[{").unwrap_err();
        let cause = json.to_string();
        let chain = hull_proto::error_chain(&ServiceError::Json(json));
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        let dir = tempfile::tempdir().unwrap();
        // A directory where the database file should be: SQLite cannot open it.
        let err = Registry::open(dir.path())
            .err()
            .expect("opened a directory");
        let chain = hull_proto::error_chain(&err);
        let cause = std::error::Error::source(&err).unwrap().to_string();
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
    }

    fn spec(name: &str, after: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.into(),
            cmd: "true".into(),
            env: vec![],
            cwd: None,
            user: None,
            http_port: None,
            restart: RestartPolicy::OnFailure,
            after: after.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn bad_definitions_are_refused_and_nothing_is_stored() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(&tmp.path().join("services.db")).unwrap();
        reg.add(&spec("db", &[])).unwrap();
        reg.add(&spec("api", &["db"])).unwrap();
        assert!(matches!(
            reg.add(&spec("db", &[])),
            Err(ServiceError::Duplicate(_))
        ));
        assert!(matches!(
            reg.add(&spec("web", &["nope"])),
            Err(ServiceError::UnknownAfter { .. })
        ));
        assert!(matches!(
            reg.add(&spec("loop", &["loop"])),
            Err(ServiceError::Cycle { .. })
        ));
        let mut empty = spec("empty", &[]);
        empty.cmd = "  ".into();
        assert!(matches!(
            reg.add(&empty),
            Err(ServiceError::EmptyCommand(_))
        ));
        assert!(matches!(
            reg.add(&spec("bad name", &[])),
            Err(ServiceError::Name(_))
        ));
        assert!(matches!(
            reg.remove("db"),
            Err(ServiceError::HasDependents { .. })
        ));
        assert_eq!(reg.list().unwrap().len(), 2);
    }

    #[test]
    fn adds_past_the_cap_are_refused_and_a_removal_makes_room() {
        let tmp = tempfile::tempdir().unwrap();
        let reg = Registry::open(&tmp.path().join("services.db"))
            .unwrap()
            .with_max(2);
        reg.add(&spec("a", &[])).unwrap();
        reg.add(&spec("b", &[])).unwrap();
        let err = reg.add(&spec("c", &[])).unwrap_err();
        assert!(matches!(err, ServiceError::TooMany { max: 2, .. }), "{err}");
        assert!(err.to_string().contains("daemon.max_services"), "{err}");
        reg.remove("a").unwrap();
        reg.add(&spec("c", &[])).unwrap();
        assert_eq!(reg.list().unwrap().len(), 2);
    }

    #[test]
    fn order_follows_after_and_cycles_are_found() {
        let order = start_order(&[spec("c", &["b"]), spec("a", &[]), spec("b", &["a"])]).unwrap();
        assert_eq!(order, ["a", "b", "c"]);
        assert!(start_order(&[spec("x", &["y"]), spec("y", &["x"])]).is_err());
    }

    #[test]
    fn the_registry_round_trips_through_json() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reg = Registry::open(&tmp.path().join("services.db")).unwrap();
        reg.add(&spec("a", &[])).unwrap();
        let json = reg.to_json().unwrap();
        reg.add(&spec("b", &["a"])).unwrap();
        reg.replace_all(&json).unwrap();
        assert_eq!(reg.list().unwrap(), vec![spec("a", &[])]);
        assert!(matches!(reg.get("b"), Err(ServiceError::NotFound(_))));
    }
}
