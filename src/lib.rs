//! The `loraloop` binary's wiring, as a library so that the end-to-end tests and the
//! benchmarks start the same server the binary does.

pub mod listener;
pub mod serve;
