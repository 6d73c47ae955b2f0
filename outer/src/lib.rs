//! hulld, the root-namespace daemon. The `hull` command-line tool is
//! hull-cli, a client of hulld's protocol that imports nothing of this
//! crate.

pub mod config;
pub mod daemon;
mod exec;
mod files;
mod files_watch;
pub mod files_writer;
pub mod hulld;
mod in_process;
pub mod launch;
mod net_policy;
pub mod network;
mod port_events;
mod process_io;
pub mod pusher;
mod server;
pub mod services_socket;
mod sessions;
pub mod state_dir;
mod supervisor;

pub use hull_client as client;
pub use hull_proto::error_chain;
pub use state_dir::StateDir;

/// Locks a mutex whose every write is one assignment, insert or take (the
/// supervisor's published counters, an inner's sessions and stop reason):
/// a panic elsewhere cannot leave the value half-updated, so a poisoned
/// lock is taken over rather than spread.
pub(crate) fn lock<T>(mutex: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Runs `f` on a blocking thread (files, SQLite, ioctls that flush) and
/// waits for it; a panic there goes on in the caller.
pub(crate) async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| std::panic::resume_unwind(e.into_panic()))
}
