//! The service registry: definitions of the services a user registers,
//! persisted in SQLite and replayed after every start of the inner.
//!
//! Not built yet: hulld replays no services today.
