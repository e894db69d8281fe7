//! The volume table, replicated in the metadata copyset of three in-process chunkservers:
//! volumes are created once by name (two clients racing for one name: one wins), listed,
//! found by any client, written and read through, and deleted with their chunks; the table
//! survives the loss of the metadata copyset's leader.

mod common;

use std::rc::Rc;
use std::time::Duration;

use common::{block, config, free_ports, with_client, Node};
use dataplane::ids::CopysetId;
use dataplane::nbd::Export;
use dataplane::volume::{
    create_volume, delete_volume, ensure_metadata_copyset, find_volume, list_volumes, Volume,
    VolumeError, VolumeSpec,
};
use dataplane::volume_table::{TableError, VolumeLayout, VolumeRecord, METADATA_COPYSET};

fn first_chunk(volume: &VolumeRecord) -> dataplane::ids::ChunkId {
    match volume.layout {
        VolumeLayout::Single { first_chunk, .. } => first_chunk,
        VolumeLayout::Striped { .. } => panic!("{} is striped", volume.name),
    }
}

#[test]
fn volumes_are_created_once_listed_found_used_and_deleted() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let ports = free_ports(6);
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| Node::start(config(id, &ports, dir.path(), "mem")))
        .collect();
    let data = CopysetId(5);
    let leader = with_client(&ports, move |client| {
        Box::pin(async move {
            let client = Rc::new(client);
            ensure_metadata_copyset(&client, &[1, 2, 3])
                .await
                .expect("metadata copyset");
            client
                .create_copyset(data, &[1, 2, 3])
                .await
                .expect("data copyset");
            assert!(list_volumes(&client).await.expect("list").is_empty());
            // Two creators race for one name: exactly one wins.
            let racers: Vec<_> = (0..2)
                .map(|_| {
                    let client = Rc::clone(&client);
                    glommio::spawn_local(async move {
                        create_volume(&client, "vol", 4 << 20, data).await
                    })
                })
                .collect();
            let mut outcomes = Vec::new();
            for racer in racers {
                outcomes.push(racer.await);
            }
            assert_eq!(
                outcomes.iter().filter(|o| o.is_ok()).count(),
                1,
                "{outcomes:?}"
            );
            assert!(outcomes.iter().any(|o| matches!(
                o,
                Err(VolumeError::Table(TableError::Exists(name))) if name == "vol"
            )));
            let vol = find_volume(&client, "vol").await.expect("find vol");
            let other = create_volume(&client, "other", 2 << 20, data)
                .await
                .expect("create other");
            assert_eq!(
                first_chunk(&other).0,
                first_chunk(&vol).0 + vol.chunks(),
                "volumes never share chunks"
            );
            let names: Vec<String> = list_volumes(&client)
                .await
                .expect("list")
                .into_iter()
                .map(|v| v.name)
                .collect();
            assert_eq!(names, vec!["vol".to_string(), "other".to_string()]);
            // Written through one volume, read through a volume opened from the table again.
            let volume = Volume::new(VolumeSpec::from(vol.clone()), Rc::clone(&client));
            volume
                .write(1 << 20, block(7), false)
                .await
                .expect("write the volume");
            let reopened = Volume::new(
                VolumeSpec::from(find_volume(&client, "vol").await.expect("find")),
                Rc::clone(&client),
            );
            assert_eq!(reopened.read(1 << 20, 4096).await.expect("read"), block(7));
            // Deleted with its chunks; the name is free again and its chunks read as zeroes.
            delete_volume(&client, "vol").await.expect("delete");
            assert!(matches!(
                find_volume(&client, "vol").await,
                Err(VolumeError::Table(TableError::NotFound(_)))
            ));
            let data_bytes = client
                .read(data, first_chunk(&vol), 0, 4096)
                .await
                .expect("read a deleted volume's chunk");
            assert!(data_bytes.iter().all(|b| *b == 0));
            client.cached_leader(METADATA_COPYSET).expect("leader")
        })
    });
    // The metadata copyset's leader stops: the table is served by the new one.
    nodes[leader as usize - 1].stop();
    with_client(&ports, move |client| {
        Box::pin(async move {
            client.set_peers(METADATA_COPYSET, &[1, 2, 3]);
            let started = std::time::Instant::now();
            let names: Vec<String> = loop {
                match list_volumes(&client).await {
                    Ok(list) => break list.into_iter().map(|v| v.name).collect(),
                    Err(error) => assert!(
                        started.elapsed() < Duration::from_secs(20),
                        "no new leader serves the table: {error}"
                    ),
                }
            };
            assert_eq!(names, vec!["other".to_string()]);
        })
    });
    for node in &mut nodes {
        node.stop();
    }
}
