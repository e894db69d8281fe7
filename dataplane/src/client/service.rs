//! The client's calls to the placement service (the metadata copyset's leader): a node's
//! heartbeat and what the service answers, the topology, the scheduler's operators, and the
//! removal of a replica the service found stale.

use bytes::Bytes;

use super::{Client, ClientError};
use crate::ids::CopysetId;
use crate::protocol;

impl Client {
    /// Sends a heartbeat to the placement service (the metadata copyset's leader); gives what
    /// the service asks of the node.
    pub async fn heartbeat(
        &self,
        heartbeat: &crate::protocol::placement::Heartbeat,
    ) -> Result<crate::protocol::placement::HeartbeatReply, ClientError> {
        let body = crate::protocol::placement::encode(heartbeat);
        let answer = self
            .leader_call(
                "heartbeat",
                crate::volume_table::METADATA_COPYSET,
                protocol::HEARTBEAT,
                body,
            )
            .await?;
        if answer.is_empty() {
            return Ok(crate::protocol::placement::HeartbeatReply::default());
        }
        crate::protocol::placement::decode(&answer)
            .map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// Removes `node`'s replica of `copyset` if it is stale: the node refuses while the
    /// replica leads or when a membership change joined it lately.
    pub async fn remove_stale_replica(
        &self,
        copyset: CopysetId,
        node: u64,
    ) -> Result<(), ClientError> {
        self.with_retries(
            "remove stale replica",
            copyset,
            Some(node),
            protocol::DELETE_COPYSET,
            &Bytes::from_static(protocol::DELETE_IF_STALE),
        )
        .await
        .map(|_| ())
    }

    /// The placement service's view of the chunkservers.
    pub async fn topology(&self) -> Result<crate::protocol::placement::Topology, ClientError> {
        let body = self
            .leader_call(
                "topology",
                crate::volume_table::METADATA_COPYSET,
                protocol::TOPOLOGY,
                Bytes::new(),
            )
            .await?;
        crate::protocol::placement::decode(&body).map_err(|e| ClientError::Malformed(e.to_string()))
    }

    /// The placement service's scheduler operators, after cancelling the replacement of
    /// `cancel` when given.
    pub async fn operators(
        &self,
        cancel: Option<CopysetId>,
    ) -> Result<crate::protocol::placement::Operators, ClientError> {
        let request = crate::protocol::placement::OperatorsRequest {
            cancel: cancel.map(|c| c.0),
        };
        let body = self
            .leader_call(
                "operators",
                crate::volume_table::METADATA_COPYSET,
                protocol::OPERATORS,
                crate::protocol::placement::encode(&request),
            )
            .await?;
        crate::protocol::placement::decode(&body).map_err(|e| ClientError::Malformed(e.to_string()))
    }
}
