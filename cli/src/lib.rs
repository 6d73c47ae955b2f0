//! The `hull` command-line tool: a client of hulld's control protocol,
//! over its unix socket or the HTTP API's `/hull` tunnel, and `hull vm`,
//! which builds and boots a hull VM. It is built over `hull-client`,
//! `hull-proto` and `hull-image` only, so it runs on hosts where hulld
//! never does; `tests/daemon_free.rs` holds its dependency tree to that.

pub mod cli;

pub use hull_client as client;
pub use hull_client::config;
