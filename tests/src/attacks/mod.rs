//! Attacks on hulld, each a function the escape tests run under a
//! [`crate::siege::Siege`] and `hull-bench bounds` can run for its rows.

pub mod sessions;
