//! The attacks the escape tests hold hulld against under a
//! [`crate::siege::Siege`], and `hull-bench bounds` measures: each a
//! function that mounts one attack on a test's hulld and returns what it
//! got back, bounded in count and time, on loopback or through the
//! inner's own socket only.

pub mod api;
pub mod requests;
pub mod sessions;
