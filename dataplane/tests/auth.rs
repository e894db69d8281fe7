//! Authentication with the servers (issue 22): three chunkservers on loopback with the cluster
//! secret in `[auth]`. The secret's holder (admin) creates a copyset and writes; a client
//! key's holder reads and writes but cannot change membership or delete; a client without keys
//! or with another secret gets nothing done.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::{block, config, free_ports, Node};
use dataplane::client::{Client, ClientConfig, ClientError};
use dataplane::config::AuthSection;
use dataplane::ids::{ChunkId, CopysetId};
use dataplane::net::auth::{role_key, Keys, Role};
use dataplane::net::handshake::Auth;

const COPYSET: CopysetId = CopysetId(11);
const SECRET: &[u8] = b"a cluster secret of more than thirty-two bytes";

/// Runs `body` with a client proving `auth`'s role (or nothing).
fn run<T: Send + 'static>(
    ports: &[u16],
    auth: Option<Auth>,
    body: impl FnOnce(Client) -> std::pin::Pin<Box<dyn std::future::Future<Output = T>>>
        + Send
        + 'static,
) -> T {
    let config = ClientConfig {
        deadline: Duration::from_secs(8),
        auth,
        ..ClientConfig::default()
    };
    common::with_client_config(common::addresses(ports), config, body)
}

#[test]
fn only_holders_of_the_secret_or_a_role_key_get_in_and_roles_bound_what_they_do() {
    let dir = tempfile::tempdir().expect("temporary directory");
    let secret_file = dir.path().join("cluster.secret");
    std::fs::write(&secret_file, SECRET).expect("write the secret");
    std::fs::set_permissions(&secret_file, std::fs::Permissions::from_mode(0o600))
        .expect("chmod 600");
    let ports = free_ports(7);
    let metrics: std::net::SocketAddr = format!("127.0.0.1:{}", ports[6]).parse().expect("address");
    let mut nodes: Vec<Node> = (1..=3)
        .map(|id| {
            let mut config = config(id, &ports, dir.path(), "mem");
            config.auth = AuthSection {
                secret_file: Some(secret_file.clone()),
                ..AuthSection::default()
            };
            if id == 1 {
                config.metrics.address = Some(metrics);
            }
            Node::start(config)
        })
        .collect();
    let admin = Auth {
        keys: Keys::Secret(SECRET.to_vec()),
        role: Role::Admin,
    };
    let client = Auth {
        keys: Keys::Role(Role::Client, role_key(SECRET, Role::Client)),
        role: Role::Client,
    };

    run(&ports, Some(admin), |c| {
        Box::pin(async move {
            c.create_copyset(COPYSET, &[1, 2, 3])
                .await
                .expect("the admin creates a copyset");
            c.write(COPYSET, ChunkId(1), 0, block(1), 1)
                .await
                .expect("the admin writes");
        })
    });
    run(&ports, Some(client), |c| {
        Box::pin(async move {
            c.set_peers(COPYSET, &[1, 2, 3]);
            c.write(COPYSET, ChunkId(1), 4096, block(2), 1)
                .await
                .expect("a client writes");
            assert_eq!(
                c.read(COPYSET, ChunkId(1), 0, 4096)
                    .await
                    .expect("a client reads"),
                block(1)
            );
            let refused = c.remove_peer(COPYSET, 3).await;
            match refused {
                Err(ClientError::Refused { status, .. }) => {
                    assert!(format!("{status:?}").contains("client role"), "{status:?}");
                }
                other => panic!("a client changed membership: {other:?}"),
            }
            assert!(
                c.delete_copyset(COPYSET, 3).await.is_err(),
                "a client deleted a replica"
            );
        })
    });
    for (what, auth) in [
        ("no keys", None),
        (
            "another secret",
            Some(Auth {
                keys: Keys::Secret(vec![9; 40]),
                role: Role::Admin,
            }),
        ),
    ] {
        run(&ports, auth, move |c| {
            Box::pin(async move {
                c.set_peers(COPYSET, &[1, 2, 3]);
                assert!(
                    c.read(COPYSET, ChunkId(1), 0, 4096).await.is_err(),
                    "a client with {what} read"
                );
            })
        });
    }
    // The metrics endpoint asks for a key too: the client's reads, nothing reads without.
    let get = |token: Option<String>| {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(metrics).expect("connect to metrics");
        let header = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
        stream
            .write_all(format!("GET /metrics HTTP/1.1\r\n{header}\r\n").as_bytes())
            .expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("read");
        response
    };
    assert!(
        get(None).starts_with("HTTP/1.1 401"),
        "metrics without a key"
    );
    let client_key = dataplane::net::handshake::key_text(&role_key(SECRET, Role::Client));
    assert!(
        get(Some(client_key)).starts_with("HTTP/1.1 200"),
        "metrics with the client key"
    );
    for node in &mut nodes {
        node.stop();
    }
}
