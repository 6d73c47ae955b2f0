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
    #[error("service {name}: {why}")]
    TooBig { name: String, why: String },
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

/// What validation and start order need of a definition: its name and
/// what it waits for. The registry keeps these of every definition, so an
/// add is checked without reading the others back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deps {
    pub name: String,
    pub after: Vec<String>,
}

impl From<&ServiceSpec> for Deps {
    fn from(spec: &ServiceSpec) -> Deps {
        Deps {
            name: spec.name.clone(),
            after: spec.after.clone(),
        }
    }
}

/// Checks `new` against the services already registered.
pub fn validate(existing: &[Deps], new: &ServiceSpec) -> Result<()> {
    if !valid_name(&new.name) {
        return Err(ServiceError::Name(new.name.clone()));
    }
    if let Some(why) = new.broken_bound() {
        return Err(ServiceError::TooBig {
            name: new.name.clone(),
            why,
        });
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
    let new = Deps::from(new);
    start_order(existing.iter().chain([&new])).map(|_| ())
}

/// The services in an order where each comes after everything it waits for.
pub fn start_order<'a>(specs: impl IntoIterator<Item = &'a Deps>) -> Result<Vec<String>> {
    let mut waiting: BTreeMap<&str, BTreeSet<&str>> = specs
        .into_iter()
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

/// A stored definition hulld does not load: unreadable, or past a bound
/// of this hulld's (one an older hulld stored, or a checkpoint brought
/// back). Kept in the table `set_aside`, never deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetAside {
    pub name: String,
    pub why: String,
}

/// The registry in SQLite (its own file beside the checkpoint catalog).
pub struct Registry {
    path: PathBuf,
    conn: Connection,
    max: usize,
    /// Names and `--after` of every stored definition, in their order.
    index: Vec<Deps>,
    /// What the last load (open or replace) set aside.
    set_aside: Vec<SetAside>,
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
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS set_aside (name TEXT NOT NULL, spec TEXT NOT NULL, why TEXT NOT NULL, at_ms INTEGER NOT NULL);",
        )
        .map_err(db)?;
        let mut registry = Registry {
            path: path.to_path_buf(),
            conn,
            max: MAX_SERVICES,
            index: Vec::new(),
            set_aside: Vec::new(),
        };
        registry.load()?;
        Ok(registry)
    }

    /// Reads every stored definition once: those this hulld can run go
    /// in the index, the others move to `set_aside` with the reason.
    fn load(&mut self) -> Result<()> {
        let rows: Vec<(String, String)> = {
            let mut stmt = self
                .conn
                .prepare("SELECT name, spec FROM services ORDER BY seq")
                .map_err(self.db())?;
            let rows = stmt
                .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
                .map_err(self.db())?
                .collect::<std::result::Result<_, _>>()
                .map_err(self.db())?;
            rows
        };
        let mut index = Vec::with_capacity(rows.len());
        let mut set_aside = Vec::new();
        for (name, text) in rows {
            let why = match serde_json::from_str::<ServiceSpec>(&text) {
                Ok(spec) => match spec.broken_bound() {
                    None => {
                        index.push(Deps::from(&spec));
                        continue;
                    }
                    Some(why) => why,
                },
                Err(e) => format!("not a definition this hulld reads: {e}"),
            };
            set_aside.push(SetAside { name, why });
        }
        if !set_aside.is_empty() {
            let now_ms = hull_proto::now_ms();
            let path = self.path.clone();
            let db = |source| ServiceError::Db {
                path: path.clone(),
                source,
            };
            let tx = self.conn.transaction().map_err(db)?;
            for one in &set_aside {
                tx.execute(
                    "INSERT INTO set_aside (name, spec, why, at_ms) SELECT name, spec, ?2, ?3 FROM services WHERE name = ?1",
                    params![one.name, one.why, now_ms],
                )
                .map_err(db)?;
                tx.execute("DELETE FROM services WHERE name = ?1", [&one.name])
                    .map_err(db)?;
            }
            tx.commit().map_err(db)?;
        }
        self.index = index;
        self.set_aside = set_aside;
        Ok(())
    }

    /// What the last load set aside (moved to the table `set_aside`).
    pub fn set_aside(&self) -> &[SetAside] {
        &self.set_aside
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
    pub fn add(&mut self, spec: &ServiceSpec) -> Result<()> {
        validate(&self.index, spec)?;
        if self.index.len() >= self.max {
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
        self.index.push(Deps::from(spec));
        Ok(())
    }

    pub fn remove(&mut self, name: &str) -> Result<()> {
        if !self.index.iter().any(|s| s.name == name) {
            return Err(ServiceError::NotFound(name.to_string()));
        }
        let dependents: Vec<&str> = self
            .index
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
        self.index.retain(|s| s.name != name);
        Ok(())
    }

    /// The whole registry as JSON, as a checkpoint records it.
    pub fn to_json(&self) -> Result<String> {
        Ok(serde_json::to_string(&self.list()?)?)
    }

    /// Replaces every definition with those recorded in `json` (a
    /// restore); those past this hulld's bounds are set aside as at open.
    pub fn replace_all(&mut self, json: &str) -> Result<()> {
        let specs: Vec<ServiceSpec> = serde_json::from_str(json)?;
        start_order(specs.iter().map(Deps::from).collect::<Vec<_>>().iter())?;
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
        self.load()
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
        let mut reg = Registry::open(&tmp.path().join("services.db")).unwrap();
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
        let mut reg = Registry::open(&tmp.path().join("services.db"))
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
        let deps = |specs: &[ServiceSpec]| specs.iter().map(Deps::from).collect::<Vec<_>>();
        let order = start_order(&deps(&[
            spec("c", &["b"]),
            spec("a", &[]),
            spec("b", &["a"]),
        ]))
        .unwrap();
        assert_eq!(order, ["a", "b", "c"]);
        assert!(start_order(&deps(&[spec("x", &["y"]), spec("y", &["x"])])).is_err());
    }

    #[test]
    fn definitions_past_the_bounds_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let mut reg = Registry::open(&tmp.path().join("services.db")).unwrap();
        let mut many = spec("many", &[]);
        many.env = vec![(String::new(), String::new()); hull_proto::MAX_SERVICE_ENV + 1];
        let mut long = spec("long", &[]);
        long.cmd = "x".repeat(hull_proto::MAX_SERVICE_TEXT);
        for bad in [many, long] {
            let err = reg.add(&bad).unwrap_err();
            assert!(matches!(err, ServiceError::TooBig { .. }), "{err}");
            assert!(err.to_string().contains("at most"), "{err}");
        }
        assert!(reg.list().unwrap().is_empty());
    }

    #[test]
    fn stored_definitions_past_the_bounds_are_set_aside_at_open() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("services.db");
        {
            let mut reg = Registry::open(&path).unwrap();
            reg.add(&spec("db", &[])).unwrap();
            // As an older hulld without bounds stored them.
            let mut big = spec("big", &[]);
            big.env = vec![(String::new(), String::new()); 21_500];
            reg.conn
                .execute(
                    "INSERT INTO services (name, seq, spec) VALUES ('big', 2, ?1)",
                    [serde_json::to_string(&big).unwrap()],
                )
                .unwrap();
            reg.conn
                .execute(
                    "INSERT INTO services (name, seq, spec) VALUES ('junk', 3, '{')",
                    [],
                )
                .unwrap();
        }
        let reg = Registry::open(&path).unwrap();
        let names: Vec<_> = reg.set_aside().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["big", "junk"]);
        assert!(reg.set_aside()[0]
            .why
            .contains("21500 environment variables"));
        assert_eq!(reg.list().unwrap(), vec![spec("db", &[])]);
        let kept: i64 = reg
            .conn
            .query_row("SELECT COUNT(*) FROM set_aside", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, 2);
        // Set aside once: the next open finds nothing more.
        drop(reg);
        assert!(Registry::open(&path).unwrap().set_aside().is_empty());
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
