//! chunkbench: fio-style job files run against a raw device, the storage engine or a cluster,
//! with every figure printed beside a baseline from the same run.

pub mod job;
pub mod plot;
pub mod report;
pub mod runner;
pub mod target;
pub mod workload;
