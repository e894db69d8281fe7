//! Every decoder of bytes that come from the network or the disk, fed arbitrary bytes (issue
//! 22): an error, never a panic. CI runs `FRAME_FUZZ_CASES` inputs per property (default 2000,
//! fixed seed); `scripts/fuzz-decoders` runs many more with a fresh seed, printed for replay.
//! The frame decoder's own properties (mutated frames, round trips) are in `protocol::frame`,
//! the WAL record's in `storage::wal::record`.

use bytes::Bytes;
use proptest::prelude::*;

use crate::placement::snapshots::{decode_bitmap, SnapshotTable};
use crate::placement::tables::{decode_node, PoolCopyset, SegmentRecord, Settings};
use crate::protocol::placement::{
    decode, Heartbeat, HeartbeatReply, Operators, OperatorsRequest, Topology,
};

/// Inputs per property (2000 in CI); `FRAME_FUZZ_CASES` raises it.
pub(crate) fn cases() -> u32 {
    std::env::var("FRAME_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// The seed; `FRAME_FUZZ_SEED` replays or varies it. A failing case prints its minimal input,
/// and rerunning with the same seed reproduces it.
pub(crate) fn seed() -> u64 {
    std::env::var("FRAME_FUZZ_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_dec0de)
}

/// Arbitrary bytes up to `max` long, most of them short.
fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => proptest::collection::vec(any::<u8>(), 0..64),
        1 => proptest::collection::vec(any::<u8>(), 0..max),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        rng_algorithm: proptest::test_runner::RngAlgorithm::ChaCha,
        rng_seed: proptest::test_runner::RngSeed::Fixed(seed()),
        ..ProptestConfig::default()
    })]

    /// What clients and peers send as request bodies, and what servers answer.
    #[test]
    fn request_and_response_bodies(input in bytes(600)) {
        let input = Bytes::from(input);
        let _ = crate::copyset::ChunkOp::decode(&input);
        let _ = crate::placement::meta::MetaOp::decode(&input);
        let _ = crate::scrub::RangeSums::decode(&input);
        let _ = crate::protocol::RaftBatch::decode(&input);
        let _ = crate::protocol::decode_response(&input);
        let _ = crate::protocol::ImagePieceHeader::decode(&input);
        let _ = decode::<Heartbeat>(&input);
        let _ = decode::<HeartbeatReply>(&input);
        let _ = decode::<Topology>(&input);
        let _ = decode::<Operators>(&input);
        let _ = decode::<OperatorsRequest>(&input);
        let _ = crate::net::verbs::QpEndpoint::decode(&input);
    }

    /// What an NBD client sends: option headers, INFO/GO bodies, requests.
    #[test]
    fn nbd_messages(input in bytes(300), header in any::<[u8; 16]>(),
                    request in proptest::collection::vec(any::<u8>(), crate::nbd::protocol::REQUEST_LEN)) {
        use crate::nbd::protocol::{decode_info_request, decode_option_header, decode_request, REQUEST_LEN};
        let _ = decode_option_header(&header);
        let _ = decode_info_request(&input);
        let mut fixed = [0u8; REQUEST_LEN];
        fixed.copy_from_slice(&request);
        let _ = decode_request(&fixed);
    }

    /// The authentication exchange's messages, whatever the other side sends.
    #[test]
    fn authentication_messages(challenge in proptest::collection::vec(any::<u8>(), 40),
                               answer in proptest::collection::vec(any::<u8>(), 65)) {
        use crate::net::auth::{answer as answer_to, check, Keys, Role};
        let keys = Keys::Secret(vec![7; 32]);
        let mut c = [0u8; 40];
        c.copy_from_slice(&challenge);
        let _ = answer_to(&keys, Role::Client, &c, &[1; 32]);
        let mut a = [0u8; 65];
        a.copy_from_slice(&answer);
        let (role, _) = check(&keys, &[2; 32], &a);
        prop_assert!(role.is_err(), "an arbitrary answer was accepted");
    }

    /// What the disk holds: the superblock, the placement and volume tables, snapshot tables
    /// and bitmaps.
    #[test]
    fn pages_and_records_from_the_disk(input in bytes(5000), seq in any::<u64>()) {
        let _ = crate::storage::layout::Superblock::decode(&input);
        let _ = Settings::decode(&input);
        let _ = PoolCopyset::decode(&input);
        let _ = decode_node(&input);
        let _ = SegmentRecord::decode(&input);
        let _ = crate::volume_table::VolumeRecord::decode(&input);
        let _ = SnapshotTable::decode(&input);
        let _ = decode_bitmap(&input, seq);
    }
}
