//! A `tools.execute` request checked into a [`Prepared`] run: names, image, limits, network,
//! parameters (which become environment variables), and the container spec of the run.

use std::collections::HashMap;
use std::time::Duration;

use tether_bus::Problem;
use tether_proto::pbjson_types::value::Kind as V;
use tether_proto::{CreateContainerRequest, ResourceLimits, ToolExecuteRequest};

use crate::config::Limits;
use crate::config::TOOL_LIFETIME_MARGIN_SECONDS as LIFETIME_MARGIN;
use crate::labels::{LABEL_CLEANUP, LABEL_EXECUTION, LABEL_TOOL};
use crate::spec::{ContainerSpec, Policy, is_valid_image_ref, validate_create};

/// Variables a parameter may not become: a shell, the dynamic loader and most programs read
/// them, so `{"path": "x"}` would silently break the tool.
pub(super) const PROCESS_ENV: &[&str] = &[
    "PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHELL", "USER", "LOGNAME", "IFS", "ENV",
    "BASH_ENV", "PS4", "CDPATH",
];
/// Most parameter JSON a run may take (it travels in the environment).
pub(super) const MAX_PARAMETERS: usize = 64 * 1024;

/// The network a tool asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ToolNetwork {
    None,
    Bridge,
    Session,
}

/// A checked run: everything the runner needs, with the container spec's base.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub execution_id: String,
    pub space: String,
    pub agent_id: String,
    pub tool_name: String,
    pub session_id: String,
    pub image: String,
    pub spec: ContainerSpec,
    pub timeout: Duration,
    pub cleanup: bool,
    pub max_output: usize,
    pub network: ToolNetwork,
    pub is_async: bool,
}

pub(super) fn bad(m: impl Into<String>) -> Problem {
    Problem::bad_request(m)
}

/// The parameters as a JSON object.
pub fn parse_parameters(
    v: Option<&tether_proto::pbjson_types::Value>,
) -> Result<serde_json::Map<String, serde_json::Value>, Problem> {
    let Some(v) = v else {
        return Ok(serde_json::Map::new());
    };
    match &v.kind {
        None | Some(V::NullValue(_)) => Ok(serde_json::Map::new()),
        Some(V::StructValue(_)) => match tether_proto::from_pb_value(v) {
            serde_json::Value::Object(m) => Ok(m),
            _ => Err(bad("`parameters` must be a JSON object")),
        },
        Some(V::StringValue(s)) => match serde_json::from_str::<serde_json::Value>(s) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            Ok(_) => Err(bad(
                "`parameters` must be a JSON object (the string holds JSON that is not an object)",
            )),
            Err(e) => Err(bad(format!(
                "`parameters` is a string that is not JSON ({e}); give a JSON object"
            ))),
        },
        Some(_) => Err(bad("`parameters` must be a JSON object")),
    }
}

/// Environment variables for the parameters: `NAME=value` per entry, and the whole object.
pub fn parameter_env(
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<HashMap<String, String>, Problem> {
    let doc = serde_json::Value::Object(params.clone()).to_string();
    if doc.len() > MAX_PARAMETERS {
        return Err(bad(format!(
            "`parameters` must be at most {MAX_PARAMETERS} bytes of JSON (got {})",
            doc.len()
        )));
    }
    let mut env = HashMap::new();
    for (k, v) in params {
        let name: String = k.to_ascii_uppercase().replace(['-', '.'], "_");
        let ok = !name.is_empty()
            && name.len() <= 128
            && name
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(bad(format!(
                "parameter name {k:?} cannot be an environment variable (use letters, digits, `_`, `-`, not starting with a digit)"
            )));
        }
        if name.starts_with("TETHER_") {
            return Err(bad(format!(
                "parameter name {k:?}: the TETHER_ prefix is reserved"
            )));
        }
        if PROCESS_ENV.contains(&name.as_str()) || name.starts_with("LD_") {
            return Err(bad(format!(
                "parameter name {k:?} would replace the process variable {name}, which the tool's shell and libraries rely on; rename it (every parameter is also in TETHER_PARAMETERS)"
            )));
        }
        let value = match v {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Null => String::new(),
            other => other.to_string(),
        };
        if value.contains('\0') {
            return Err(bad(format!("parameter {k:?} holds a NUL character")));
        }
        if env.insert(name.clone(), value).is_some() {
            return Err(bad(format!(
                "parameters clash: two names become the variable {name}"
            )));
        }
    }
    env.insert("TETHER_PARAMETERS".into(), doc);
    Ok(env)
}

pub(super) fn is_valid_tool_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | ':' | '/'))
}

pub(super) fn is_valid_idempotency_key(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '='))
}

/// Checks a request for `space` (already authorized) into a run: pure, against the limits
/// and the create policy (no engine, no KV; the image's presence is checked by the caller).
pub fn prepare(
    limits: &Limits,
    policy: &Policy,
    b: &ToolExecuteRequest,
    space: &str,
    agent_id: &str,
    execution_id: &str,
) -> Result<Prepared, Problem> {
    if b.tool_name.is_empty() {
        return Err(bad("`tool_name` is required"));
    }
    if !is_valid_tool_name(&b.tool_name) {
        return Err(bad(format!(
            "`tool_name` {:?} must be 1-128 characters of A-Z a-z 0-9 _ . - : /",
            b.tool_name
        )));
    }
    if b.image.is_empty() {
        return Err(bad("`image` is required"));
    }
    if !is_valid_image_ref(&b.image) {
        return Err(bad(format!(
            "`image` {:?} is not an image reference",
            b.image
        )));
    }
    if !b.idempotency_key.is_empty() && !is_valid_idempotency_key(&b.idempotency_key) {
        return Err(bad(
            "`idempotency_key` must be 1-128 characters of A-Z a-z 0-9 _ - =",
        ));
    }
    if !b.idempotency_key.is_empty() && !b.r#async {
        return Err(bad(
            "`idempotency_key` applies to async runs (`async: true`)",
        ));
    }
    let asked = b.resource_limits.unwrap_or_default();
    let timeout = match asked.timeout_seconds {
        0 => limits.tool_default_timeout_seconds,
        t if t < 0 => {
            return Err(bad(format!(
                "`resource_limits.timeout_seconds` must be positive (got {t})"
            )));
        }
        t if t > limits.tool_max_timeout_seconds => {
            return Err(bad(format!(
                "`resource_limits.timeout_seconds` must be at most {} (got {t})",
                limits.tool_max_timeout_seconds
            )));
        }
        t => t,
    };
    let network = match b.network.as_str() {
        "" | "none" => ToolNetwork::None,
        "bridge" => ToolNetwork::Bridge,
        "session" => {
            if b.session_id.is_empty() {
                return Err(bad("`network: session` needs a `session_id`"));
            }
            ToolNetwork::Session
        }
        other => {
            return Err(bad(format!(
                "`network` must be none, bridge or session (got {other:?})"
            )));
        }
    };
    let params = parse_parameters(b.parameters.as_ref())?;
    let param_env = parameter_env(&params)?;
    if let Some(k) = b.env.keys().find(|k| param_env.contains_key(k.as_str())) {
        return Err(bad(format!(
            "`env` {k} and a parameter of the same name would both set the variable {k}"
        )));
    }
    let max_output = match b.max_output_bytes {
        0 => limits.default_output,
        n if n < 0 || usize::try_from(n).unwrap_or(usize::MAX) > limits.max_output => {
            return Err(bad(format!(
                "`max_output_bytes` must be between 1 and {} (got {n})",
                limits.max_output
            )));
        }
        n => usize::try_from(n).unwrap_or(limits.max_output),
    };
    let cleanup = b.cleanup.unwrap_or(true);
    let lifetime = if cleanup {
        timeout
            .saturating_add(LIFETIME_MARGIN)
            .min(limits.max_ttl_seconds)
    } else {
        limits.default_ttl_seconds
    };
    let create = CreateContainerRequest {
        image: b.image.clone(),
        session_id: b.session_id.clone(),
        kind: "tool".into(),
        env: b.env.clone(),
        command: b.command.clone(),
        resource_limits: Some(ResourceLimits {
            timeout_seconds: lifetime,
            ..asked
        }),
        network_mode: match network {
            ToolNetwork::Bridge => "bridge".into(),
            _ => "none".into(),
        },
        mounts: b.mounts.clone(),
        ..Default::default()
    };
    let mut spec = validate_create(&create, space, agent_id, policy, chrono::Utc::now())?;
    // Parameters were checked by `parameter_env` (names, NUL, the whole document's size);
    // they come after `validate_create` since `TETHER_PARAMETERS` is ours.
    let mut param_env: Vec<String> = param_env
        .into_iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    param_env.sort();
    spec.env.extend(param_env);
    spec.env.push(format!("TETHER_TOOL={}", b.tool_name));
    spec.env.push(format!("TETHER_EXECUTION_ID={execution_id}"));
    spec.labels
        .insert(LABEL_EXECUTION.into(), execution_id.to_string());
    spec.labels
        .insert(LABEL_CLEANUP.into(), cleanup.to_string());
    spec.labels.insert(LABEL_TOOL.into(), b.tool_name.clone());
    Ok(Prepared {
        execution_id: execution_id.to_string(),
        space: space.to_string(),
        agent_id: agent_id.to_string(),
        tool_name: b.tool_name.clone(),
        session_id: b.session_id.clone(),
        image: b.image.clone(),
        spec,
        timeout: Duration::from_secs(u64::try_from(timeout).unwrap_or(1)),
        cleanup,
        max_output,
        network,
        is_async: b.r#async,
    })
}

pub(super) fn check_id(id: &str) -> Result<(), Problem> {
    if id.is_empty() {
        return Err(bad("`execution_id` is required"));
    }
    if !(id.len() <= 64 && id.chars().all(|c| c.is_ascii_alphanumeric())) {
        return Err(bad(format!("`execution_id` {id:?} is not an execution id")));
    }
    Ok(())
}

/// A stand-in for recording the failure of a job that no longer validates.
pub(super) fn fallback_prepared(space: &str, agent: &str, id: &str) -> Prepared {
    Prepared {
        execution_id: id.to_string(),
        space: space.to_string(),
        agent_id: agent.to_string(),
        tool_name: String::new(),
        session_id: String::new(),
        image: String::new(),
        spec: ContainerSpec {
            image: String::new(),
            name: String::new(),
            space: space.to_string(),
            session_id: String::new(),
            kind: crate::spec::Kind::Tool,
            env: Vec::new(),
            cmd: None,
            workdir: None,
            labels: HashMap::new(),
            memory_mb: 0,
            cpu_limit: 0.0,
            pids_limit: 0,
            ttl_seconds: 0,
            expires_at: chrono::Utc::now(),
            network_mode: "none".into(),
            extra_hosts: Vec::new(),
            read_only_root: true,
            writable_paths: Vec::new(),
            mounts: Vec::new(),
            secret_dir: None,
            daemon: None,
            start: false,
        },
        timeout: Duration::from_secs(1),
        cleanup: true,
        max_output: 0,
        network: ToolNetwork::None,
        is_async: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_proto::to_pb_value;

    #[test]
    fn parameters_become_env() {
        let p = parse_parameters(Some(&to_pb_value(
            serde_json::json!({"a": 1, "b-c": "x", "o": {"k": [1]}}),
        )))
        .expect("object");
        let env = parameter_env(&p).expect("env");
        assert_eq!(env["A"], "1");
        assert_eq!(env["B_C"], "x");
        assert_eq!(env["O"], r#"{"k":[1]}"#);
        assert!(env["TETHER_PARAMETERS"].contains("\"a\":1"));
        // A string holding a JSON object is accepted; anything else is not.
        assert!(parse_parameters(Some(&to_pb_value(serde_json::json!("{\"a\":1}")))).is_ok());
        for bad in [
            serde_json::json!("not json"),
            serde_json::json!("[1]"),
            serde_json::json!(5),
            serde_json::json!([1]),
        ] {
            let e = parse_parameters(Some(&to_pb_value(bad.clone()))).expect_err("refused");
            assert_eq!(e.status, 400, "{bad}");
        }
        for bad in [
            serde_json::json!({"1x": 1}),
            serde_json::json!({"tether_parameters": 1}),
            serde_json::json!({"a": 1, "A": 2}),
            serde_json::json!({"has space": 1}),
            serde_json::json!({"path": "/src"}),
            serde_json::json!({"ld_preload": "/x.so"}),
        ] {
            let p = parse_parameters(Some(&to_pb_value(bad.clone()))).expect("object");
            assert_eq!(parameter_env(&p).expect_err("refused").status, 400, "{bad}");
        }
    }
}
