//! The NBD wire protocol (newstyle, fixed), as the kernel, qemu and fio speak it: constants,
//! and pure encoders and decoders for the handshake, the option haggling and the transmission
//! phase. Nothing here does I/O; `server.rs` moves the bytes.
//!
//! Reference: the NBD protocol document (doc/proto.md of the NBD project). All integers are
//! big-endian on the wire.

use bytes::{BufMut, Bytes, BytesMut};

/// "NBDMAGIC", the first eight bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation; also the magic of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic of option replies.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of transmission requests.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// The server will not send the 124 zero bytes after NBD_OPT_EXPORT_NAME.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags mirror them.
pub const CLIENT_FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
/// The client asks for no zeroes.
pub const CLIENT_FLAG_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub mod transmission {
    /// Always set.
    pub const HAS_FLAGS: u16 = 1 << 0;
    /// The export is read-only.
    pub const READ_ONLY: u16 = 1 << 1;
    /// NBD_CMD_FLUSH is supported.
    pub const SEND_FLUSH: u16 = 1 << 2;
    /// NBD_CMD_FLAG_FUA is supported.
    pub const SEND_FUA: u16 = 1 << 3;
    /// NBD_CMD_TRIM is supported.
    pub const SEND_TRIM: u16 = 1 << 5;
    /// NBD_CMD_WRITE_ZEROES is supported.
    pub const SEND_WRITE_ZEROES: u16 = 1 << 6;
    /// NBD_CMD_FLAG_DF is supported.
    pub const SEND_DF: u16 = 1 << 7;
    /// Several connections see one consistent export.
    pub const CAN_MULTI_CONN: u16 = 1 << 8;
}

/// Options the client may send.
pub mod option {
    /// Choose an export, old style (no reply on error: the server closes).
    pub const EXPORT_NAME: u32 = 1;
    /// End the negotiation.
    pub const ABORT: u32 = 2;
    /// List exports.
    pub const LIST: u32 = 3;
    /// Upgrade to TLS (not supported).
    pub const STARTTLS: u32 = 5;
    /// Ask about an export.
    pub const INFO: u32 = 6;
    /// Choose an export.
    pub const GO: u32 = 7;
    /// Use structured replies.
    pub const STRUCTURED_REPLY: u32 = 8;
}

/// Option reply types.
pub mod reply {
    /// Done.
    pub const ACK: u32 = 1;
    /// One export of a list.
    pub const SERVER: u32 = 2;
    /// One piece of information about an export.
    pub const INFO: u32 = 3;
    /// The option is not supported.
    pub const ERR_UNSUP: u32 = (1 << 31) + 1;
    /// Forbidden by policy.
    pub const ERR_POLICY: u32 = (1 << 31) + 2;
    /// The option is malformed.
    pub const ERR_INVALID: u32 = (1 << 31) + 3;
    /// No such export.
    pub const ERR_UNKNOWN: u32 = (1 << 31) + 6;
}

/// NBD_INFO types.
pub mod info {
    /// Size and transmission flags.
    pub const EXPORT: u16 = 0;
    /// Block size constraints.
    pub const BLOCK_SIZE: u16 = 3;
}

/// Transmission commands.
pub mod command {
    /// Read.
    pub const READ: u16 = 0;
    /// Write.
    pub const WRITE: u16 = 1;
    /// Disconnect.
    pub const DISC: u16 = 2;
    /// Flush.
    pub const FLUSH: u16 = 3;
    /// Trim (discard).
    pub const TRIM: u16 = 4;
    /// Write zeroes.
    pub const WRITE_ZEROES: u16 = 6;
    /// Flag: force unit access.
    pub const FLAG_FUA: u16 = 1 << 0;
    /// Flag: do not punch a hole (write zeroes).
    pub const FLAG_NO_HOLE: u16 = 1 << 1;
    /// Flag: do not fragment a structured read reply.
    pub const FLAG_DF: u16 = 1 << 2;
}

/// Errors in replies (errno values the protocol names).
pub mod errno {
    /// Operation not permitted (write to a read-only export).
    pub const EPERM: u32 = 1;
    /// I/O error.
    pub const EIO: u32 = 5;
    /// Out of memory.
    pub const ENOMEM: u32 = 12;
    /// Invalid argument (out of range, bad flags).
    pub const EINVAL: u32 = 22;
    /// No space left.
    pub const ENOSPC: u32 = 28;
    /// Not supported.
    pub const ENOTSUP: u32 = 95;
    /// The server is shutting down.
    pub const ESHUTDOWN: u32 = 108;
}

/// Structured reply chunk types.
pub mod chunk {
    /// Flag: the last chunk of this reply.
    pub const FLAG_DONE: u16 = 1 << 0;
    /// No payload.
    pub const NONE: u16 = 0;
    /// Data at an offset.
    pub const OFFSET_DATA: u16 = 1;
    /// An error with a message.
    pub const ERROR: u16 = (1 << 15) + 1;
}

/// The server's first message.
pub fn server_greeting() -> [u8; 18] {
    let mut out = [0u8; 18];
    out[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    out[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    out[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    out
}

/// A malformed message from the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// A magic number that is not the expected one.
    #[error("bad magic {found:#x} (expected {expected:#x})")]
    BadMagic {
        /// What arrived.
        found: u64,
        /// What was expected.
        expected: u64,
    },
    /// The client does not speak fixed newstyle.
    #[error("client flags {0:#x} lack fixed newstyle")]
    NotFixedNewstyle(u32),
    /// A length beyond what the server accepts.
    #[error("{what} length {len} exceeds the limit {limit}")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its value.
        len: u64,
        /// The limit.
        limit: u64,
    },
}

/// An option header from the client: magic, option, length of its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option.
    pub option: u32,
    /// Length of the data that follows.
    pub len: u32,
}

/// The longest option data the server reads (an export name and a few info requests).
pub const MAX_OPTION_LEN: u32 = 4096;

/// Decodes the 16-byte option header.
pub fn decode_option_header(bytes: &[u8; 16]) -> Result<OptionHeader, ProtocolError> {
    let magic = u64::from_be_bytes(bytes[0..8].try_into().unwrap_or([0; 8]));
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic {
            found: magic,
            expected: IHAVEOPT,
        });
    }
    let option = u32::from_be_bytes(bytes[8..12].try_into().unwrap_or([0; 4]));
    let len = u32::from_be_bytes(bytes[12..16].try_into().unwrap_or([0; 4]));
    if len > MAX_OPTION_LEN {
        return Err(ProtocolError::TooLong {
            what: "option",
            len: u64::from(len),
            limit: u64::from(MAX_OPTION_LEN),
        });
    }
    Ok(OptionHeader { option, len })
}

/// The export name and info requests of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    /// Export name (may be empty: the default export).
    pub name: String,
    /// NBD_INFO types the client asked for.
    pub requests: Vec<u16>,
}

/// Decodes the data of NBD_OPT_INFO / NBD_OPT_GO; `None` when malformed.
pub fn decode_info_request(data: &[u8]) -> Option<InfoRequest> {
    let name_len = u32::from_be_bytes(data.get(0..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + name_len)?;
    let name = String::from_utf8(name.to_vec()).ok()?;
    let rest = data.get(4 + name_len..)?;
    let count = u16::from_be_bytes(rest.get(0..2)?.try_into().ok()?) as usize;
    let list = rest.get(2..)?;
    if list.len() != count * 2 {
        return None;
    }
    let requests = list
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    Some(InfoRequest { name, requests })
}

/// An option reply: magic, option, reply type, data.
pub fn option_reply(option: u32, reply_type: u32, data: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(20 + data.len());
    out.put_u64(OPTION_REPLY_MAGIC);
    out.put_u32(option);
    out.put_u32(reply_type);
    out.put_u32(data.len() as u32);
    out.put_slice(data);
    out.freeze()
}

/// NBD_INFO_EXPORT data: size and transmission flags.
pub fn info_export(size: u64, flags: u16) -> Vec<u8> {
    let mut out = Vec::with_capacity(12);
    out.extend_from_slice(&info::EXPORT.to_be_bytes());
    out.extend_from_slice(&size.to_be_bytes());
    out.extend_from_slice(&flags.to_be_bytes());
    out
}

/// NBD_INFO_BLOCK_SIZE data: minimum, preferred and maximum block sizes.
pub fn info_block_size(minimum: u32, preferred: u32, maximum: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(14);
    out.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
    out.extend_from_slice(&minimum.to_be_bytes());
    out.extend_from_slice(&preferred.to_be_bytes());
    out.extend_from_slice(&maximum.to_be_bytes());
    out
}

/// A transmission request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    /// Command flags.
    pub flags: u16,
    /// The command.
    pub command: u16,
    /// The client's handle, echoed in the reply.
    pub handle: u64,
    /// Byte offset.
    pub offset: u64,
    /// Byte length (for writes, the data that follows).
    pub len: u32,
}

/// Size of a request header.
pub const REQUEST_LEN: usize = 28;

/// Decodes a 28-byte request header.
pub fn decode_request(bytes: &[u8; REQUEST_LEN]) -> Result<Request, ProtocolError> {
    let be32 =
        |at: usize| u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let be16 = |at: usize| u16::from_be_bytes([bytes[at], bytes[at + 1]]);
    let be64 = |at: usize| (u64::from(be32(at)) << 32) | u64::from(be32(at + 4));
    let magic = be32(0);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic {
            found: u64::from(magic),
            expected: u64::from(REQUEST_MAGIC),
        });
    }
    Ok(Request {
        flags: be16(4),
        command: be16(6),
        handle: be64(8),
        offset: be64(16),
        len: be32(24),
    })
}

/// Encodes a request header (the client side; the tests and the benchmark use it).
pub fn encode_request(request: &Request) -> [u8; REQUEST_LEN] {
    let mut out = [0u8; REQUEST_LEN];
    out[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&request.flags.to_be_bytes());
    out[6..8].copy_from_slice(&request.command.to_be_bytes());
    out[8..16].copy_from_slice(&request.handle.to_be_bytes());
    out[16..24].copy_from_slice(&request.offset.to_be_bytes());
    out[24..28].copy_from_slice(&request.len.to_be_bytes());
    out
}

/// A simple reply header (data, for a successful read, follows it).
pub fn simple_reply(error: u32, handle: u64) -> [u8; 16] {
    let mut out = [0u8; 16];
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out
}

/// A structured reply chunk header; `len` is the length of the chunk's payload.
pub fn structured_reply(flags: u16, chunk_type: u16, handle: u64, len: u32) -> [u8; 20] {
    let mut out = [0u8; 20];
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&chunk_type.to_be_bytes());
    out[8..16].copy_from_slice(&handle.to_be_bytes());
    out[16..20].copy_from_slice(&len.to_be_bytes());
    out
}

/// The payload of a structured error chunk: errno and a message.
pub fn structured_error_payload(error: u32, message: &str) -> Vec<u8> {
    let message = &message.as_bytes()[..message.len().min(4096)];
    let mut out = Vec::with_capacity(6 + message.len());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&(message.len() as u16).to_be_bytes());
    out.extend_from_slice(message);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_request_round_trips_and_a_bad_magic_is_refused() {
        let request = Request {
            flags: command::FLAG_FUA,
            command: command::WRITE,
            handle: 7,
            offset: 4096,
            len: 512,
        };
        let bytes = encode_request(&request);
        assert_eq!(decode_request(&bytes), Ok(request));
        let mut bad = bytes;
        bad[0] ^= 1;
        assert!(matches!(
            decode_request(&bad),
            Err(ProtocolError::BadMagic { .. })
        ));
    }

    #[test]
    fn info_requests_decode_and_malformed_ones_do_not() {
        let mut data = Vec::new();
        data.extend_from_slice(&3u32.to_be_bytes());
        data.extend_from_slice(b"vol");
        data.extend_from_slice(&2u16.to_be_bytes());
        data.extend_from_slice(&info::EXPORT.to_be_bytes());
        data.extend_from_slice(&info::BLOCK_SIZE.to_be_bytes());
        let request = decode_info_request(&data).unwrap();
        assert_eq!(request.name, "vol");
        assert_eq!(request.requests, vec![info::EXPORT, info::BLOCK_SIZE]);
        assert!(decode_info_request(&data[..data.len() - 1]).is_none());
        let mut long_name = data.clone();
        long_name[3] = 200;
        assert!(decode_info_request(&long_name).is_none());
    }

    #[test]
    fn an_oversized_option_is_refused_before_its_data_is_read() {
        let mut header = [0u8; 16];
        header[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        header[8..12].copy_from_slice(&option::GO.to_be_bytes());
        header[12..16].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode_option_header(&header),
            Err(ProtocolError::TooLong { .. })
        ));
    }

    #[test]
    fn replies_have_the_documented_layout() {
        let reply = option_reply(option::GO, reply::ACK, &[]);
        assert_eq!(reply.len(), 20);
        assert_eq!(&reply[0..8], &OPTION_REPLY_MAGIC.to_be_bytes());
        let simple = simple_reply(errno::EIO, 9);
        assert_eq!(&simple[4..8], &5u32.to_be_bytes());
        let chunk = structured_reply(chunk::FLAG_DONE, chunk::OFFSET_DATA, 9, 8 + 4096);
        assert_eq!(&chunk[16..20], &4104u32.to_be_bytes());
    }
}
