//! A three-replica cluster as a target: chunkservers started in this process on loopback (each
//! on its own executor thread, their device files on the same file system as the raw
//! baseline), one copyset across them, and the job's region as a volume of that copyset. A
//! write completes when it is replicated and applied, so `sync` has nothing to wait for.

use std::io;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use dataplane::client::{Client, ClientConfig, NodeAddress};
use dataplane::ids::CopysetId;
use dataplane::nbd::Export;
use dataplane::volume::{Volume, VolumeSpec};

use super::{Target, WriteBuffer};

/// The copyset every cluster job uses.
pub const COPYSET: CopysetId = CopysetId(1);
/// Chunk size of the generated cluster.
pub const CHUNK_SIZE: u64 = 4 << 20;

/// A buffer for the cluster target: plain memory, sent over the socket.
pub struct VecBuffer(Vec<u8>);

impl WriteBuffer for VecBuffer {
    fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.0
    }
}

/// One clone's view of the cluster: its own client and volume handle.
pub struct ClusterTarget {
    volume: Volume,
}

/// The volume a job runs on: the whole job region.
pub fn volume_spec(size: u64) -> VolumeSpec {
    VolumeSpec {
        name: "chunkbench".into(),
        size,
        chunk_size: CHUNK_SIZE,
        layout: dataplane::volume_table::VolumeLayout::Single {
            copyset: COPYSET,
            first_chunk: dataplane::ids::ChunkId(1),
        },
    }
}

impl ClusterTarget {
    /// A client for `addresses`, serving the volume of `size` bytes.
    pub fn connect(addresses: &[NodeAddress], size: u64) -> ClusterTarget {
        let config = ClientConfig {
            deadline: Duration::from_secs(30),
            ..ClientConfig::default()
        };
        let client = Rc::new(Client::new(addresses, config));
        client.set_peers(COPYSET, &addresses.iter().map(|a| a.id).collect::<Vec<_>>());
        ClusterTarget {
            volume: Volume::new(volume_spec(size), client),
        }
    }
}

fn io_error(error: impl std::fmt::Display) -> io::Error {
    io::Error::other(error.to_string())
}

impl Target for ClusterTarget {
    type Buffer = VecBuffer;
    type ReadData = Bytes;

    fn alloc(&self, len: usize) -> VecBuffer {
        VecBuffer(vec![0; len])
    }

    async fn write(&self, offset: u64, data: VecBuffer) -> io::Result<()> {
        self.volume
            .write(offset, Bytes::from(data.0), false)
            .await
            .map_err(io_error)
    }

    async fn read(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let len = u32::try_from(len).map_err(io_error)?;
        self.volume.read(offset, len).await.map_err(io_error)
    }

    async fn sync(&self) -> io::Result<()> {
        Ok(())
    }
}
