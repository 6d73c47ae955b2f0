//! hull's log pipeline, in the root namespace so that logs outlive every
//! bounce, restore and crash of the inner.
//!
//! * [`store`]: segment files per source, rotation, the cap per source.
//! * [`capture`]: a process's output pipes cut into lines into its source.
//! * [`serve`]: a client's read of a source: tail, filter, follow.
//! * [`exec`]: the `exec` source: per exec an id, argv, exit and duration;
//!   text output as lines, other output as its size and hash.
//! * [`daemon`]: hulld's own tracing output as the `hulld` source, and its
//!   stderr file (`hulld.log`) rotated and capped like one.

pub mod capture;
pub mod daemon;
pub mod exec;
pub mod serve;
pub mod store;

pub use capture::{capture, LineSplitter};
pub use daemon::{cap_stderr, set_daemon_log, EventWriter, DAEMON_SOURCE};
pub use exec::{ExecLog, ExecRecorder, EXEC_SOURCE};
pub use serve::{serve, Filter};
pub use store::{now_ms, Cursor, LogLimits, LogStore, SourceLog, FLUSH_EVERY, MAX_LINE};
