//! Round trips and malformed input for every body.

use bytes::{BufMut, Bytes, BytesMut};
use raftcore::NodeId;

use super::*;
use crate::ids::ChunkId;
use proptest::prelude::*;

#[test]
fn bodies_round_trip() {
    let batch = RaftBatch {
        messages: vec![
            (1, Bytes::from_static(b"abc")),
            (2, Bytes::from_static(b"")),
        ],
    };
    assert_eq!(RaftBatch::decode(&batch.encode()).unwrap(), batch);
    let read = ReadChunk {
        chunk: ChunkId(5),
        offset: 4096,
        len: 8192,
    };
    assert_eq!(ReadChunk::decode(&read.encode()).unwrap(), read);
    let create = CreateCopyset {
        peers: vec![NodeId(1), NodeId(2), NodeId(3)],
        join: false,
    };
    assert_eq!(CreateCopyset::decode(&create.encode()).unwrap(), create);
    let join = CreateCopyset {
        peers: vec![NodeId(1), NodeId(2), NodeId(3)],
        join: true,
    };
    assert_eq!(CreateCopyset::decode(&join.encode()).unwrap(), join);
    let status = CopysetStatus {
        role: 3,
        leader: 1,
        term: 4,
        commit: 9,
        applied: 8,
        membership: Membership {
            voters: vec![1, 2, 4],
            voters_outgoing: vec![1, 2, 3],
            learners: vec![5],
            learners_next: vec![],
        },
    };
    assert_eq!(CopysetStatus::decode(&status.encode()).unwrap(), status);
    assert_eq!(
        decode_copyset_list(&encode_copyset_list(&[3, 9])).unwrap(),
        vec![3, 9]
    );
    for status in [
        Status::Redirect { leader: 3 },
        Status::CopysetNotFound,
        Status::Invalid("offset".into()),
        Status::Retry("leader changed".into()),
    ] {
        assert_eq!(
            decode_response(&encode_response(&status, &[])).unwrap().0,
            status
        );
    }
    let (status, body) = decode_response(&encode_response(&Status::Ok, b"data")).unwrap();
    assert_eq!((status, &body[..]), (Status::Ok, &b"data"[..]));
}

#[test]
fn malformed_bodies_are_errors() {
    assert!(ReadChunk::decode(&[0; 19]).is_err());
    assert!(ReadChunk::decode(&[0; 21]).is_err());
    assert!(CreateCopyset::decode(&[0, 0]).is_err(), "no peers");
    assert!(
        CreateCopyset::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err(),
        "peer 0"
    );
    let mut batch = BytesMut::new();
    batch.put_u32_le(1);
    batch.put_u64_le(1);
    batch.put_u32_le(100);
    assert!(
        RaftBatch::decode(&batch.freeze()).is_err(),
        "length past the end"
    );
    assert!(decode_response(&Bytes::from_static(&[99])).is_err());
}

proptest! {
    #[test]
    fn decoders_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        let bytes = Bytes::from(bytes);
        let _ = RaftBatch::decode(&bytes);
        let _ = ReadChunk::decode(&bytes);
        let _ = CreateCopyset::decode(&bytes);
        let _ = CopysetStatus::decode(&bytes);
        let _ = decode_response(&bytes);
        let _ = decode_copyset_list(&bytes);
        let _ = ImageList::decode(&bytes);
        let _ = ResetPeers::decode(&bytes);
        let _ = ReadSnapshot::decode(&bytes);
        let _ = ReadImagePiece::decode(&bytes);
        let _ = ImagePieceHeader::decode(&bytes);
    }
}

#[test]
fn reset_peers_round_trips_and_refuses_an_empty_list() {
    let reset = ResetPeers {
        peers: vec![NodeId(1), NodeId(4)],
        confirm: true,
        token: b"0123456789abcdef".to_vec(),
    };
    assert_eq!(ResetPeers::decode(&reset.encode()), Ok(reset));
    // An older client's body (the ids alone) confirms nothing and carries no token.
    let old = ResetPeers::decode(&[1, 0, 2, 0, 0, 0, 0, 0, 0, 0]).expect("ids alone");
    assert_eq!((old.confirm, old.token.len()), (false, 0));
    assert!(ResetPeers::decode(&[0, 0]).is_err());
    assert!(ResetPeers::decode(&[1, 0, 0, 0, 0, 0, 0, 0, 0, 0]).is_err());
}

#[test]
fn image_messages_round_trip_and_refuse_bad_flags() {
    let list = ImageList {
        applied: 77,
        chunk_size: 1 << 20,
        clone_epoch: 3,
        chunks: vec![ChunkId(3), ChunkId(9)],
    };
    assert_eq!(ImageList::decode(&list.encode()), Ok(list));
    let request = ReadImagePiece {
        chunk: ChunkId(5),
        part: 1,
        offset: 1 << 20,
        len: 4096,
    };
    assert_eq!(ReadImagePiece::decode(&request.encode()), Ok(request));
    let mut bad = request.encode().to_vec();
    bad[8] = 2;
    assert!(ReadImagePiece::decode(&bad).is_err(), "part 2");
    let header = ImagePieceHeader {
        source_applied: 10,
        sn: 2,
        corrected_sn: 0,
        snapshot_sn: Some(1),
        applied: 9,
        clone_source: Some(ChunkId(4)),
        clone_epoch: 2,
        zero: false,
    };
    let mut body = BytesMut::new();
    header.encode(&mut body);
    assert_eq!(body.len(), IMAGE_PIECE_HEADER_LEN);
    body.extend_from_slice(b"page");
    let (decoded, data) = ImagePieceHeader::decode(&body.clone().freeze()).unwrap();
    assert_eq!((decoded, &data[..]), (header, &b"page"[..]));
    let mut zero = BytesMut::new();
    ImagePieceHeader {
        zero: true,
        ..header
    }
    .encode(&mut zero);
    zero.extend_from_slice(b"x");
    assert!(
        ImagePieceHeader::decode(&zero.freeze()).is_err(),
        "a zero piece with bytes"
    );
}
