//! The SQLite catalog of checkpoints and layers (WAL, synchronous=FULL).
//! Every row carries a state, so a crash between two steps leaves a row
//! that says exactly what was half done.

use std::path::Path;

use rusqlite::types::{FromSql, FromSqlError, FromSqlResult, ToSql, ToSqlOutput, ValueRef};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

/// Migrations, applied in order; `PRAGMA user_version` records how many ran.
const MIGRATIONS: &[&str] = &[
    // 1: checkpoints, layers and a key-value table.
    "CREATE TABLE checkpoints (
        id TEXT PRIMARY KEY,
        seq INTEGER NOT NULL UNIQUE,
        parent TEXT,
        created_ms INTEGER NOT NULL,
        comment TEXT,
        auto INTEGER NOT NULL DEFAULT 0,
        services TEXT NOT NULL DEFAULT '[]',
        state TEXT NOT NULL
    );
    CREATE TABLE layers (
        id TEXT PRIMARY KEY,
        created_ms INTEGER NOT NULL,
        origin TEXT,
        state TEXT NOT NULL
    );
    CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);",
    // 2: a checkpoint's identity beyond this machine (its remote id, its
    // parent's), where it stands with the remote, and where it came from.
    // Rows made before get their remote ids at open (`backfill_remote_ids`).
    "ALTER TABLE checkpoints ADD COLUMN remote_id TEXT;
    ALTER TABLE checkpoints ADD COLUMN parent_remote_id TEXT;
    ALTER TABLE checkpoints ADD COLUMN remote_state TEXT NOT NULL DEFAULT 'local';
    ALTER TABLE checkpoints ADD COLUMN remote_error TEXT;
    ALTER TABLE checkpoints ADD COLUMN origin TEXT NOT NULL DEFAULT 'here';
    CREATE UNIQUE INDEX checkpoints_remote_id ON checkpoints (remote_id);",
];

/// A state string in the catalog that this hulld does not know (a newer
/// hulld's, or a hand edit): reading the row fails rather than guess.
#[derive(Debug, thiserror::Error)]
#[error("unknown {kind} state {value:?} in the catalog")]
pub struct UnknownState {
    pub kind: &'static str,
    pub value: String,
}

/// An enum stored as one of a fixed set of strings. The strings are the
/// on-disk format: existing catalogs must keep reading.
macro_rules! state_enum {
    ($(#[$meta:meta])* $name:ident, $kind:literal { $($(#[$vmeta:meta])* $variant:ident => $text:literal,)+ }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name {
            $($(#[$vmeta])* $variant,)+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl std::str::FromStr for $name {
            type Err = UnknownState;
            fn from_str(s: &str) -> Result<Self, UnknownState> {
                match s {
                    $($text => Ok($name::$variant),)+
                    _ => Err(UnknownState { kind: $kind, value: s.to_string() }),
                }
            }
        }

        impl ToSql for $name {
            fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
                Ok(ToSqlOutput::from(self.as_str()))
            }
        }

        impl FromSql for $name {
            fn column_result(value: ValueRef<'_>) -> FromSqlResult<Self> {
                value
                    .as_str()?
                    .parse()
                    .map_err(|e: UnknownState| FromSqlError::Other(Box::new(e)))
            }
        }
    };
}

state_enum! {
    /// Where a checkpoint is in its life.
    CheckpointState, "checkpoint" {
        /// The row is written, the snapshot may not be: a crash rolls it back.
        Creating => "creating",
        /// Snapshot taken and recorded: listable, restorable.
        Ready => "ready",
        /// Marked for deletion: a crash finishes the deletion.
        Deleting => "deleting",
    }
}

state_enum! {
    /// Where a writable layer is in its life.
    LayerState, "layer" {
        /// Being made for a restore, not yet swapped in.
        Creating => "creating",
        /// The current layer (or one recovery made current).
        Active => "active",
        /// Swapped out by a restore: garbage to collect.
        Retired => "retired",
    }
}

state_enum! {
    /// Where a checkpoint stands with the remote.
    RemoteState, "remote" {
        /// Only on this machine.
        Local => "local",
        /// Its push has begun (a start resumes it).
        Pushing => "pushing",
        /// Its manifest is in the remote.
        Pushed => "pushed",
    }
}

state_enum! {
    /// Where a checkpoint came from.
    Origin, "origin" {
        /// Taken on this machine.
        Here => "here",
        /// Received from the remote.
        Pulled => "pulled",
    }
}

/// A new global id for a checkpoint: a random UUID, the name of its
/// manifest once pushed.
pub fn new_remote_id() -> String {
    uuid::Uuid::new_v4().hyphenated().to_string()
}

/// A checkpoint as the catalog knows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct CheckpointRow {
    pub id: String,
    pub seq: i64,
    pub parent: Option<String>,
    pub created_ms: i64,
    pub comment: Option<String>,
    pub auto: bool,
    /// The service definitions registered when it was taken (JSON).
    pub services: String,
    pub state: CheckpointState,
    /// Its global id (a UUID), given at creation; its manifest's id.
    pub remote_id: String,
    /// The parent's global id: known even when the parent is not here.
    pub parent_remote_id: Option<String>,
    pub remote_state: RemoteState,
    /// Why the last push failed, until one succeeds.
    pub remote_error: Option<String>,
    pub origin: Origin,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRow {
    pub id: String,
    pub origin: Option<String>,
    pub state: LayerState,
}

pub use hull_proto::now_ms;

pub struct Catalog {
    conn: Connection,
}

impl Catalog {
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        let version: usize = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        for (i, sql) in MIGRATIONS.iter().enumerate().skip(version) {
            let tx = conn.transaction()?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", i + 1)?;
            tx.commit()?;
        }
        let catalog = Catalog { conn };
        catalog.backfill_remote_ids()?;
        Ok(catalog)
    }

    /// Gives rows made before migration 2 their remote ids, then records
    /// each parent's. Nothing to do once every row has one.
    fn backfill_remote_ids(&self) -> rusqlite::Result<()> {
        let missing: Vec<String> = {
            let mut stmt = self
                .conn
                .prepare("SELECT id FROM checkpoints WHERE remote_id IS NULL")?;
            let rows = stmt.query_map([], |r| r.get(0))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if missing.is_empty() {
            return Ok(());
        }
        let tx = self.conn.unchecked_transaction()?;
        for id in &missing {
            tx.execute(
                "UPDATE checkpoints SET remote_id = ?2 WHERE id = ?1",
                params![id, new_remote_id()],
            )?;
        }
        tx.execute(
            "UPDATE checkpoints SET parent_remote_id =
                (SELECT p.remote_id FROM checkpoints p WHERE p.id = checkpoints.parent)
             WHERE parent_remote_id IS NULL AND parent IS NOT NULL",
            [],
        )?;
        tx.commit()
    }

    pub fn meta(&self, key: &str) -> rusqlite::Result<Option<String>> {
        self.conn
            .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
            .optional()
    }

    pub fn delete_meta(&self, key: &str) -> rusqlite::Result<()> {
        self.conn
            .execute("DELETE FROM meta WHERE key = ?1", [key])
            .map(drop)
    }

    pub fn set_meta(&self, key: &str, value: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [key, value],
        )?;
        Ok(())
    }

    /// The next number from a counter kept in `meta`; never reused.
    pub fn next_seq(&self, counter: &str) -> rusqlite::Result<i64> {
        let next = self
            .meta(counter)?
            .and_then(|v| v.parse::<i64>().ok())
            .unwrap_or(0)
            + 1;
        self.set_meta(counter, &next.to_string())?;
        Ok(next)
    }

    /// Gives back `seq`, the last number `counter` handed out, for a thing
    /// that was never made (a checkpoint whose snapshot failed), so the
    /// next one does not leave a gap. Does nothing if a later number went.
    pub fn give_back_seq(&self, counter: &str, seq: i64) -> rusqlite::Result<()> {
        let last = self.meta(counter)?.and_then(|v| v.parse::<i64>().ok());
        if last == Some(seq) {
            self.set_meta(counter, &(seq - 1).to_string())?;
        }
        Ok(())
    }

    pub fn insert_checkpoint(&self, row: &CheckpointRow) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO checkpoints (id, seq, parent, created_ms, comment, auto, services, state,
                remote_id, parent_remote_id, remote_state, remote_error, origin)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            params![
                row.id,
                row.seq,
                row.parent,
                row.created_ms,
                row.comment,
                row.auto,
                row.services,
                row.state,
                row.remote_id,
                row.parent_remote_id,
                row.remote_state,
                row.remote_error,
                row.origin
            ],
        )?;
        Ok(())
    }

    pub fn set_checkpoint_state(&self, id: &str, state: CheckpointState) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE checkpoints SET state = ?2 WHERE id = ?1",
            params![id, state],
        )?;
        Ok(())
    }

    /// Records where checkpoint `id` stands with the remote and why its
    /// last push failed (`None` clears it).
    pub fn set_remote_state(
        &self,
        id: &str,
        state: RemoteState,
        error: Option<&str>,
    ) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE checkpoints SET remote_state = ?2, remote_error = ?3 WHERE id = ?1",
            params![id, state, error],
        )?;
        Ok(())
    }

    pub fn delete_checkpoint(&self, id: &str) -> rusqlite::Result<()> {
        self.conn
            .execute("DELETE FROM checkpoints WHERE id = ?1", [id])?;
        Ok(())
    }

    fn checkpoint_from(r: &rusqlite::Row) -> rusqlite::Result<CheckpointRow> {
        Ok(CheckpointRow {
            id: r.get(0)?,
            seq: r.get(1)?,
            parent: r.get(2)?,
            created_ms: r.get(3)?,
            comment: r.get(4)?,
            auto: r.get(5)?,
            services: r.get(6)?,
            state: r.get(7)?,
            remote_id: r.get(8)?,
            parent_remote_id: r.get(9)?,
            remote_state: r.get(10)?,
            remote_error: r.get(11)?,
            origin: r.get(12)?,
        })
    }

    pub fn checkpoint(&self, id: &str) -> rusqlite::Result<Option<CheckpointRow>> {
        self.conn
            .query_row(
                "SELECT id, seq, parent, created_ms, comment, auto, services, state,
                    remote_id, parent_remote_id, remote_state, remote_error, origin
                 FROM checkpoints WHERE id = ?1",
                [id],
                Self::checkpoint_from,
            )
            .optional()
    }

    pub fn checkpoints(&self) -> rusqlite::Result<Vec<CheckpointRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, seq, parent, created_ms, comment, auto, services, state,
                remote_id, parent_remote_id, remote_state, remote_error, origin
             FROM checkpoints ORDER BY seq",
        )?;
        let rows = stmt.query_map([], Self::checkpoint_from)?;
        rows.collect()
    }

    pub fn insert_layer(
        &self,
        id: &str,
        origin: Option<&str>,
        state: LayerState,
    ) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO layers (id, created_ms, origin, state) VALUES (?1, ?2, ?3, ?4)",
            params![id, now_ms(), origin, state],
        )?;
        Ok(())
    }

    pub fn layers(&self) -> rusqlite::Result<Vec<LayerRow>> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, origin, state FROM layers ORDER BY created_ms")?;
        let rows = stmt.query_map([], |r| {
            Ok(LayerRow {
                id: r.get(0)?,
                origin: r.get(1)?,
                state: r.get(2)?,
            })
        })?;
        rows.collect()
    }

    pub fn set_layer_state(&self, id: &str, state: LayerState) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE layers SET state = ?2 WHERE id = ?1",
            params![id, state],
        )?;
        Ok(())
    }

    pub fn delete_layer(&self, id: &str) -> rusqlite::Result<()> {
        self.conn
            .execute("DELETE FROM layers WHERE id = ?1", [id])?;
        Ok(())
    }

    /// Makes `new` the current layer and retires `old`, in one transaction:
    /// the swap a restore hinges on.
    pub fn swap_layer(&mut self, old: &str, new: &str, head: &str) -> rusqlite::Result<()> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "UPDATE layers SET state = ?2 WHERE id = ?1",
            params![new, LayerState::Active],
        )?;
        tx.execute(
            "UPDATE layers SET state = ?2 WHERE id = ?1",
            params![old, LayerState::Retired],
        )?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('current_layer', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [new],
        )?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('head', ?1)
             ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            [head],
        )?;
        tx.commit()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_run_once_and_rows_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("catalog.db");
        {
            let c = Catalog::open(&path).unwrap();
            assert_eq!(c.next_seq("checkpoint_seq").unwrap(), 1);
            let row = CheckpointRow {
                id: "v1".into(),
                seq: 1,
                parent: None,
                created_ms: 5,
                comment: Some("first".into()),
                auto: false,
                services: "[]".into(),
                state: CheckpointState::Ready,
                remote_id: new_remote_id(),
                parent_remote_id: None,
                remote_state: RemoteState::Local,
                remote_error: None,
                origin: Origin::Here,
            };
            c.insert_checkpoint(&row).unwrap();
            assert_eq!(c.checkpoint("v1").unwrap(), Some(row));
            assert_eq!(c.checkpoint("v9").unwrap(), None);
        }
        // Reopening does not re-run migration 1 (it would fail: tables exist).
        let c = Catalog::open(&path).unwrap();
        assert_eq!(c.checkpoints().unwrap().len(), 1);
        assert_eq!(c.next_seq("checkpoint_seq").unwrap(), 2);
    }

    #[test]
    fn a_catalog_of_version_1_is_upgraded_in_place_with_remote_ids() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("catalog.db");
        {
            // A catalog as a hulld before migration 2 left it.
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute_batch(
                "INSERT INTO checkpoints (id, seq, parent, created_ms, state) VALUES ('v1', 1, NULL, 0, 'ready');
                 INSERT INTO checkpoints (id, seq, parent, created_ms, state) VALUES ('v2', 2, 'v1', 0, 'ready');
                 INSERT INTO checkpoints (id, seq, parent, created_ms, state) VALUES ('v4', 4, 'v3', 0, 'ready');",
            )
            .unwrap();
        }
        let c = Catalog::open(&path).unwrap();
        let rows = c.checkpoints().unwrap();
        assert_eq!(rows.len(), 3);
        let ids: std::collections::HashSet<_> = rows.iter().map(|r| &r.remote_id).collect();
        assert_eq!(ids.len(), 3, "every row has its own remote id");
        for r in &rows {
            uuid::Uuid::parse_str(&r.remote_id).unwrap();
            assert_eq!(r.remote_state, RemoteState::Local);
            assert_eq!(r.origin, Origin::Here);
            assert_eq!(r.remote_error, None);
        }
        assert_eq!(rows[0].parent_remote_id, None);
        assert_eq!(rows[1].parent_remote_id.as_ref(), Some(&rows[0].remote_id));
        // v3 is gone: its id was never known here.
        assert_eq!(rows[2].parent_remote_id, None);
        drop(c);
        // A second open keeps the ids it gave.
        let again = Catalog::open(&path).unwrap().checkpoints().unwrap();
        assert_eq!(again, rows);
        let c = Catalog::open(&path).unwrap();
        c.set_remote_state("v2", RemoteState::Pushing, Some("unreachable"))
            .unwrap();
        let v2 = c.checkpoint("v2").unwrap().unwrap();
        assert_eq!(v2.remote_state, RemoteState::Pushing);
        assert_eq!(v2.remote_error.as_deref(), Some("unreachable"));
        let stored: String = c
            .conn
            .query_row(
                "SELECT remote_state FROM checkpoints WHERE id = 'v2'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, "pushing");
    }

    #[test]
    fn a_number_given_back_is_handed_out_again_only_if_it_was_the_last() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        let first = c.next_seq("checkpoint_seq").unwrap();
        c.give_back_seq("checkpoint_seq", first).unwrap();
        assert_eq!(c.next_seq("checkpoint_seq").unwrap(), first);
        let second = c.next_seq("checkpoint_seq").unwrap();
        // An older number cannot come back: a later one is already out.
        c.give_back_seq("checkpoint_seq", first).unwrap();
        assert_eq!(c.next_seq("checkpoint_seq").unwrap(), second + 1);
    }

    #[test]
    fn states_round_trip_through_the_database_as_their_old_strings() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        for (i, &state) in CheckpointState::ALL.iter().enumerate() {
            let id = format!("v{i}");
            c.insert_checkpoint(&CheckpointRow {
                id: id.clone(),
                seq: i64::try_from(i).unwrap(),
                parent: None,
                created_ms: 0,
                comment: None,
                auto: false,
                services: "[]".into(),
                state,
                remote_id: new_remote_id(),
                parent_remote_id: None,
                remote_state: RemoteState::Local,
                remote_error: None,
                origin: Origin::Here,
            })
            .unwrap();
            assert_eq!(c.checkpoint(&id).unwrap().unwrap().state, state);
            let stored: String = c
                .conn
                .query_row("SELECT state FROM checkpoints WHERE id = ?1", [&id], |r| {
                    r.get(0)
                })
                .unwrap();
            assert_eq!(stored, state.to_string());
        }
        c.set_checkpoint_state("v0", CheckpointState::Deleting)
            .unwrap();
        assert_eq!(
            c.checkpoint("v0").unwrap().unwrap().state,
            CheckpointState::Deleting
        );
        for &state in LayerState::ALL {
            let id = format!("l-{state}");
            c.insert_layer(&id, None, LayerState::Creating).unwrap();
            c.set_layer_state(&id, state).unwrap();
            let row = c.layers().unwrap().into_iter().find(|l| l.id == id);
            assert_eq!(row.unwrap().state, state);
        }
        // The strings catalogs written before the enum hold.
        let old = ["creating", "ready", "deleting"].map(|s| s.parse::<CheckpointState>().unwrap());
        assert_eq!(
            old,
            [
                CheckpointState::Creating,
                CheckpointState::Ready,
                CheckpointState::Deleting
            ]
        );
        let old = ["creating", "active", "retired"].map(|s| s.parse::<LayerState>().unwrap());
        assert_eq!(
            old,
            [
                LayerState::Creating,
                LayerState::Active,
                LayerState::Retired
            ]
        );
    }

    #[test]
    fn an_unknown_state_in_the_database_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let c = Catalog::open(&tmp.path().join("catalog.db")).unwrap();
        c.conn
            .execute(
                "INSERT INTO checkpoints (id, seq, created_ms, state) VALUES ('v1', 1, 0, 'frozen')",
                [],
            )
            .unwrap();
        c.conn
            .execute(
                "INSERT INTO layers (id, created_ms, state) VALUES ('l1', 0, 'zombie')",
                [],
            )
            .unwrap();
        let err = c.checkpoint("v1").unwrap_err().to_string();
        assert!(err.contains("unknown checkpoint state \"frozen\""), "{err}");
        let err = c.checkpoints().unwrap_err().to_string();
        assert!(err.contains("\"frozen\""), "{err}");
        let err = c.layers().unwrap_err().to_string();
        assert!(err.contains("unknown layer state \"zombie\""), "{err}");
    }
}
