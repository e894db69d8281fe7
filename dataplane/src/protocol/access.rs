//! Who may send what: the role a connection proved (`net::auth`) and the requests each role
//! may make. Peers replicate; clients do chunk and volume I/O and read the cluster's state;
//! admins may do everything, membership changes, deletes and repairs included.

use super::opcodes::*;
use super::Opcode;

/// What a connection may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A chunkserver's replication traffic: raft messages, image copies.
    Peer,
    /// A client: chunk and volume I/O, reads of the cluster's state.
    Client,
    /// An administrator: everything, membership changes and deletes included.
    Admin,
}

impl Role {
    /// Its code on the wire.
    pub fn code(self) -> u8 {
        match self {
            Role::Peer => 1,
            Role::Client => 2,
            Role::Admin => 3,
        }
    }

    /// The role of a code.
    pub fn from_code(code: u8) -> Option<Role> {
        match code {
            1 => Some(Role::Peer),
            2 => Some(Role::Client),
            3 => Some(Role::Admin),
            _ => None,
        }
    }

    /// Its name, as the configuration and messages say it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Peer => "peer",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }

    /// The role a name says.
    pub fn parse(name: &str) -> Option<Role> {
        [Role::Peer, Role::Client, Role::Admin]
            .into_iter()
            .find(|r| r.name() == name)
    }
}

/// Whether a connection that proved `role` may send `opcode`.
pub fn allowed(role: Role, opcode: Opcode) -> bool {
    match role {
        Role::Admin => true,
        Role::Peer => matches!(
            opcode,
            RAFT | LIST_CHUNK_IMAGE | READ_CHUNK_IMAGE | COPYSET_STATUS | LIST_COPYSETS
        ),
        Role::Client => matches!(
            opcode,
            WRITE_CHUNK
                | READ_CHUNK
                | GET_CHUNK_INFO
                | READ_SNAPSHOT
                | DELETE_CHUNK
                | DELETE_SNAPSHOT_OR_CORRECT_SN
                | CREATE_CLONE_CHUNK
                | PASTE_CHUNK
                | RECOVER_CHUNK
                | FLATTEN_CHUNK
                | FENCE_CHUNK
                | CREATE_VOLUME
                | PLACEMENT
                | TOPOLOGY
                | COPYSET_STATUS
                | LIST_COPYSETS
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn membership_changes_deletes_and_repairs_need_the_admin_role() {
        for opcode in [
            CREATE_COPYSET,
            CHANGE_PEERS,
            DELETE_COPYSET,
            RESET_PEERS,
            TRANSFER_LEADER,
            DELETE_VOLUME,
            SCRUB_CHUNK,
            REPAIR_CHUNK,
            OPERATORS,
            HEARTBEAT,
        ] {
            assert!(!allowed(Role::Client, opcode), "{opcode:?}");
            assert!(!allowed(Role::Peer, opcode), "{opcode:?}");
            assert!(allowed(Role::Admin, opcode), "{opcode:?}");
        }
    }

    #[test]
    fn clients_do_io_and_peers_replicate() {
        assert!(allowed(Role::Client, WRITE_CHUNK) && allowed(Role::Client, READ_CHUNK));
        assert!(!allowed(Role::Client, RAFT));
        assert!(allowed(Role::Peer, RAFT) && allowed(Role::Peer, READ_CHUNK_IMAGE));
        assert!(!allowed(Role::Peer, WRITE_CHUNK));
    }
}
