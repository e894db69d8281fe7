//! The authentication exchange (`auth`) on a stream, with its time bound: the connecting side
//! proves its role and checks the server's proof; the accepting side checks the role's proof
//! and proves it holds the key too.

use std::time::Duration;

use futures_lite::io::{AsyncReadExt, AsyncWriteExt};
use glommio::net::TcpStream;

use super::auth::{self, Keys, Role, ANSWER_LEN, CHALLENGE_LEN, VERDICT_LEN};
use super::within;
use super::NetError;
use crate::config::AuthSection;

/// What one side of a connection authenticates with: its keys, and the role its outgoing
/// connections claim.
#[derive(Debug, Clone)]
pub struct Auth {
    /// The cluster secret, or one role's key.
    pub keys: Keys,
    /// The role outgoing connections claim.
    pub role: Role,
}

fn refused(label: &str, error: impl std::fmt::Display) -> NetError {
    NetError::Io {
        context: format!("{label}: authentication"),
        reason: error.to_string(),
    }
}

/// A fresh nonce from the operating system's randomness.
fn nonce(label: &str) -> Result<[u8; 32], NetError> {
    let mut nonce = [0u8; 32];
    getrandom::getrandom(&mut nonce).map_err(|e| refused(label, e))?;
    Ok(nonce)
}

/// The connecting side: answers the challenge as `auth.role`, checks the verdict.
pub async fn outgoing(
    stream: &mut TcpStream,
    auth: &Auth,
    label: &str,
    limit: Duration,
) -> Result<(), NetError> {
    within(limit, || format!("authentication of {label}"), async {
        let io = |e: std::io::Error| refused(label, e);
        let mut challenge = [0u8; CHALLENGE_LEN];
        stream.read_exact(&mut challenge).await.map_err(io)?;
        let client_nonce = nonce(label)?;
        let answer = auth::answer(&auth.keys, auth.role, &challenge, &client_nonce)
            .map_err(|e| refused(label, e))?;
        stream.write_all(&answer).await.map_err(io)?;
        let mut verdict = [0u8; VERDICT_LEN];
        stream.read_exact(&mut verdict).await.map_err(io)?;
        let mut server_nonce = [0u8; 32];
        server_nonce.copy_from_slice(&challenge[8..]);
        auth::check_verdict(
            &auth.keys,
            auth.role,
            (&server_nonce, &client_nonce),
            &verdict,
        )
        .map_err(|e| refused(label, e))
    })
    .await
}

/// The accepting side: challenges, checks the answer with `keys`, sends the verdict; the
/// role the other side proved.
pub async fn incoming(
    stream: &mut TcpStream,
    keys: &Keys,
    label: &str,
    limit: Duration,
) -> Result<Role, NetError> {
    within(limit, || format!("authentication of {label}"), async {
        let io = |e: std::io::Error| refused(label, e);
        let server_nonce = nonce(label)?;
        stream
            .write_all(&auth::challenge(&server_nonce))
            .await
            .map_err(io)?;
        let mut answer = [0u8; ANSWER_LEN];
        stream.read_exact(&mut answer).await.map_err(io)?;
        let (checked, verdict) = auth::check(keys, &server_nonce, &answer);
        stream.write_all(&verdict).await.map_err(io)?;
        checked.map_err(|e| refused(label, e))
    })
    .await
}

impl Auth {
    /// The keys `[auth]` names, read from their files, claiming `role` with the cluster secret
    /// (a role key claims its own role); `None` without `[auth]`. Refuses a file others may
    /// read, a secret under 32 bytes, a key that is not 64 hex digits.
    pub fn load(section: &AuthSection, role: Role) -> Result<Option<Auth>, String> {
        if let Some(path) = &section.secret_file {
            let secret = read_private(path)?;
            let secret = secret.trim_ascii_end().to_vec();
            if secret.len() < auth::MIN_SECRET_LEN {
                return Err(format!(
                    "{}: the cluster secret is {} bytes; it needs at least {} (e.g. `head -c 32 \
                     /dev/urandom | base64 > {}`)",
                    path.display(),
                    secret.len(),
                    auth::MIN_SECRET_LEN,
                    path.display()
                ));
            }
            return Ok(Some(Auth {
                keys: Keys::Secret(secret),
                role,
            }));
        }
        let Some(path) = &section.key_file else {
            return Ok(None);
        };
        let role = section
            .role
            .as_deref()
            .and_then(Role::parse)
            .ok_or_else(|| format!("{}: auth.role must name the key's role", path.display()))?;
        let text = read_private(path)?;
        let key = parse_key(text.trim_ascii()).ok_or_else(|| {
            format!(
                "{}: a role key is 64 hex digits (`chunkctl auth derive-key --role {}`)",
                path.display(),
                role.name()
            )
        })?;
        Ok(Some(Auth {
            keys: Keys::Role(role, key),
            role,
        }))
    }
}

/// The bytes of a file only its owner may read.
fn read_private(path: &std::path::Path) -> Result<Vec<u8>, String> {
    use std::os::unix::fs::PermissionsExt;
    let metadata =
        std::fs::metadata(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mode = metadata.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "{}: mode {mode:o} lets others read it; `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
}

fn parse_key(text: &[u8]) -> Option<[u8; 32]> {
    if text.len() != 64 {
        return None;
    }
    let mut key = [0u8; 32];
    for (i, pair) in text.chunks_exact(2).enumerate() {
        let pair = std::str::from_utf8(pair).ok()?;
        key[i] = u8::from_str_radix(pair, 16).ok()?;
    }
    Some(key)
}

/// A role key as its file holds it: 64 hex digits.
pub fn key_text(key: &[u8; 32]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use std::rc::Rc;
    use std::time::Duration;

    use bytes::Bytes;

    use super::{Auth, Keys, Role};
    use crate::config::Transport;
    use crate::net::auth::role_key;
    use crate::net::message_suite::{context, start_echo_server};
    use crate::net::test_kit::run_case;
    use crate::net::transport::connect;
    use crate::net::{Message, NetContext, Opcode};

    fn with_auth(keys: Keys, role: Role) -> NetContext {
        NetContext {
            auth: Some(Rc::new(Auth { keys, role })),
            ..context()
        }
    }

    fn secret(byte: u8) -> Keys {
        Keys::Secret(vec![byte; 32])
    }

    /// Over each transport: the secret's holder and a role key's holder get through; no
    /// key, another secret and a role key claiming another role do not.
    fn case(transport: Transport) {
        run_case(Duration::from_secs(60), move || async move {
            let server = with_auth(secret(7), Role::Peer);
            let (endpoint, _) = start_echo_server(transport, &server).await;
            let ping = |connection: crate::net::Connection| async move {
                connection
                    .call(Message::new(Opcode::PING, 0, Bytes::from_static(b"hi")))
                    .await
            };
            let admin = connect(&endpoint, &with_auth(secret(7), Role::Admin))
                .await
                .expect("the secret's holder connects");
            assert_eq!(&ping(admin).await.expect("echo").payload[..], b"hi");
            let client_key = Keys::Role(Role::Client, role_key(&[7; 32], Role::Client));
            let client = connect(&endpoint, &with_auth(client_key.clone(), Role::Client))
                .await
                .expect("a client key's holder connects as a client");
            assert_eq!(&ping(client).await.expect("echo").payload[..], b"hi");

            let wrong = connect(&endpoint, &with_auth(secret(8), Role::Admin)).await;
            let Err(error) = wrong else {
                panic!("another secret got through")
            };
            let error = error.to_string();
            assert!(
                error.contains("refused") || error.contains("proof"),
                "{error}"
            );
            let claimed = connect(&endpoint, &with_auth(client_key, Role::Admin)).await;
            assert!(
                claimed.is_err(),
                "a client key claiming the admin role got through"
            );

            // No keys at all: the challenge is not what it expects, and nothing is served.
            let mut none = context();
            none.connection.request_timeout = Duration::from_secs(2);
            if let Ok(connection) = connect(&endpoint, &none).await {
                assert!(
                    ping(connection).await.is_err(),
                    "served without authentication"
                );
            }
        });
    }

    #[test]
    fn tcp_connections_prove_their_role_or_are_refused() {
        case(Transport::Tcp);
    }

    #[test]
    fn softrdma_connections_prove_their_role_or_are_refused() {
        case(Transport::SoftRdma);
    }

    #[test]
    fn keys_are_read_from_private_files_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("temporary directory");
        let path = dir.path().join("cluster.secret");
        std::fs::write(&path, "0123456789abcdef0123456789abcdef\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let section = crate::config::AuthSection {
            secret_file: Some(path.clone()),
            ..Default::default()
        };
        let error = Auth::load(&section, Role::Peer).expect_err("a readable secret");
        assert!(error.contains("chmod 600"), "{error}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let auth = Auth::load(&section, Role::Peer)
            .expect("load")
            .expect("keys");
        assert!(matches!(auth.keys, Keys::Secret(ref s) if s.len() == 32));
        std::fs::write(&path, "short").expect("write");
        assert!(Auth::load(&section, Role::Peer).is_err());

        let key_path = dir.path().join("client.key");
        let key = role_key(b"0123456789abcdef0123456789abcdef", Role::Client);
        std::fs::write(&key_path, super::key_text(&key) + "\n").expect("write");
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let section = crate::config::AuthSection {
            key_file: Some(key_path),
            role: Some("client".into()),
            ..Default::default()
        };
        let auth = Auth::load(&section, Role::Admin)
            .expect("load")
            .expect("keys");
        assert_eq!(auth.role, Role::Client);
        assert_eq!(auth.keys.key_of(Role::Client), Some(key));
    }
}
