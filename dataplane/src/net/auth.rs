//! Who is on the other end of a connection: a mutual challenge–response over the connection's
//! first bytes, before any frame (issue 22). The cluster has one secret; each role's key is
//! derived from it, so a file holding a role key (what a client machine gets) lets its holder
//! be that role and no other, while the secret itself (servers, admins) gives every role.
//!
//! The exchange (docs/protocol.md, "Authentication"), on the stream that then carries frames
//! (TCP) or the out-of-band stream of an RDMA set-up:
//! 1. the accepting side sends a challenge: magic `CSA1`, version 1, three zero bytes, a
//!    32-byte random nonce (40 bytes);
//! 2. the connecting side answers with its role (u8), its own 32-byte nonce and
//!    HMAC-SHA256(role key, "chunkserver auth client" | server nonce | client nonce | role)
//!    (65 bytes);
//! 3. the accepting side checks it and answers 0 and HMAC-SHA256(role key, "chunkserver auth
//!    server" | client nonce | server nonce | role), or 1 and 32 zero bytes (33 bytes), then
//!    closes; the connecting side checks the server's proof, so it knows it reached a holder
//!    of the key too.
//!
//! Every nonce is fresh from the operating system's randomness, so a recorded answer is
//! worthless against the next challenge (no replay). HMAC is a few microseconds per
//! connection and costs nothing per frame; TLS would encrypt every byte of the data path too
//! (docs/architecture.md, "Authentication", says why this is the choice).

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

pub use crate::protocol::access::Role;

/// The smallest cluster secret accepted.
pub const MIN_SECRET_LEN: usize = 32;
/// Length of the challenge.
pub const CHALLENGE_LEN: usize = 40;
/// Length of the answer.
pub const ANSWER_LEN: usize = 65;
/// Length of the verdict.
pub const VERDICT_LEN: usize = 33;
const MAGIC: &[u8; 4] = b"CSA1";
const VERSION: u8 = 1;

/// The keys one side holds: the cluster secret (every role), or one role's key.
#[derive(Clone)]
pub enum Keys {
    /// The cluster secret.
    Secret(Vec<u8>),
    /// One role's key (derived from the secret with [`role_key`]).
    Role(Role, [u8; 32]),
}

impl std::fmt::Debug for Keys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Keys::Secret(_) => write!(f, "Keys::Secret(..)"),
            Keys::Role(role, _) => write!(f, "Keys::Role({}, ..)", role.name()),
        }
    }
}

impl Keys {
    /// The key of `role`, if these keys give it.
    pub fn key_of(&self, role: Role) -> Option<[u8; 32]> {
        match self {
            Keys::Secret(secret) => Some(role_key(secret, role)),
            Keys::Role(mine, key) if *mine == role => Some(*key),
            Keys::Role(..) => None,
        }
    }
}

/// The key of `role` derived from the cluster `secret`.
pub fn role_key(secret: &[u8], role: Role) -> [u8; 32] {
    mac(secret, &[b"chunkserver role key ", role.name().as_bytes()])
}

fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes a key of any length.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC-SHA256 accepts keys of every length"),
    };
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// The connecting side's proof: it holds `key` and answers this very challenge.
fn client_proof(key: &[u8; 32], server_nonce: &[u8], client_nonce: &[u8], role: Role) -> [u8; 32] {
    let role = [role.code()];
    mac(
        key,
        &[
            b"chunkserver auth client",
            server_nonce,
            client_nonce,
            &role,
        ],
    )
}

/// The accepting side's proof: it holds `key` too, and answers this very answer.
fn server_proof(key: &[u8; 32], client_nonce: &[u8], server_nonce: &[u8], role: Role) -> [u8; 32] {
    let role = [role.code()];
    mac(
        key,
        &[
            b"chunkserver auth server",
            client_nonce,
            server_nonce,
            &role,
        ],
    )
}

/// The 32 proof bytes that end `bytes`.
fn proof_in(bytes: &[u8]) -> [u8; 32] {
    let mut proof = [0u8; 32];
    proof.copy_from_slice(&bytes[bytes.len() - 32..]);
    proof
}

/// Compares in time that does not depend on where the bytes differ.
fn same(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The challenge the accepting side sends.
pub fn challenge(server_nonce: &[u8; 32]) -> [u8; CHALLENGE_LEN] {
    let mut out = [0u8; CHALLENGE_LEN];
    out[..4].copy_from_slice(MAGIC);
    out[4] = VERSION;
    out[8..].copy_from_slice(server_nonce);
    out
}

/// Why a handshake failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The other side does not speak this exchange (or speaks another version).
    #[error("not a chunkserver authentication challenge (magic or version differ)")]
    NotAChallenge,
    /// These keys do not give the role asked for.
    #[error("the configured key does not give the {0} role")]
    NoKeyFor(&'static str),
    /// The answer names no role.
    #[error("unknown role code {0}")]
    UnknownRole(u8),
    /// The answer's proof does not hold: the peer does not hold the role's key.
    #[error("the {0} proof does not hold: the other side has another secret")]
    BadProof(&'static str),
    /// The accepting side refused.
    #[error("refused by the server: its secret is another (or it refuses the {0} role)")]
    Refused(&'static str),
}

/// The connecting side's answer to `challenge`, as `role`, with its fresh `client_nonce`.
pub fn answer(
    keys: &Keys,
    role: Role,
    challenge: &[u8; CHALLENGE_LEN],
    client_nonce: &[u8; 32],
) -> Result<[u8; ANSWER_LEN], AuthError> {
    if &challenge[..4] != MAGIC || challenge[4] != VERSION {
        return Err(AuthError::NotAChallenge);
    }
    let key = keys.key_of(role).ok_or(AuthError::NoKeyFor(role.name()))?;
    let server_nonce = &challenge[8..];
    let proof = client_proof(&key, server_nonce, client_nonce, role);
    let mut out = [0u8; ANSWER_LEN];
    out[0] = role.code();
    out[1..33].copy_from_slice(client_nonce);
    out[33..].copy_from_slice(&proof);
    Ok(out)
}

/// The accepting side's check of `answer` to its challenge with `server_nonce`: the role, and
/// the verdict to send (a refusal is sent too, then the connection closes).
pub fn check(
    keys: &Keys,
    server_nonce: &[u8; 32],
    answer: &[u8; ANSWER_LEN],
) -> (Result<Role, AuthError>, [u8; VERDICT_LEN]) {
    let mut refusal = [0u8; VERDICT_LEN];
    refusal[0] = 1;
    let Some(role) = Role::from_code(answer[0]) else {
        return (Err(AuthError::UnknownRole(answer[0])), refusal);
    };
    let Some(key) = keys.key_of(role) else {
        return (Err(AuthError::NoKeyFor(role.name())), refusal);
    };
    let client_nonce = &answer[1..33];
    let expected = client_proof(&key, server_nonce, client_nonce, role);
    if !same(&expected, &proof_in(answer)) {
        return (Err(AuthError::BadProof("client")), refusal);
    }
    let mut verdict = [0u8; VERDICT_LEN];
    verdict[1..].copy_from_slice(&server_proof(&key, client_nonce, server_nonce, role));
    (Ok(role), verdict)
}

/// The connecting side's check of the accepting side's verdict.
pub fn check_verdict(
    keys: &Keys,
    role: Role,
    (server_nonce, client_nonce): (&[u8; 32], &[u8; 32]),
    verdict: &[u8; VERDICT_LEN],
) -> Result<(), AuthError> {
    if verdict[0] != 0 {
        return Err(AuthError::Refused(role.name()));
    }
    let key = keys.key_of(role).ok_or(AuthError::NoKeyFor(role.name()))?;
    let expected = server_proof(&key, client_nonce, server_nonce, role);
    if same(&expected, &proof_in(verdict)) {
        Ok(())
    } else {
        Err(AuthError::BadProof("server"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret(byte: u8) -> Keys {
        Keys::Secret(vec![byte; 32])
    }

    fn run(
        client: &Keys,
        server: &Keys,
        role: Role,
        nonces: ([u8; 32], [u8; 32]),
    ) -> Result<Role, AuthError> {
        let (server_nonce, client_nonce) = nonces;
        let challenge = challenge(&server_nonce);
        let answer = answer(client, role, &challenge, &client_nonce)?;
        let (checked, verdict) = check(server, &server_nonce, &answer);
        let role = checked?;
        check_verdict(client, role, (&server_nonce, &client_nonce), &verdict)?;
        Ok(role)
    }

    #[test]
    fn the_same_secret_authenticates_every_role_both_ways() {
        for role in [Role::Peer, Role::Client, Role::Admin] {
            assert_eq!(
                run(&secret(7), &secret(7), role, ([1; 32], [2; 32])),
                Ok(role)
            );
        }
    }

    #[test]
    fn another_secret_is_refused() {
        assert_eq!(
            run(&secret(8), &secret(7), Role::Client, ([1; 32], [2; 32])),
            Err(AuthError::BadProof("client"))
        );
    }

    #[test]
    fn a_role_key_gives_its_role_and_no_other() {
        let client = Keys::Role(Role::Client, role_key(&[7; 32], Role::Client));
        assert_eq!(
            run(&client, &secret(7), Role::Client, ([1; 32], [2; 32])),
            Ok(Role::Client)
        );
        assert_eq!(
            run(&client, &secret(7), Role::Admin, ([1; 32], [2; 32])),
            Err(AuthError::NoKeyFor("admin"))
        );
        // A client key presented as the admin role fails the proof.
        let challenge = challenge(&[1; 32]);
        let mut forged = answer(&client, Role::Client, &challenge, &[2; 32]).unwrap();
        forged[0] = Role::Admin.code();
        assert_eq!(
            check(&secret(7), &[1; 32], &forged).0,
            Err(AuthError::BadProof("client"))
        );
    }

    #[test]
    fn a_recorded_answer_fails_against_a_new_challenge() {
        let keys = secret(7);
        let recorded = answer(&keys, Role::Admin, &challenge(&[1; 32]), &[2; 32]).unwrap();
        let (replayed, verdict) = check(&keys, &[3; 32], &recorded);
        assert_eq!(replayed, Err(AuthError::BadProof("client")));
        assert_eq!(verdict[0], 1);
    }

    #[test]
    fn a_server_without_the_secret_is_found_out_by_the_client() {
        let keys = secret(7);
        let (server_nonce, client_nonce) = ([1; 32], [2; 32]);
        let mut verdict = [0u8; VERDICT_LEN];
        verdict[1..].copy_from_slice(&[9; 32]);
        assert_eq!(
            check_verdict(
                &keys,
                Role::Client,
                (&server_nonce, &client_nonce),
                &verdict
            ),
            Err(AuthError::BadProof("server"))
        );
        let _ = answer(
            &keys,
            Role::Client,
            &challenge(&server_nonce),
            &client_nonce,
        )
        .unwrap();
    }

    #[test]
    fn a_stream_that_is_not_a_challenge_is_named() {
        assert_eq!(
            answer(&secret(7), Role::Client, &[0x55; CHALLENGE_LEN], &[2; 32]),
            Err(AuthError::NotAChallenge)
        );
    }
}
