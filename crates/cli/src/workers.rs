//! `tether workers deploy|ls|scale|rm`: worker deployments through the orchestrators'
//! `workers.*` (operators). The request bodies and the table are made here, without I/O.

use serde_json::{Value, json};

/// What `tether workers deploy` asks for (its flags).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct Deploy {
    pub name: String,
    #[arg(long = "agent")]
    pub agent_id: String,
    #[arg(long)]
    pub image: String,
    /// Run under `sh -c` (or give the argv after `--`; neither: the image's command).
    #[arg(long)]
    pub command: Option<String>,
    /// The argv itself (after `--`).
    #[arg(last = true)]
    pub argv: Vec<String>,
    /// `KEY=value` (repeatable).
    #[arg(long)]
    pub env: Vec<String>,
    /// 0: `--min`, or 1.
    #[arg(long, default_value_t = 0)]
    pub replicas: u32,
    #[arg(long = "min", default_value_t = 0)]
    pub min_replicas: u32,
    /// 0: `--replicas`.
    #[arg(long = "max", default_value_t = 0)]
    pub max_replicas: u32,
    /// always | on-failure | never.
    #[arg(long)]
    pub restart: Option<String>,
    #[arg(long)]
    pub profile: Option<String>,
    #[arg(long)]
    pub memory_mb: Option<i32>,
    #[arg(long)]
    pub cpu_limit: Option<f64>,
    #[arg(long)]
    pub pids_limit: Option<i32>,
    /// `SOURCE:TARGET[:ro|rw]` beyond the profile's own mounts (repeatable; read-only unless
    /// `:rw`); each must lie under one of the profile's `allowed_mounts`.
    #[arg(long = "mount")]
    pub mounts: Vec<String>,
    /// Scaled deployments (`--max` above `--min`): backlog per replica (0: the node's default).
    #[arg(long, default_value_t = 0)]
    pub target_backlog: u32,
    /// Scaled deployments: seconds of a smaller backlog before scaling down (0: the default).
    #[arg(long, default_value_t = 0)]
    pub scale_down_after: u32,
}

impl Deploy {
    /// The `workers.deploy` body; an `--env` without `=` or both a command and an argv is a
    /// usage error.
    pub fn body(&self) -> Result<Value, String> {
        let mut env = serde_json::Map::new();
        for e in &self.env {
            let (k, v) = e
                .split_once('=')
                .ok_or_else(|| format!("--env {e:?} must be KEY=value"))?;
            env.insert(k.to_string(), Value::String(v.to_string()));
        }
        let command = match (&self.command, self.argv.is_empty()) {
            (Some(_), false) => return Err("give --command or an argv after --, not both".into()),
            (Some(c), true) => json!(c),
            (None, false) => json!(self.argv),
            (None, true) => Value::Null,
        };
        let mounts = self
            .mounts
            .iter()
            .map(|m| mount(m))
            .collect::<Result<Vec<_>, _>>()?;
        let mut b = json!({
            "name": self.name,
            "agent_id": self.agent_id,
            "image": self.image,
            "env": env,
            "replicas": self.replicas,
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "restart": self.restart.clone().unwrap_or_default(),
            "profile": self.profile.clone().unwrap_or_default(),
            "resource_limits": {
                "memory_mb": self.memory_mb.unwrap_or(0),
                "cpu_limit": self.cpu_limit.unwrap_or(0.0),
                "pids_limit": self.pids_limit.unwrap_or(0),
            },
            "mounts": mounts,
            "target_backlog_per_replica": self.target_backlog,
            "scale_down_after_seconds": self.scale_down_after,
        });
        if !command.is_null() {
            b["command"] = command;
        }
        Ok(b)
    }
}

/// `SOURCE:TARGET[:ro|rw]` as a `MountSpec` (read-only unless `:rw`).
fn mount(m: &str) -> Result<Value, String> {
    let bad = || format!("--mount {m:?} must be SOURCE:TARGET[:ro|rw]");
    let parts: Vec<&str> = m.split(':').collect();
    let (source, target, writable) = match parts.as_slice() {
        [s, t] => (*s, *t, false),
        [s, t, "ro"] => (*s, *t, false),
        [s, t, "rw"] => (*s, *t, true),
        _ => return Err(bad()),
    };
    if source.is_empty() || target.is_empty() {
        return Err(bad());
    }
    Ok(json!({"source": source, "target": target, "writable": writable}))
}

/// One line about a deployment as `workers.deploy` or `workers.scale` answered it.
pub fn summary(answer: &str) -> Result<String, String> {
    let s: Value = serde_json::from_str(answer)
        .map_err(|e| format!("the orchestrator's answer is not a worker status: {e}"))?;
    let d = &s["deployment"];
    Ok(format!(
        "{} {}: {} replicas, generation {}",
        d["spec"]["name"].as_str().unwrap_or_default(),
        if s["changed"] == true {
            "changed"
        } else {
            "unchanged"
        },
        d["spec"]["replicas"],
        d["generation"]
    ))
}

/// A table of `workers.list`: name, agent, image, replicas wanted, replicas running (on the
/// hosts that answered), generation, hosts of the slots.
pub fn render(answer: &str) -> Result<String, String> {
    let l: Value = serde_json::from_str(answer)
        .map_err(|e| format!("the orchestrator's answer is not a worker list: {e}"))?;
    let mut out = format!(
        "{:<24} {:<20} {:<32} {:>6} {:>7} {:>4}  HOSTS\n",
        "NAME", "AGENT", "IMAGE", "WANTED", "RUNNING", "GEN"
    );
    for w in l["workers"].as_array().into_iter().flatten() {
        let d = &w["deployment"];
        let spec = &d["spec"];
        let running = w["replicas"]
            .as_array()
            .map_or(0, |r| r.iter().filter(|r| r["state"] == "running").count());
        let mut hosts: Vec<&str> = d["slots"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s["host_id"].as_str())
            .collect();
        hosts.sort_unstable();
        hosts.dedup();
        out.push_str(&format!(
            "{:<24} {:<20} {:<32} {:>6} {:>7} {:>4}  {}\n",
            spec["name"].as_str().unwrap_or_default(),
            spec["agent_id"].as_str().unwrap_or_default(),
            spec["image"].as_str().unwrap_or_default(),
            spec["replicas"],
            running,
            d["generation"],
            hosts.join(",")
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploy_bodies() {
        let d = Deploy {
            name: "echo".into(),
            agent_id: "bot".into(),
            image: "img".into(),
            command: Some("sleep 1".into()),
            env: vec!["A=1".into(), "B=x=y".into()],
            replicas: 2,
            memory_mb: Some(64),
            ..Default::default()
        };
        let b = d.body().expect("body");
        assert_eq!(b["command"], "sleep 1");
        assert_eq!(b["env"], json!({"A": "1", "B": "x=y"}));
        assert_eq!(b["resource_limits"]["memory_mb"], 64);
        let argv = Deploy {
            command: None,
            argv: vec!["sh".into(), "-c".into(), "true".into()],
            ..d.clone()
        };
        assert_eq!(
            argv.body().expect("body")["command"],
            json!(["sh", "-c", "true"])
        );
        let none = Deploy {
            command: None,
            ..d.clone()
        };
        assert!(none.body().expect("body").get("command").is_none());
        let both = Deploy {
            argv: vec!["x".into()],
            ..d.clone()
        };
        assert!(both.body().is_err());
        let bad = Deploy {
            env: vec!["NOEQUALS".into()],
            ..d.clone()
        };
        assert!(bad.body().expect_err("bad env").contains("KEY=value"));
        let mounted = Deploy {
            mounts: vec!["/srv/a:/a".into(), "/srv/b:/b:rw".into(), "/c:/c:ro".into()],
            target_backlog: 8,
            scale_down_after: 30,
            ..d.clone()
        };
        let b = mounted.body().expect("body");
        assert_eq!(
            b["mounts"],
            json!([
                {"source": "/srv/a", "target": "/a", "writable": false},
                {"source": "/srv/b", "target": "/b", "writable": true},
                {"source": "/c", "target": "/c", "writable": false},
            ])
        );
        assert_eq!(b["target_backlog_per_replica"], 8);
        assert_eq!(b["scale_down_after_seconds"], 30);
        for m in ["/a", "/a:/b:rx", ":/b", "/a:", "/a:/b:rw:x"] {
            let bad = Deploy {
                mounts: vec![m.into()],
                ..d.clone()
            };
            assert!(bad.body().expect_err(m).contains("SOURCE:TARGET"), "{m}");
        }
    }

    #[test]
    fn lists_and_summaries() {
        let answer = r#"{"host_id": "h1", "workers": [{"deployment": {"spec": {"name": "echo",
            "agent_id": "bot", "image": "img", "replicas": 2}, "generation": 3,
            "slots": [{"index": 0, "host_id": "h1"}, {"index": 1, "host_id": "h2"}]},
            "replicas": [{"state": "running"}, {"state": "exited"}]}]}"#;
        let t = render(answer).expect("table");
        let row = t.lines().nth(1).expect("row");
        for part in ["echo", "bot", "img", " 2 ", " 1 ", " 3 ", "h1,h2"] {
            assert!(row.contains(part), "{part:?} not in {row:?}");
        }
        assert!(render("{oops").is_err());
        let s = summary(
            r#"{"changed": true, "deployment": {"spec": {"name": "echo", "replicas": 2}, "generation": 1}}"#,
        )
        .expect("summary");
        assert_eq!(s, "echo changed: 2 replicas, generation 1");
    }
}
