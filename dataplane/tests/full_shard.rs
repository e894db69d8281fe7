//! A shard running out of chunk slots refuses new chunks with a clear error instead of
//! stalling the copyset: three in-process chunkservers with small memory devices (about 78
//! slots of 1 MiB each), one copyset written chunk after chunk until the leader refuses; the
//! copyset still serves and writes its existing chunks afterwards.

mod common;

use common::{block, config, free_ports, with_client, Node};
use dataplane::client::ClientError;
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::protocol::Status;

#[test]
fn a_full_shard_refuses_new_chunks_and_keeps_serving_the_others() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    with_client(&ports, move |client| {
        Box::pin(async move {
            let copyset = CopysetId(9);
            client
                .create_copyset(copyset, &[1, 2, 3])
                .await
                .expect("copyset");
            let mut made = 0u64;
            let refusal = loop {
                match client
                    .write(copyset, ChunkId(made), 0, block(made), 1)
                    .await
                {
                    Ok(()) => made += 1,
                    Err(error) => break error,
                }
                assert!(made < 1000, "never refused");
            };
            match &refusal {
                ClientError::Refused {
                    status: Status::Invalid(reason),
                    ..
                } => assert!(reason.contains("no room for a new chunk"), "{reason}"),
                other => panic!("refused otherwise: {other}"),
            }
            assert!(made > 40, "refused early, after {made} chunks");
            // Not stalled: the existing chunks take writes and reads, a new one is refused
            // again with the same answer.
            for chunk in [0, made / 2, made - 1] {
                client
                    .write(copyset, ChunkId(chunk), 4096, block(chunk + 500), 1)
                    .await
                    .expect("a write to an existing chunk");
                let read = client.read(copyset, ChunkId(chunk), 4096, 4096).await;
                assert_eq!(read.expect("read"), block(chunk + 500));
            }
            assert!(client
                .write(copyset, ChunkId(made + 7), 0, block(1), 1)
                .await
                .is_err());
            // Room comes back with a delete.
            client.delete(copyset, ChunkId(0), 0).await.expect("delete");
            client
                .write(copyset, ChunkId(made + 7), 0, block(2), 1)
                .await
                .expect("a new chunk once a slot is free");
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
