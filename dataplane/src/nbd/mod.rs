//! The NBD export: serves volumes over the Network Block Device protocol (newstyle fixed
//! handshake, NBD_OPT_GO/INFO/LIST, simple and structured replies, READ, WRITE, FLUSH, TRIM,
//! WRITE_ZEROES, FUA), so that unmodified tools — `fio --ioengine=nbd`, `qemu-img`,
//! `qemu-io`, the kernel's nbd-client — use our volumes.

pub mod export;
pub mod protocol;
pub mod server;

pub use export::{Export, ExportError, ExportFuture, MemExport};
pub use server::{bind, serve, serve_connection, Exports, NbdConfig, NbdError};
