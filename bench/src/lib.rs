//! The parts of `replicator-bench` that other crates use too: the emulated
//! link (the end-to-end tests put a slow link between two daemons with it),
//! with the workload generator, statistics and process monitor it builds on.

pub mod monitor;
pub mod proxy;
pub mod stats;
pub mod workload;
