//! `[auth]`: who may connect (issue 22). Without it nothing is authenticated; with it every
//! connection to the node's peer and client ports first proves a role (`net::auth`).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// `[auth]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// The cluster secret (at least 32 bytes; readable by its owner only): on every server, and
    /// where an admin runs `chunkctl`. It gives every role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// One role's key instead, 64 hex digits (`chunkctl auth derive-key --role client`): on a
    /// machine that only runs clients. It gives `role` and no other.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// The role `key_file` gives: `client`, `admin` or `peer`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
}

impl AuthSection {
    /// Whether the section is absent (nothing is authenticated).
    pub fn is_default(&self) -> bool {
        *self == AuthSection::default()
    }

    /// What the types cannot say: one kind of key, a role with a key file.
    pub(super) fn check(&self) -> Result<(), (&'static str, String)> {
        match (&self.secret_file, &self.key_file, &self.role) {
            (Some(_), Some(_), _) => Err((
                "auth.key_file",
                "give secret_file or key_file, not both".into(),
            )),
            (Some(_), None, Some(_)) => Err((
                "auth.role",
                "goes with key_file: the secret gives every role".into(),
            )),
            (None, Some(_), None) => Err((
                "auth.role",
                "required with key_file: client, admin or peer".into(),
            )),
            (None, None, Some(_)) => Err(("auth.role", "needs key_file".into())),
            (_, _, Some(role)) if !["client", "admin", "peer"].contains(&role.as_str()) => Err((
                "auth.role",
                format!("`{role}` is not client, admin or peer"),
            )),
            _ => Ok(()),
        }
    }
}
