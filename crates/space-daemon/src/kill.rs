//! Killing a command and everything it started.
//!
//! Design decision: every command is the leader of its own process group (its pgid is its
//! pid), so one `killpg(SIGKILL)` reaches it and every child that stayed in the group. What
//! left the group (`setsid`, `setpgid`) is found in `/proc`: every process in the group and,
//! transitively, every descendant of one of them is first stopped (SIGSTOP, so no parent dies
//! and hands its children to the daemon while the tree is read, and nothing forks), then
//! killed; the scan repeats until nothing of the tree runs, for at most [`MAX_ROUNDS`].
//! Orphans re-parent to the daemon (init or subreaper) and keep their group, so they are
//! found too. Not found: a process that left the group *and* lost its parent before the
//! kill — it is indistinguishable from any other orphan of the daemon. Killing the container
//! remains the backstop for that.
//!
//! The same kill by session ([`kill_session`]) is how the init ends the commands of an exec
//! server that died: the server leads its own session, and every command it started stays in
//! it (each in its own group) unless it called `setsid` itself.

use std::collections::{HashMap, HashSet};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;

/// Scan-and-kill rounds at most (a fork bomb outrunning that many is the container's
/// problem: its pids limit bounds it, and the container's kill ends it).
pub const MAX_ROUNDS: usize = 50;

/// One process as `/proc/<pid>/stat` tells it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    pub pid: i32,
    pub ppid: i32,
    pub pgid: i32,
    pub sid: i32,
}

/// Reads the fields after the command name (which may hold spaces and parentheses: the last
/// `)` ends it).
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let (head, tail) = text.rsplit_once(')')?;
    let pid = head.split_whitespace().next()?.parse().ok()?;
    let mut f = tail.split_whitespace();
    let _state = f.next()?;
    Some(ProcStat {
        pid,
        ppid: f.next()?.parse().ok()?,
        pgid: f.next()?.parse().ok()?,
        sid: f.next()?.parse().ok()?,
    })
}

/// Every process visible in `/proc` (one that exits while read is skipped).
pub fn processes() -> Vec<ProcStat> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let e = e.ok()?;
        let name = e.file_name();
        let pid: i32 = name.to_str()?.parse().ok()?;
        let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        parse_stat(&text)
    })
    .collect()
}

/// The processes of group `pgid`, its leader (pid `pgid`, even if it moved to another group)
/// and all their descendants, in `procs`.
pub fn tree_of_group(procs: &[ProcStat], pgid: i32) -> HashSet<i32> {
    tree_of(procs, |p| p.pgid == pgid || p.pid == pgid)
}

/// The processes of session `sid` and all their descendants, in `procs`.
pub fn tree_of_session(procs: &[ProcStat], sid: i32) -> HashSet<i32> {
    tree_of(procs, |p| p.sid == sid)
}

/// The processes `root` selects and all their descendants, in `procs`.
fn tree_of(procs: &[ProcStat], root: impl Fn(&ProcStat) -> bool) -> HashSet<i32> {
    let mut children: HashMap<i32, Vec<i32>> = HashMap::new();
    for p in procs {
        children.entry(p.ppid).or_default().push(p.pid);
    }
    let mut found: HashSet<i32> = HashSet::new();
    let mut todo: Vec<i32> = procs.iter().filter(|p| root(p)).map(|p| p.pid).collect();
    while let Some(pid) = todo.pop() {
        if found.insert(pid) {
            todo.extend(children.get(&pid).into_iter().flatten().copied());
        }
    }
    found
}

/// SIGKILLs group `pgid` and everything it started (see the module doc); returns how many
/// processes were signalled by pid (zombies included) beyond the group kill. Never signals
/// the daemon itself.
///
/// Each round first stops the group and every process found (SIGSTOP), so no parent dies —
/// sending its children off to the daemon, out of reach of the tree — and nothing forks
/// while the tree is read; then it kills what it found.
pub fn kill_tree(pgid: i32) -> usize {
    kill_found(Some(pgid), |procs| tree_of_group(procs, pgid))
}

/// SIGKILLs every process of session `sid` and everything they started, as [`kill_tree`]
/// does for a group; returns how many processes were signalled.
pub fn kill_session(sid: i32) -> usize {
    kill_found(None, |procs| tree_of_session(procs, sid))
}

/// [`kill_tree`] on a thread of its own, so a long kill does not stall the runtime; inline
/// when no thread can be made (a fork bomb at the pids limit is exactly when it must run).
pub async fn kill_tree_off_thread(pgid: i32) -> usize {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("kill-tree".into())
        .spawn(move || {
            let _ = tx.send(kill_tree(pgid));
        });
    match spawned {
        Ok(_) => rx.await.unwrap_or(0),
        Err(e) => {
            tracing::warn!(error = %e, "no thread for the kill (pids limit?): killing inline");
            kill_tree(pgid)
        }
    }
}

/// The stop-then-kill rounds of [`kill_tree`] over what `find` selects (and group `pgid`
/// as a whole, when given).
fn kill_found(pgid: Option<i32>, find: impl Fn(&[ProcStat]) -> HashSet<i32>) -> usize {
    let me = i32::try_from(std::process::id()).unwrap_or(i32::MAX);
    let found = |procs: &[ProcStat]| -> HashSet<i32> {
        find(procs)
            .into_iter()
            .filter(|p| *p != me && *p > 1)
            .collect()
    };
    let group = |sig| {
        if let Some(g) = pgid {
            let _ = killpg(Pid::from_raw(g), sig);
        }
    };
    let mut signalled = HashSet::new();
    for _ in 0..MAX_ROUNDS {
        group(Signal::SIGSTOP);
        let mut tree = found(&processes());
        for pid in &tree {
            let _ = kill(Pid::from_raw(*pid), Signal::SIGSTOP);
        }
        // Children forked between the group's stop and their parent's.
        tree.extend(found(&processes()));
        group(Signal::SIGKILL);
        for pid in &tree {
            // A zombie or a process already gone: nothing to do.
            if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                signalled.insert(*pid);
            }
        }
        if !any_alive(&found(&processes())) {
            break;
        }
    }
    signalled.len()
}

/// Whether any of `pids` is still running (zombies are dead).
fn any_alive(pids: &HashSet<i32>) -> bool {
    pids.iter().any(|pid| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|t| {
                t.rsplit_once(')')
                    .and_then(|(_, r)| r.split_whitespace().next().map(|s| s != "Z"))
            })
            .unwrap_or(false)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let s = parse_stat("42 (a) b (c)) S 1 40 40 0 -1 4194560").expect("parses");
        assert_eq!(
            s,
            ProcStat {
                pid: 42,
                ppid: 1,
                pgid: 40,
                sid: 40
            }
        );
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn the_tree_follows_children_that_left_the_group() {
        let p = |pid, ppid, pgid| ProcStat {
            pid,
            ppid,
            pgid,
            sid: 1,
        };
        // 10 leads group 10; 11 is in it; 12 (child of 11) left for group 12 and has a child
        // 13; 20 is unrelated; 30 is an orphan still in group 10.
        let procs = [
            p(10, 1, 10),
            p(40, 1, 41),
            p(41, 40, 41),
            p(11, 10, 10),
            p(12, 11, 12),
            p(13, 12, 12),
            p(20, 1, 20),
            p(30, 1, 10),
        ];
        let t = tree_of_group(&procs, 10);
        let mut v: Vec<i32> = t.into_iter().collect();
        v.sort_unstable();
        assert_eq!(v, vec![10, 11, 12, 13, 30]);
        // A leader that moved to another group is still its group's, with its children.
        let mut v: Vec<i32> = tree_of_group(&procs, 40).into_iter().collect();
        v.sort_unstable();
        assert_eq!(v, vec![40, 41]);
        // Every process above is in session 1.
        assert_eq!(tree_of_session(&procs, 1).len(), procs.len());
        assert!(tree_of_session(&procs, 99).is_empty());
    }
}
