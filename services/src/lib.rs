//! The service registry and the service manager, its only owner.
//!
//! * [`registry`]: the definitions in SQLite, validated at `add`, ordered by
//!   `--after`, recorded with checkpoints and replaced by restores.
//! * [`manager`]: the actor that starts the registered services on every
//!   new inner, supervises them (readiness, restart policy, backoff, crash
//!   loops) and answers requests; hulld holds its [`ServiceManager`] handle.
//! * [`host`]: what the manager needs of a running inner and of the port
//!   table, as traits, so it never depends on how hulld launches inners.

pub mod host;
pub mod manager;
pub mod registry;

pub use host::{HostProcess, InnerCause, InnerHost, PortProbe, SpawnFailure};
pub use hull_proto::{RestartPolicy, ServiceSpec};
pub use manager::{Definitions, Failed, Replaced, ServiceManager};
pub use registry::{
    start_order, validate, Deps, Registry, ServiceError, SetAside, MAX_SERVICES, RESERVED_NAMES,
};
