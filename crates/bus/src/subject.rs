//! Service paths and NATS subjects: `/containers/create` ≡ `containers.create`.

/// Turns a service path into a subject: leading/trailing `/` dropped, inner `/` → `.`.
/// A subject already in dotted form is returned unchanged.
pub fn normalize(path: &str) -> String {
    let p = path.trim().trim_matches('/');
    if path.trim().starts_with('/') || p.contains('/') {
        p.replace('/', ".")
    } else {
        p.to_string()
    }
}

/// True when `s` is a valid subject to publish to (no wildcards, no empty tokens, no spaces).
pub fn is_valid_publish_subject(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|t| !t.is_empty() && t != "*" && t != ">" && !t.contains(char::is_whitespace))
}

/// A single subject token (e.g. a space or session id) that is safe to put in a subject.
pub fn is_valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A name that is at once a KV key, a subject token and part of a container name (a worker
/// deployment's): `[a-z0-9][a-z0-9-]{0,62}`.
pub fn is_valid_name(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// The subject a caller may have a node stream chunks to (`stream_subject` of an exec or a
/// shell command): a subject without wildcards in the caller's own inbox
/// (`_INBOX.<agent_id>.…`), or in a node's (`_INBOX_NODES.…`: a node streaming on an agent's
/// behalf, e.g. the shell server); an operator anywhere but `$…`. So no agent can have a node
/// write into another agent's inbox.
pub fn check_stream_subject(s: &str, caller: &crate::Caller) -> Result<String, crate::Problem> {
    use tether_auth::inbox::{NODE_INBOX_ROOT, agent_inbox_prefix};
    let own = format!("{}.", agent_inbox_prefix(&caller.agent_id));
    let allowed = s.starts_with(&own)
        || s.starts_with(&format!("{NODE_INBOX_ROOT}."))
        || caller.is_operator();
    if !is_valid_publish_subject(s) || s.starts_with('$') || !allowed {
        return Err(crate::Problem::bad_request(format!(
            "`stream_subject` {s:?} must be a subject of your own inbox ({own}…) without wildcards"
        )));
    }
    Ok(s.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalizes() {
        assert_eq!(normalize("/containers/create"), "containers.create");
        assert_eq!(normalize("containers.create"), "containers.create");
        assert_eq!(normalize("/x"), "x");
        assert_eq!(
            normalize("hosts/h1/containers/exec/"),
            "hosts.h1.containers.exec"
        );
    }

    #[test]
    fn validates() {
        assert!(is_valid_publish_subject("a.b"));
        assert!(!is_valid_publish_subject("a.*"));
        assert!(!is_valid_publish_subject("a..b"));
        assert!(is_valid_token("space-1_x"));
        assert!(!is_valid_token("a.b"));
        assert!(!is_valid_token(""));
    }
}
