//! hulld, the root-namespace daemon, and the client side of its protocol
//! used by the `hull` command-line tool.

pub mod cli;
pub mod client;
pub mod config;
pub mod daemon;
mod exec;
pub mod hulld;
pub mod inner_api;
pub mod launch;
pub mod network;
mod server;
mod supervisor;

pub use hull_proto::error_chain;
