//! The message codec: every message round-trips, and no input — random bytes or a valid
//! encoding with bytes flipped, cut or inserted — makes the decoder panic.

use bytes::Bytes;
use proptest::prelude::*;
use raftcore::{
    decode, encode_to_bytes, ConfState, DecodeError, Entry, EntryKind, LogIndex, Message,
    MessageType, NodeId, SnapshotChunk, SnapshotMeta, Term,
};

fn message_type() -> impl Strategy<Value = MessageType> {
    (1u8..=11).prop_map(|code| MessageType::from_code(code).expect("valid code"))
}

fn entry() -> impl Strategy<Value = Entry> {
    (
        any::<u64>(),
        any::<u64>(),
        any::<bool>(),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(term, index, conf, data)| Entry {
            term: Term(term),
            index: LogIndex(index),
            kind: if conf {
                EntryKind::ConfChange
            } else {
                EntryKind::Normal
            },
            data: Bytes::from(data),
        })
}

fn ids() -> impl Strategy<Value = std::collections::BTreeSet<NodeId>> {
    proptest::collection::btree_set(any::<u64>().prop_map(NodeId), 0..5)
}

fn snapshot_chunk() -> impl Strategy<Value = Option<Box<SnapshotChunk>>> {
    proptest::option::of(
        (
            any::<u64>(),
            any::<u64>(),
            ids(),
            ids(),
            ids(),
            any::<bool>(),
            any::<u64>(),
            proptest::collection::vec(any::<u8>(), 0..64),
        )
            .prop_map(
                |(index, term, voters, outgoing, learners, auto_leave, offset, data)| {
                    Box::new(SnapshotChunk {
                        meta: SnapshotMeta {
                            index: LogIndex(index),
                            term: Term(term),
                            conf_state: ConfState {
                                voters,
                                voters_outgoing: outgoing,
                                learners,
                                learners_next: Default::default(),
                                auto_leave,
                            },
                        },
                        offset,
                        total_len: offset.wrapping_add(data.len() as u64),
                        data: Bytes::from(data),
                    })
                },
            ),
    )
}

prop_compose! {
    fn message()(
        msg_type in message_type(),
        header in (any::<u64>(), any::<u64>(), any::<u64>()),
        fields in proptest::array::uniform7(prop_oneof![Just(0u64), any::<u64>()]),
        flags in (any::<bool>(), any::<bool>(), any::<bool>()),
        entries in proptest::collection::vec(entry(), 0..4),
        snapshot in snapshot_chunk(),
    ) -> Message {
        let mut msg = Message::new(msg_type, NodeId(header.0), NodeId(header.1), Term(header.2));
        msg.log_term = Term(fields[0]);
        msg.index = LogIndex(fields[1]);
        msg.commit = LogIndex(fields[2]);
        msg.reject_hint = LogIndex(fields[3]);
        msg.read_seq = fields[4];
        msg.sent_tick = fields[5];
        msg.snapshot_offset = fields[6];
        msg.reject = flags.0;
        msg.transfer = flags.1;
        msg.quiesce = flags.2;
        msg.entries = entries;
        msg.snapshot = snapshot;
        msg
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_roundtrips_and_its_length_is_predicted(msg in message()) {
        let bytes = encode_to_bytes(&msg);
        prop_assert_eq!(bytes.len(), raftcore::codec::encoded_len(&msg) - unused_fields(&msg) * 8);
        prop_assert_eq!(decode(bytes), Ok(msg));
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..256)) {
        let _ = decode(Bytes::from(data));
    }

    #[test]
    fn mutated_encodings_never_panic(
        msg in message(),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4),
        cut in any::<usize>(),
        insert in proptest::option::of((any::<usize>(), any::<u8>())),
    ) {
        let mut bytes = encode_to_bytes(&msg).to_vec();
        for (at, value) in flips {
            let at = at % bytes.len();
            bytes[at] ^= value;
        }
        if let Some((at, value)) = insert {
            let at = at % (bytes.len() + 1);
            bytes.insert(at, value);
        }
        let _ = decode(Bytes::from(bytes.clone()));
        bytes.truncate(cut % (bytes.len() + 1));
        let _ = decode(Bytes::from(bytes));
    }
}

/// `encoded_len` reserves room for every optional u64 field; the encoding skips zeros.
fn unused_fields(msg: &Message) -> usize {
    [
        msg.log_term.0,
        msg.index.0,
        msg.commit.0,
        msg.reject_hint.0,
        msg.read_seq,
        msg.sent_tick,
        msg.snapshot_offset,
    ]
    .iter()
    .filter(|v| **v == 0)
    .count()
}

#[test]
fn malformed_inputs_are_named_errors() {
    let mut msg = Message::new(MessageType::Append, NodeId(1), NodeId(2), Term(3));
    msg.entries.push(Entry {
        term: Term(3),
        index: LogIndex(4),
        kind: EntryKind::Normal,
        data: Bytes::from_static(b"payload"),
    });
    let good = encode_to_bytes(&msg).to_vec();
    let with = |at: usize, value: u8| {
        let mut bytes = good.clone();
        bytes[at] = value;
        decode(Bytes::from(bytes))
    };
    assert_eq!(with(0, 9), Err(DecodeError::Version(9)));
    assert_eq!(with(1, 200), Err(DecodeError::MessageType(200)));
    assert!(matches!(
        with(2, 0x80),
        Err(DecodeError::UnknownBits { what: "flags", .. })
    ));
    assert!(matches!(
        with(3, 0x80),
        Err(DecodeError::UnknownBits {
            what: "field mask",
            ..
        })
    ));
    let truncated = decode(Bytes::copy_from_slice(&good[..good.len() - 1]));
    assert!(matches!(
        truncated,
        Err(DecodeError::Length {
            what: "entry data",
            ..
        })
    ));
    let header_only = decode(Bytes::copy_from_slice(&good[..10]));
    assert!(matches!(
        header_only,
        Err(DecodeError::Truncated { what: "from", .. })
    ));
    let mut trailing = good.clone();
    trailing.push(0);
    assert_eq!(decode(Bytes::from(trailing)), Err(DecodeError::Trailing(1)));
    // An entry count far beyond the input is refused before any allocation.
    let count_at = 4 + 24;
    let mut huge = good.clone();
    huge[count_at..count_at + 4].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(
        decode(Bytes::from(huge)),
        Err(DecodeError::Length { .. })
    ));
}

#[test]
fn a_heartbeat_encodes_compactly() {
    let mut msg = Message::new(MessageType::Heartbeat, NodeId(1), NodeId(2), Term(3));
    msg.commit = LogIndex(10);
    msg.sent_tick = 99;
    assert_eq!(encode_to_bytes(&msg).len(), 4 + 24 + 16);
}
