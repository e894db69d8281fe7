//! The baseline: a file or block device through glommio's DMA file (io_uring, O_DIRECT), the
//! same kernel path as the storage engine's `uring` backend.

use std::io;
use std::path::Path;

use glommio::io::{DmaBuffer, DmaFile, OpenOptions, ReadResult};

use super::{Target, WriteBuffer};

/// An open file or device.
pub struct RawTarget {
    file: DmaFile,
}

impl RawTarget {
    /// Opens (creating if needed) `path` for direct I/O.
    pub async fn open(path: &Path) -> io::Result<RawTarget> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .dma_open(path)
            .await
            .map_err(io::Error::from)?;
        Ok(RawTarget { file })
    }
}

impl WriteBuffer for DmaBuffer {
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        DmaBuffer::as_bytes_mut(self)
    }
}

impl Target for RawTarget {
    type Buffer = DmaBuffer;
    type ReadData = ReadResult;

    fn alloc(&self, len: usize) -> DmaBuffer {
        self.file.alloc_dma_buffer(len)
    }

    async fn write(&self, offset: u64, data: DmaBuffer) -> io::Result<()> {
        let len = data.len();
        let written = self
            .file
            .write_at(data, offset)
            .await
            .map_err(io::Error::from)?;
        if written != len {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("short write: {written} of {len} bytes"),
            ));
        }
        Ok(())
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<ReadResult> {
        let data = self
            .file
            .read_at_aligned(offset, len)
            .await
            .map_err(io::Error::from)?;
        if data.len() != len {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("short read: {} of {len} bytes", data.len()),
            ));
        }
        Ok(data)
    }

    async fn sync(&self) -> io::Result<()> {
        self.file.fdatasync().await.map_err(io::Error::from)
    }
}
