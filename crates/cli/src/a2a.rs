//! `tether a2a ls`: the A2A agents of the fleet — those whose workers published a card — and
//! whether a worker of each is alive (it re-published its card lately), from the gateway's
//! `a2a.agents`.

use serde::Deserialize;

/// One agent as `a2a.agents` answers it.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Agent {
    pub agent_id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub skills: Vec<String>,
    #[serde(default)]
    pub live: bool,
    #[serde(default)]
    pub card_updated_at: String,
    #[serde(default)]
    pub backlog: Option<u64>,
}

#[derive(Debug, Deserialize)]
struct Agents {
    agents: Vec<Agent>,
}

/// Reads the gateway's answer; `all` keeps agents without a live worker.
pub fn parse(answer: &str, all: bool) -> Result<Vec<Agent>, String> {
    let a: Agents = serde_json::from_str(answer)
        .map_err(|e| format!("the gateway's answer is not an agent list: {e}"))?;
    Ok(a.agents.into_iter().filter(|x| all || x.live).collect())
}

/// A table: agent, card name, live, backlog, skills, card age.
pub fn render(agents: &[Agent]) -> String {
    let mut out = format!(
        "{:<24} {:<24} {:<5} {:>7}  {:<28} {}\n",
        "AGENT", "NAME", "LIVE", "BACKLOG", "SKILLS", "CARD UPDATED"
    );
    for a in agents {
        out.push_str(&format!(
            "{:<24} {:<24} {:<5} {:>7}  {:<28} {}\n",
            a.agent_id,
            a.name,
            if a.live { "yes" } else { "no" },
            a.backlog
                .map(|b| b.to_string())
                .unwrap_or_else(|| "-".into()),
            a.skills.join(","),
            a.card_updated_at
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_live_agents_unless_all() {
        let answer = r#"{"agents": [
            {"agentId": "echo", "name": "Echo", "skills": ["echo"], "live": true, "cardUpdatedAt": "t", "backlog": 2},
            {"agentId": "gone", "name": "Gone", "live": false}]}"#;
        let live = parse(answer, false).expect("parse");
        assert_eq!(live.len(), 1);
        let table = render(&live);
        assert!(
            table.contains("echo") && table.contains("yes") && table.contains('2'),
            "{table}"
        );
        assert_eq!(parse(answer, true).expect("parse").len(), 2);
        assert!(parse("{oops", false).is_err());
    }
}
