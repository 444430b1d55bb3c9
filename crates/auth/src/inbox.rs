//! Where each identity's replies arrive on the bus, one rule for every client and for the
//! permissions that enforce it.
//!
//! An agent (or a worker, or an operator) that connects with its token receives replies only
//! under `_INBOX.<agent_id>.>`, and the bus lets it subscribe to nothing else of `_INBOX`: one
//! agent cannot read another's replies. Nodes, which connect with their own NATS credentials,
//! receive theirs under `_INBOX_NODES.<node name>.>`, a root of its own, so no agent id (ids
//! are `A-Z a-z 0-9 - _`) can ever name a node's inbox.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The root of agents' inboxes.
pub const AGENT_INBOX_ROOT: &str = "_INBOX";
/// The root of nodes' inboxes.
pub const NODE_INBOX_ROOT: &str = "_INBOX_NODES";

/// `_INBOX.<agent_id>`: the inbox prefix of the agent `agent_id`.
pub fn agent_inbox_prefix(agent_id: &str) -> String {
    format!("{AGENT_INBOX_ROOT}.{agent_id}")
}

/// `_INBOX_NODES.<node>`: the inbox prefix of the node kind `node`.
pub fn node_inbox_prefix(node: &str) -> String {
    format!("{NODE_INBOX_ROOT}.{node}")
}

/// The `sub` (agent id) a token says it is for, read WITHOUT verifying it: only for choosing
/// the inbox a client listens on. Whether the token is good is the server's (and the callout's)
/// decision; a lie here only makes the client's own replies undeliverable.
pub fn peek_subject(token: &str) -> Option<String> {
    let payload = token.trim().split('.').nth(1)?;
    let raw = URL_SAFE_NO_PAD.decode(payload.as_bytes()).ok()?;
    let v: serde_json::Value = serde_json::from_slice(&raw).ok()?;
    v.get("sub")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_have_separate_roots() {
        assert_eq!(agent_inbox_prefix("a-1"), "_INBOX.a-1");
        assert_eq!(
            node_inbox_prefix("shell-server"),
            "_INBOX_NODES.shell-server"
        );
    }

    #[test]
    fn peek_reads_sub_and_refuses_garbage() {
        let body = URL_SAFE_NO_PAD.encode(br#"{"sub":"alice","exp":1}"#);
        assert_eq!(
            peek_subject(&format!("h.{body}.s")).as_deref(),
            Some("alice")
        );
        assert_eq!(peek_subject("not a token"), None);
        assert_eq!(peek_subject("a.!!!.c"), None);
        let no_sub = URL_SAFE_NO_PAD.encode(br#"{"exp":1}"#);
        assert_eq!(peek_subject(&format!("h.{no_sub}.s")), None);
    }
}
