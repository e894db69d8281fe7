//! The one binary frame format for peer and client traffic (docs/protocol.md).
//!
//! A frame is a fixed 40-byte little-endian header followed by `payload_len` bytes of payload.
//! The header carries its own CRC32C and the CRC32C of the payload, so a receiver can reject a
//! corrupt header before it trusts any length in it, and a corrupt payload before it hands it on.
//! Every check returns a typed [`FrameError`]; nothing here panics on input.

use bytes::Bytes;
use thiserror::Error;

/// The first four bytes of every frame: `CSF1` read as a little-endian u32.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"CSF1");
/// The protocol version this build speaks. See "Version rule" in docs/protocol.md.
pub const FRAME_VERSION: u8 = 1;
/// The length of a version-1 header, in bytes.
pub const FRAME_HEADER_LEN: usize = 40;
/// The bytes covered by the header checksum: everything before it.
const HEADER_CRC_OFFSET: usize = 36;
/// The default bound on a payload: 4 MiB, a few chunk pages more than any one request needs.
pub const DEFAULT_MAX_PAYLOAD: u32 = 4 << 20;

const _: () = assert!(HEADER_CRC_OFFSET + 4 == FRAME_HEADER_LEN);

/// What a frame asks for. Opcode 0 is never valid, so a zeroed buffer is never a frame.
/// Values 1..=15 belong to the transport itself; services allocate the rest (docs/protocol.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Opcode(pub u8);

impl Opcode {
    /// Echo the payload back: liveness checks, tests and the transport benchmark.
    pub const PING: Opcode = Opcode(1);
    /// The first opcode a service may use.
    pub const FIRST_SERVICE: Opcode = Opcode(16);
}

/// Flag bits of the header. Bits not named here must be zero in version 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FrameFlags(pub u16);

impl FrameFlags {
    /// This frame answers the request with the same request id.
    pub const RESPONSE: FrameFlags = FrameFlags(1 << 0);
    /// This frame expects no response (its request id is 0).
    pub const ONE_WAY: FrameFlags = FrameFlags(1 << 1);
    /// A response that reports a failure; its payload is a UTF-8 reason.
    pub const ERROR: FrameFlags = FrameFlags(1 << 2);
    /// Every bit version 1 defines.
    pub const KNOWN: FrameFlags = FrameFlags(0b111);

    /// Whether all bits of `other` are set.
    pub fn contains(self, other: FrameFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The union of two flag sets.
    pub fn with(self, other: FrameFlags) -> FrameFlags {
        FrameFlags(self.0 | other.0)
    }
}

/// A decoded, validated frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the frame asks for.
    pub opcode: Opcode,
    /// Response, one-way and error bits.
    pub flags: FrameFlags,
    /// Matches a response to its request. Invariant: 0 on one-way frames, non-zero otherwise.
    pub request_id: u64,
    /// The copyset the frame is about (0 when it is about none).
    pub copyset: u64,
    /// Length of the payload that follows the header.
    pub payload_len: u32,
    /// CRC32C of the payload.
    pub payload_crc: u32,
}

/// A frame: its header and its payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The header. Invariant: `header.payload_len == payload.len()` and `header.payload_crc`
    /// is the CRC32C of `payload`.
    pub header: FrameHeader,
    /// The payload.
    pub payload: Bytes,
}

/// Why a sequence of bytes is not a valid frame.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FrameError {
    /// The first four bytes are not [`FRAME_MAGIC`].
    #[error("bad magic {found:#010x} (expected {FRAME_MAGIC:#010x}): not a chunkserver frame")]
    BadMagic {
        /// The magic that was read.
        found: u32,
    },
    /// The header checksum does not match the header bytes.
    #[error("header checksum mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    HeaderChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A version this build does not speak.
    #[error("unsupported protocol version {found} (this build speaks {FRAME_VERSION})")]
    UnsupportedVersion {
        /// The version that was read.
        found: u8,
    },
    /// The header length field is not the length of a version-1 header.
    #[error("header length {found} (version 1 headers are {FRAME_HEADER_LEN} bytes)")]
    BadHeaderLength {
        /// The length that was read.
        found: u16,
    },
    /// The reserved field is not zero.
    #[error("reserved header field is {found:#06x}, must be 0")]
    ReservedNotZero {
        /// The value that was read.
        found: u16,
    },
    /// Flag bits that version 1 does not define, or a combination that means nothing.
    #[error("invalid flags {flags:#06x}")]
    InvalidFlags {
        /// The flags that were read.
        flags: u16,
    },
    /// Opcode 0.
    #[error("opcode 0 is not valid")]
    ZeroOpcode,
    /// A request id that contradicts the flags (0 on a request or response, non-zero one-way).
    #[error("request id {request_id} is invalid with flags {flags:#06x}")]
    InvalidRequestId {
        /// The request id that was read.
        request_id: u64,
        /// The flags that were read.
        flags: u16,
    },
    /// The payload is longer than this receiver accepts.
    #[error("payload of {len} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge {
        /// The payload length in the header.
        len: u32,
        /// The configured limit.
        max: u32,
    },
    /// The payload checksum does not match the payload bytes.
    #[error("payload checksum mismatch: header says {stored:#010x}, bytes give {computed:#010x}")]
    PayloadChecksum {
        /// The checksum in the header.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// The buffer ended inside a frame (a whole-buffer decode only).
    #[error("frame truncated: {needed} bytes needed, {available} available")]
    Truncated {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes there are.
        available: usize,
    },
}

/// Encodes and decodes frames under one payload bound.
#[derive(Debug, Clone, Copy)]
pub struct FrameCodec {
    /// The largest payload this side accepts. Invariant: > 0.
    max_payload: u32,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_PAYLOAD)
    }
}

impl FrameCodec {
    /// A codec that rejects payloads longer than `max_payload` bytes.
    pub fn new(max_payload: u32) -> FrameCodec {
        assert!(max_payload > 0, "a frame codec must accept some payload");
        FrameCodec { max_payload }
    }

    /// The payload bound.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Validates a header. `bytes` must hold at least [`FRAME_HEADER_LEN`] bytes; only the
    /// first [`FRAME_HEADER_LEN`] are read.
    pub fn decode_header(&self, bytes: &[u8]) -> Result<FrameHeader, FrameError> {
        let header: &[u8; FRAME_HEADER_LEN] = bytes
            .get(..FRAME_HEADER_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or(FrameError::Truncated {
                needed: FRAME_HEADER_LEN,
                available: bytes.len(),
            })?;
        let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
        if magic != FRAME_MAGIC {
            return Err(FrameError::BadMagic { found: magic });
        }
        let stored = u32::from_le_bytes([header[36], header[37], header[38], header[39]]);
        let computed = crc32c::crc32c(&header[..HEADER_CRC_OFFSET]);
        if stored != computed {
            return Err(FrameError::HeaderChecksum { stored, computed });
        }
        let version = header[4];
        if version != FRAME_VERSION {
            return Err(FrameError::UnsupportedVersion { found: version });
        }
        let opcode = Opcode(header[5]);
        let flags = FrameFlags(u16::from_le_bytes([header[6], header[7]]));
        let request_id = u64::from_le_bytes(le8(header, 8));
        let copyset = u64::from_le_bytes(le8(header, 16));
        let header_len = u16::from_le_bytes([header[24], header[25]]);
        let reserved = u16::from_le_bytes([header[26], header[27]]);
        let payload_len = u32::from_le_bytes([header[28], header[29], header[30], header[31]]);
        let payload_crc = u32::from_le_bytes([header[32], header[33], header[34], header[35]]);
        if usize::from(header_len) != FRAME_HEADER_LEN {
            return Err(FrameError::BadHeaderLength { found: header_len });
        }
        if reserved != 0 {
            return Err(FrameError::ReservedNotZero { found: reserved });
        }
        check_flags(flags)?;
        if opcode.0 == 0 {
            return Err(FrameError::ZeroOpcode);
        }
        let one_way = flags.contains(FrameFlags::ONE_WAY);
        if one_way != (request_id == 0) {
            return Err(FrameError::InvalidRequestId {
                request_id,
                flags: flags.0,
            });
        }
        if payload_len > self.max_payload {
            return Err(FrameError::PayloadTooLarge {
                len: payload_len,
                max: self.max_payload,
            });
        }
        Ok(FrameHeader {
            opcode,
            flags,
            request_id,
            copyset,
            payload_len,
            payload_crc,
        })
    }

    /// Checks a payload against its header's length and checksum.
    pub fn check_payload(&self, header: &FrameHeader, payload: &[u8]) -> Result<(), FrameError> {
        if payload.len() != header.payload_len as usize {
            return Err(FrameError::Truncated {
                needed: header.payload_len as usize,
                available: payload.len(),
            });
        }
        let computed = crc32c::crc32c(payload);
        if computed != header.payload_crc {
            return Err(FrameError::PayloadChecksum {
                stored: header.payload_crc,
                computed,
            });
        }
        Ok(())
    }

    /// Decodes one frame from the front of `bytes`. `Ok(None)` means more bytes are needed;
    /// `Ok(Some((frame, used)))` means the first `used` bytes were one valid frame.
    pub fn decode(&self, bytes: &[u8]) -> Result<Option<(Frame, usize)>, FrameError> {
        if bytes.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let header = self.decode_header(bytes)?;
        let total = FRAME_HEADER_LEN + header.payload_len as usize;
        let Some(payload) = bytes.get(FRAME_HEADER_LEN..total) else {
            return Ok(None);
        };
        self.check_payload(&header, payload)?;
        let frame = Frame {
            header,
            payload: Bytes::copy_from_slice(payload),
        };
        Ok(Some((frame, total)))
    }

    /// Decodes a buffer that must hold exactly one frame (a datagram, an RDMA message).
    pub fn decode_exact(&self, bytes: &[u8]) -> Result<Frame, FrameError> {
        match self.decode(bytes)? {
            Some((frame, used)) if used == bytes.len() => Ok(frame),
            Some((_, used)) => Err(FrameError::Truncated {
                needed: used,
                available: bytes.len(),
            }),
            None => {
                let needed = self
                    .decode_header(bytes)
                    .map(|h| FRAME_HEADER_LEN + h.payload_len as usize)
                    .unwrap_or(FRAME_HEADER_LEN);
                Err(FrameError::Truncated {
                    needed,
                    available: bytes.len(),
                })
            }
        }
    }
}

fn le8(header: &[u8; FRAME_HEADER_LEN], at: usize) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&header[at..at + 8]);
    out
}

fn check_flags(flags: FrameFlags) -> Result<(), FrameError> {
    let unknown = flags.0 & !FrameFlags::KNOWN.0 != 0;
    let response = flags.contains(FrameFlags::RESPONSE);
    let one_way = flags.contains(FrameFlags::ONE_WAY);
    let error = flags.contains(FrameFlags::ERROR);
    // A response to a one-way frame cannot exist, and only responses report errors.
    if unknown || (response && one_way) || (error && !response) {
        return Err(FrameError::InvalidFlags { flags: flags.0 });
    }
    Ok(())
}

impl FrameHeader {
    /// Encodes the header, computing its checksum.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let mut out = [0u8; FRAME_HEADER_LEN];
        out[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
        out[4] = FRAME_VERSION;
        out[5] = self.opcode.0;
        out[6..8].copy_from_slice(&self.flags.0.to_le_bytes());
        out[8..16].copy_from_slice(&self.request_id.to_le_bytes());
        out[16..24].copy_from_slice(&self.copyset.to_le_bytes());
        out[24..26].copy_from_slice(&(FRAME_HEADER_LEN as u16).to_le_bytes());
        out[26..28].copy_from_slice(&0u16.to_le_bytes());
        out[28..32].copy_from_slice(&self.payload_len.to_le_bytes());
        out[32..36].copy_from_slice(&self.payload_crc.to_le_bytes());
        let crc = crc32c::crc32c(&out[..HEADER_CRC_OFFSET]);
        out[36..40].copy_from_slice(&crc.to_le_bytes());
        out
    }
}

impl Frame {
    /// A frame with the given fields; the length and checksum come from `payload`.
    ///
    /// Panics if the payload is longer than `u32::MAX` bytes: callers bound payloads by the
    /// codec's limit long before that.
    pub fn new(
        opcode: Opcode,
        flags: FrameFlags,
        request_id: u64,
        copyset: u64,
        payload: Bytes,
    ) -> Frame {
        let payload_len = u32::try_from(payload.len()).expect("payload longer than u32::MAX");
        Frame {
            header: FrameHeader {
                opcode,
                flags,
                request_id,
                copyset,
                payload_len,
                payload_crc: crc32c::crc32c(&payload),
            },
            payload,
        }
    }

    /// The frame's length on the wire.
    pub fn wire_len(&self) -> usize {
        FRAME_HEADER_LEN + self.payload.len()
    }

    /// Appends the encoded frame to `out`.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.header.encode());
        out.extend_from_slice(&self.payload);
    }

    /// The encoded frame.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.wire_len());
        self.encode_into(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload: &[u8]) -> Frame {
        Frame::new(
            Opcode::PING,
            FrameFlags::default(),
            7,
            42,
            Bytes::copy_from_slice(payload),
        )
    }

    #[test]
    fn a_frame_round_trips_through_encode_and_decode() {
        let frame = sample(b"hello");
        let bytes = frame.encode();
        assert_eq!(bytes.len(), FRAME_HEADER_LEN + 5);
        let (decoded, used) = FrameCodec::default().decode(&bytes).unwrap().unwrap();
        assert_eq!(used, bytes.len());
        assert_eq!(decoded, frame);
    }

    #[test]
    fn the_header_layout_matches_docs_protocol_md() {
        let frame = Frame::new(
            Opcode(0x21),
            FrameFlags::RESPONSE,
            0x0102_0304_0506_0708,
            0x1112_1314_1516_1718,
            Bytes::from_static(b"abc"),
        );
        let bytes = frame.encode();
        assert_eq!(&bytes[0..4], b"CSF1");
        assert_eq!(bytes[4], 1);
        assert_eq!(bytes[5], 0x21);
        assert_eq!(&bytes[6..8], &[1, 0]);
        assert_eq!(&bytes[8..16], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(
            &bytes[16..24],
            &[0x18, 0x17, 0x16, 0x15, 0x14, 0x13, 0x12, 0x11]
        );
        assert_eq!(&bytes[24..26], &[40, 0]);
        assert_eq!(&bytes[26..28], &[0, 0]);
        assert_eq!(&bytes[28..32], &[3, 0, 0, 0]);
        assert_eq!(&bytes[32..36], &crc32c::crc32c(b"abc").to_le_bytes());
        assert_eq!(&bytes[36..40], &crc32c::crc32c(&bytes[..36]).to_le_bytes());
    }

    #[test]
    fn a_partial_frame_asks_for_more_bytes() {
        let bytes = sample(b"0123456789").encode();
        let codec = FrameCodec::default();
        for cut in 0..bytes.len() {
            assert_eq!(codec.decode(&bytes[..cut]), Ok(None), "cut at {cut}");
        }
    }

    /// Rewrites the header checksum so a test reaches the check behind it.
    fn reseal(bytes: &mut [u8]) {
        let crc = crc32c::crc32c(&bytes[..HEADER_CRC_OFFSET]);
        bytes[36..40].copy_from_slice(&crc.to_le_bytes());
    }

    #[test]
    fn each_malformed_field_has_its_own_error() {
        let codec = FrameCodec::new(1024);
        let good = sample(b"payload").encode();
        type Mutate = fn(&mut Vec<u8>);
        type Expect = fn(&FrameError) -> bool;
        let cases: &[(&str, Mutate, Expect)] = &[
            (
                "magic",
                |b| b[0] ^= 1,
                |e| matches!(e, FrameError::BadMagic { .. }),
            ),
            (
                "header crc",
                |b| b[10] ^= 1,
                |e| matches!(e, FrameError::HeaderChecksum { .. }),
            ),
            (
                "version",
                |b| {
                    b[4] = 2;
                    reseal(b)
                },
                |e| matches!(e, FrameError::UnsupportedVersion { found: 2 }),
            ),
            (
                "header length",
                |b| {
                    b[24] = 48;
                    reseal(b)
                },
                |e| matches!(e, FrameError::BadHeaderLength { found: 48 }),
            ),
            (
                "reserved",
                |b| {
                    b[26] = 1;
                    reseal(b)
                },
                |e| matches!(e, FrameError::ReservedNotZero { .. }),
            ),
            (
                "unknown flag",
                |b| {
                    b[7] = 0x80;
                    reseal(b)
                },
                |e| matches!(e, FrameError::InvalidFlags { .. }),
            ),
            (
                "error without response",
                |b| {
                    b[6] = FrameFlags::ERROR.0 as u8;
                    reseal(b)
                },
                |e| matches!(e, FrameError::InvalidFlags { .. }),
            ),
            (
                "opcode zero",
                |b| {
                    b[5] = 0;
                    reseal(b)
                },
                |e| matches!(e, FrameError::ZeroOpcode),
            ),
            (
                "one-way with a request id",
                |b| {
                    b[6] = FrameFlags::ONE_WAY.0 as u8;
                    reseal(b)
                },
                |e| matches!(e, FrameError::InvalidRequestId { .. }),
            ),
            (
                "payload too large",
                |b| {
                    b[28..32].copy_from_slice(&2048u32.to_le_bytes());
                    reseal(b)
                },
                |e| {
                    matches!(
                        e,
                        FrameError::PayloadTooLarge {
                            len: 2048,
                            max: 1024
                        }
                    )
                },
            ),
            (
                "payload crc",
                |b| {
                    let last = b.len() - 1;
                    b[last] ^= 0xff
                },
                |e| matches!(e, FrameError::PayloadChecksum { .. }),
            ),
        ];
        for (name, mutate, expected) in cases {
            let mut bytes = good.clone();
            mutate(&mut bytes);
            match codec.decode(&bytes) {
                Err(error) => assert!(expected(&error), "{name}: unexpected error {error}"),
                Ok(other) => panic!("{name}: decoded {other:?}"),
            }
        }
    }

    #[test]
    fn decode_exact_rejects_trailing_bytes() {
        let mut bytes = sample(b"x").encode();
        bytes.push(0);
        assert!(matches!(
            FrameCodec::default().decode_exact(&bytes),
            Err(FrameError::Truncated { .. })
        ));
    }

    // Inputs per property and the seed: `FRAME_FUZZ_CASES`, `FRAME_FUZZ_SEED`
    // (scripts/fuzz-frames), shared with every decoder's properties.
    use crate::fuzz_tests::{cases as fuzz_cases, seed as fuzz_seed};

    fn arbitrary_frame() -> impl Strategy<Value = Frame> {
        (
            1u8..=255,
            prop_oneof![Just(0u16), Just(1), Just(2), Just(5)],
            1u64..,
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..300),
        )
            .prop_map(|(opcode, flags, id, copyset, payload)| {
                let request_id = if flags == FrameFlags::ONE_WAY.0 {
                    0
                } else {
                    id
                };
                Frame::new(
                    Opcode(opcode),
                    FrameFlags(flags),
                    request_id,
                    copyset,
                    Bytes::from(payload),
                )
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            cases: fuzz_cases(),
            failure_persistence: None,
            rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
            rng_seed: proptest::test_runner::RngSeed::Fixed(fuzz_seed()),
            ..ProptestConfig::default()
        })]

        /// Any valid frame decodes to itself, also when split across two reads.
        #[test]
        fn valid_frames_round_trip(frame in arbitrary_frame(), split in 0usize..400) {
            let codec = FrameCodec::new(1024);
            let bytes = frame.encode();
            let split = split.min(bytes.len());
            if split < bytes.len() {
                prop_assert_eq!(codec.decode(&bytes[..split]), Ok(None));
            }
            let (decoded, used) = codec.decode(&bytes).unwrap().unwrap();
            prop_assert_eq!(used, bytes.len());
            prop_assert_eq!(decoded, frame);
        }

        /// Random bytes never panic the decoder, and are never taken for a frame unless they
        /// pass every check.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let codec = FrameCodec::new(64);
            if let Ok(Some((frame, used))) = codec.decode(&bytes) {
                prop_assert!(used <= bytes.len());
                prop_assert_eq!(frame.encode(), bytes[..used].to_vec());
            }
            let _ = codec.decode_exact(&bytes);
        }

        /// Mutated valid frames (flipped bits, overwritten bytes, truncation) are either
        /// rejected with an error or, if the mutation hit nothing checked, decode to exactly
        /// the bytes given.
        #[test]
        fn mutated_frames_are_rejected_or_exact(
            frame in arbitrary_frame(),
            flips in proptest::collection::vec((any::<usize>(), 0u8..8), 1..4),
            overwrite in proptest::option::of((any::<usize>(), any::<u8>())),
            truncate in proptest::option::of(any::<usize>()),
        ) {
            let codec = FrameCodec::new(1024);
            let mut bytes = frame.encode();
            for (at, bit) in flips {
                let at = at % bytes.len();
                bytes[at] ^= 1 << bit;
            }
            if let Some((at, value)) = overwrite {
                let at = at % bytes.len();
                bytes[at] = value;
            }
            if let Some(len) = truncate {
                bytes.truncate(len % (bytes.len() + 1));
            }
            match codec.decode(&bytes) {
                Ok(Some((decoded, used))) => {
                    prop_assert_eq!(decoded.encode(), bytes[..used].to_vec());
                }
                Ok(None) => prop_assert!(bytes.len() < frame.wire_len()),
                Err(_) => {}
            }
        }
    }
}
