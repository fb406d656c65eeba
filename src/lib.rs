//! `bnorm`: a small reverse-mode autodiff tape ([`tape`]) whose showpiece is a fused Batch
//! Normalization node ([`layers`]). This root package re-exports both and owns the examples
//! and the cross-crate tests.

pub mod golden;
pub mod models;
pub mod train;
pub mod walkthrough;

pub use layers;
pub use tape;

/// The README's code blocks, compiled and run as doc tests so they cannot go stale.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
