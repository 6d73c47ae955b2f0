//! The SQLite catalog of checkpoints and layers (WAL, synchronous=FULL).
//! Every row carries a state, so a crash between two steps leaves a row
//! that says exactly what was half done.

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

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
];

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
    pub state: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRow {
    pub id: String,
    pub origin: Option<String>,
    pub state: String,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

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
        Ok(Catalog { conn })
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
            "INSERT INTO checkpoints (id, seq, parent, created_ms, comment, auto, services, state)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                row.id,
                row.seq,
                row.parent,
                row.created_ms,
                row.comment,
                row.auto,
                row.services,
                row.state
            ],
        )?;
        Ok(())
    }

    pub fn set_checkpoint_state(&self, id: &str, state: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "UPDATE checkpoints SET state = ?2 WHERE id = ?1",
            [id, state],
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
        })
    }

    pub fn checkpoint(&self, id: &str) -> rusqlite::Result<Option<CheckpointRow>> {
        self.conn
            .query_row(
                "SELECT id, seq, parent, created_ms, comment, auto, services, state
                 FROM checkpoints WHERE id = ?1",
                [id],
                Self::checkpoint_from,
            )
            .optional()
    }

    pub fn checkpoints(&self) -> rusqlite::Result<Vec<CheckpointRow>> {
        let mut stmt = self.conn.prepare(
            "SELECT id, seq, parent, created_ms, comment, auto, services, state
             FROM checkpoints ORDER BY seq",
        )?;
        let rows = stmt.query_map([], Self::checkpoint_from)?;
        rows.collect()
    }

    pub fn insert_layer(
        &self,
        id: &str,
        origin: Option<&str>,
        state: &str,
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

    pub fn set_layer_state(&self, id: &str, state: &str) -> rusqlite::Result<()> {
        self.conn
            .execute("UPDATE layers SET state = ?2 WHERE id = ?1", [id, state])?;
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
        tx.execute("UPDATE layers SET state = 'active' WHERE id = ?1", [new])?;
        tx.execute("UPDATE layers SET state = 'retired' WHERE id = ?1", [old])?;
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
                state: "ready".into(),
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
}
