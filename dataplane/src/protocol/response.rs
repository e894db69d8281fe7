//! The response envelope: how a request ended, and the body of a successful one.

use bytes::{BufMut, Bytes, BytesMut};

use super::reader::{Reader, WireError};

/// How a request ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Done; the body follows.
    Ok,
    /// This replica does not lead the copyset; `leader` does (0: unknown yet).
    Redirect {
        /// The leader's node id, or 0.
        leader: u64,
    },
    /// No such copyset on this node.
    CopysetNotFound,
    /// No such chunk.
    ChunkNotFound,
    /// The request is malformed or out of range; nothing changed.
    Invalid(String),
    /// The write's sequence number is older than the chunk's.
    BackwardSn,
    /// Not carried out (a leader change replaced it, or the node is overloaded); retry.
    Retry(String),
    /// The device failed.
    Io(String),
}

impl Status {
    /// A short name, for metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Redirect { .. } => "redirect",
            Status::CopysetNotFound => "copyset_not_found",
            Status::ChunkNotFound => "chunk_not_found",
            Status::Invalid(_) => "invalid",
            Status::BackwardSn => "backward_sn",
            Status::Retry(_) => "retry",
            Status::Io(_) => "io_error",
        }
    }

    fn code(&self) -> u8 {
        match self {
            Status::Ok => 0,
            Status::Redirect { .. } => 1,
            Status::CopysetNotFound => 2,
            Status::ChunkNotFound => 3,
            Status::Invalid(_) => 4,
            Status::BackwardSn => 5,
            Status::Retry(_) => 6,
            Status::Io(_) => 7,
        }
    }
}

/// A response body: status u8, then for `Redirect` the leader u64, for statuses with a
/// message its length u16 and UTF-8 bytes, for `Ok` the operation's result.
pub fn encode_response(status: &Status, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(1 + 8 + body.len());
    out.put_u8(status.code());
    match status {
        Status::Ok => out.put_slice(body),
        Status::Redirect { leader } => out.put_u64_le(*leader),
        Status::Invalid(message) | Status::Retry(message) | Status::Io(message) => {
            let message = &message.as_bytes()[..message.len().min(1024)];
            out.put_u16_le(message.len() as u16);
            out.put_slice(message);
        }
        Status::CopysetNotFound | Status::ChunkNotFound | Status::BackwardSn => {}
    }
    out.freeze()
}

/// Decodes a response into its status and, for `Ok`, its body (a slice, not a copy).
pub fn decode_response(bytes: &Bytes) -> Result<(Status, Bytes), WireError> {
    let mut reader = Reader::new(bytes, "response");
    let code = reader.u8()?;
    let message = |reader: &mut Reader<'_>| -> Result<String, WireError> {
        let len = reader.u16()? as usize;
        let text = reader.take(len)?;
        Ok(String::from_utf8_lossy(text).into_owned())
    };
    let status = match code {
        0 => return Ok((Status::Ok, bytes.slice(1..))),
        1 => Status::Redirect {
            leader: reader.u64()?,
        },
        2 => Status::CopysetNotFound,
        3 => Status::ChunkNotFound,
        4 => Status::Invalid(message(&mut reader)?),
        5 => Status::BackwardSn,
        6 => Status::Retry(message(&mut reader)?),
        7 => Status::Io(message(&mut reader)?),
        _ => {
            return Err(WireError {
                what: "response",
                why: "unknown status",
            })
        }
    };
    reader.finish()?;
    Ok((status, Bytes::new()))
}
