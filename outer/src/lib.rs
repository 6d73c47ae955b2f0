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

/// An error and its sources, joined with ": ", for a one-line message.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        source = cause.source();
    }
    out
}
