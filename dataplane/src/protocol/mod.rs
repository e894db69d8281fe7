//! The wire protocol's one home (docs/protocol.md): the frame format every transport carries,
//! the service opcodes, and each body's encoding and decoding. Bodies are decoded once at
//! the edge, where a frame arrives, into the typed values the services and the client use;
//! decoders refuse malformed input with a [`WireError`] and never panic.
//!
//! - [`frame`]: the 40-byte frame header and the stream codec (TCP and RDMA alike).
//! - [`opcodes`]: which service an opcode asks for, and its name in metrics.
//! - [`response`]: the response envelope ([`Status`] and a body).
//! - [`chunk`], [`copyset`], [`image`], [`raft`], [`placement`]: the bodies of each service.
//! - [`routing`]: which shard of a node serves a copyset, and a node's client address.
//!
//! This module depends on the identifiers, the configuration's endpoint type and the
//! copyset's operation encoding, and on nothing that moves bytes: the transports (`net`),
//! the services (`server`) and the client (`client`) all depend on it, never the reverse.

pub mod access;
pub mod chunk;
pub mod copyset;
pub mod frame;
pub mod image;
pub mod opcodes;
pub mod placement;
pub mod raft;
mod reader;
pub mod response;
pub mod routing;

#[cfg(test)]
mod tests;

pub use chunk::{ReadChunk, ReadSnapshot};
pub use copyset::{
    decode_copyset_list, encode_copyset_list, CopysetStatus, CreateCopyset, Membership, ResetPeers,
    MAX_PEERS,
};
pub use frame::{
    Frame, FrameCodec, FrameError, FrameFlags, FrameHeader, Opcode, DEFAULT_MAX_PAYLOAD,
    FRAME_HEADER_LEN,
};
pub use image::{ImageList, ImagePieceHeader, ReadImagePiece, IMAGE_PIECE_HEADER_LEN};
pub use opcodes::*;
pub use raft::{RaftBatch, MAX_RAFT_BATCH};
pub use reader::WireError;
pub use response::{decode_response, encode_response, Status};
pub use routing::{shard_of, NodeAddress};
