//! The storage engine: everything between a raft entry and the bytes on the device.
//!
//! - [`dma`]: aligned buffers taken by ownership, convertible to and from `bytes::Bytes`.
//! - [`bdev`]: the block-device trait and its backends, chosen by URI.

pub mod bdev;
pub mod dma;
