//! Messages from the network may be anything that decodes: none of them may panic a peer,
//! whatever its role. (Safety against a lying peer is not the goal — raft trusts its peers —
//! but a malformed or replayed message must never crash the process.)

mod common;

use bytes::Bytes;
use common::{default_config, Cluster};
use proptest::prelude::*;
use raftcore::{
    ConfState, Entry, EntryKind, LogIndex, Message, MessageType, NodeId, SnapshotChunk,
    SnapshotMeta, Term,
};

fn small_or_huge() -> impl Strategy<Value = u64> {
    prop_oneof![0u64..12, Just(u64::MAX), Just(u64::MAX - 1), any::<u64>()]
}

prop_compose! {
    fn hostile(to: u64)(
        code in 1u8..=11,
        from in 1u64..=4,
        term in small_or_huge(),
        log_term in small_or_huge(),
        index in small_or_huge(),
        commit in small_or_huge(),
        hint in small_or_huge(),
        seq in small_or_huge(),
        tick in small_or_huge(),
        offset in small_or_huge(),
        flags in (any::<bool>(), any::<bool>(), any::<bool>()),
        entries in proptest::collection::vec((small_or_huge(), small_or_huge(), any::<bool>()), 0..4),
        snapshot in proptest::option::of((small_or_huge(), small_or_huge(), small_or_huge(),
            small_or_huge(), proptest::collection::vec(any::<u8>(), 0..8))),
    ) -> Message {
        let msg_type = MessageType::from_code(code).expect("valid code");
        let mut msg = Message::new(msg_type, NodeId(from), NodeId(to), Term(term));
        msg.log_term = Term(log_term);
        msg.index = LogIndex(index);
        msg.commit = LogIndex(commit);
        msg.reject_hint = LogIndex(hint);
        msg.read_seq = seq;
        msg.sent_tick = tick;
        msg.snapshot_offset = offset;
        (msg.reject, msg.transfer, msg.quiesce) = flags;
        msg.entries = entries
            .into_iter()
            .map(|(term, index, conf)| Entry {
                term: Term(term),
                index: LogIndex(index),
                kind: if conf { EntryKind::ConfChange } else { EntryKind::Normal },
                data: Bytes::from_static(b"hostile"),
            })
            .collect();
        msg.snapshot = snapshot.map(|(index, term, offset, total, data)| {
            Box::new(SnapshotChunk {
                meta: SnapshotMeta {
                    index: LogIndex(index),
                    term: Term(term),
                    conf_state: ConfState {
                        voters: [NodeId(1), NodeId(2), NodeId(3)].into_iter().collect(),
                        ..ConfState::default()
                    },
                },
                offset,
                total_len: total,
                data: Bytes::from(data),
            })
        });
        msg
    }
}

fn settled_cluster() -> Cluster {
    let mut c = Cluster::new(&[1, 2, 3], default_config);
    c.elect(1);
    c.propose(1, b"a");
    c.propose(1, b"b");
    c.tick_all(3);
    c
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn hostile_messages_never_panic_a_leader(msgs in proptest::collection::vec(hostile(1), 1..8)) {
        let mut c = settled_cluster();
        for msg in msgs {
            let _ = c.node(1).step(msg);
            c.take_messages(1);
        }
        c.tick_all(3);
    }

    #[test]
    fn hostile_messages_never_panic_a_follower(msgs in proptest::collection::vec(hostile(2), 1..8)) {
        let mut c = settled_cluster();
        for msg in msgs {
            let _ = c.node(2).step(msg);
            c.take_messages(2);
        }
        c.tick_all(3);
    }
}
