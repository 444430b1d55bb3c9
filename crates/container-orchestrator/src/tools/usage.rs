//! What a tool run used — peak memory and CPU time — sampled from the moment its container
//! starts until it stops.
//!
//! The container's cgroup files are read directly when this process can see them (the
//! orchestrator on the engine's host, as usual): a read costs microseconds and waits for
//! nothing, so a run of a second has several samples and the last one is at most one
//! interval before the tool ended. The engine's stats endpoint answers from its collector,
//! which reads every container once a cycle: Docker 20.10 makes even a `one-shot` read wait
//! up to a second for that cycle, longer when the engine is busy, so a run of a few seconds
//! could end before its first answer (and report `samples: 0`). Where the files are not
//! visible (a remote engine, a private cgroup namespace) the engine's stats are read
//! instead, from the start.
//!
//! An exited container's cgroup is gone, and its figures with it (the engine then reports
//! zeros): the final reading is taken before the orchestrator kills a container at its
//! deadline or on cancel; a tool that exits on its own was last read one interval before.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bollard::query_parameters::StatsOptionsBuilder;
use futures::StreamExt;
use tether_proto::ResourceUsage;

/// How often the cgroup files are read.
const CGROUP_EVERY: Duration = Duration::from_millis(100);
/// How often the engine's stats are read (when the cgroup files are not visible).
const ENGINE_EVERY: Duration = Duration::from_millis(250);
/// How long the reading before a kill may wait for the engine.
const ENGINE_FINAL_WAIT: Duration = Duration::from_secs(2);

const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// Where a container's figures live in the cgroup file system.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cgroup {
    /// cgroup v1: the `cpuacct` and `memory` hierarchies' directories.
    V1 { cpuacct: PathBuf, memory: PathBuf },
    /// cgroup v2: the one directory.
    V2(PathBuf),
}

impl Cgroup {
    /// (peak memory in bytes, CPU time in ns); `None` once the cgroup is gone.
    fn read(&self) -> Option<(u64, u64)> {
        let num =
            |p: PathBuf| -> Option<u64> { std::fs::read_to_string(p).ok()?.trim().parse().ok() };
        match self {
            Cgroup::V1 { cpuacct, memory } => {
                let cpu = num(cpuacct.join("cpuacct.usage"))?;
                let peak = num(memory.join("memory.max_usage_in_bytes"))
                    .or_else(|| num(memory.join("memory.usage_in_bytes")))?;
                Some((peak, cpu))
            }
            Cgroup::V2(dir) => {
                let stat = std::fs::read_to_string(dir.join("cpu.stat")).ok()?;
                let usec = stat.lines().find_map(|l| {
                    l.strip_prefix("usage_usec ")
                        .and_then(|v| v.trim().parse::<u64>().ok())
                })?;
                // `memory.peak` is Linux 5.19 and later; before, the current usage.
                let peak =
                    num(dir.join("memory.peak")).or_else(|| num(dir.join("memory.current")))?;
                Some((peak, usec.saturating_mul(1000)))
            }
        }
    }
}

/// The container's cgroup under `root`: the engine's usual places (cgroupfs and systemd
/// drivers), else the paths its first process (`pid`, when known) is in.
fn locate(root: &Path, id: &str, pid: Option<i64>) -> Option<Cgroup> {
    let usual = [
        format!("docker/{id}"),
        format!("system.slice/docker-{id}.scope"),
    ];
    if root.join("cgroup.controllers").exists() {
        if let Some(dir) = usual
            .iter()
            .map(|rel| root.join(rel))
            .find(|d| d.join("cpu.stat").exists())
        {
            return Some(Cgroup::V2(dir));
        }
    } else if let Some(rel) = usual.iter().find(|rel| {
        root.join("cpuacct")
            .join(rel)
            .join("cpuacct.usage")
            .exists()
            && root.join("memory").join(rel).exists()
    }) {
        return Some(Cgroup::V1 {
            cpuacct: root.join("cpuacct").join(rel),
            memory: root.join("memory").join(rel),
        });
    }
    let pid = pid.filter(|p| *p > 0)?;
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    from_proc(root, &text)
}

/// The cgroup named by a `/proc/<pid>/cgroup` listing.
fn from_proc(root: &Path, text: &str) -> Option<Cgroup> {
    let mut cpuacct = None;
    let mut memory = None;
    let mut unified = None;
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let rel = path.trim_start_matches('/');
        let controllers: Vec<&str> = controllers.split(',').collect();
        if controllers.contains(&"cpuacct") {
            cpuacct = Some(root.join("cpuacct").join(rel));
        }
        if controllers.contains(&"memory") {
            memory = Some(root.join("memory").join(rel));
        }
        if controllers == [""] {
            unified = Some(root.join(rel));
        }
    }
    match (cpuacct, memory, unified) {
        (Some(cpuacct), Some(memory), _) if cpuacct.join("cpuacct.usage").exists() => {
            Some(Cgroup::V1 { cpuacct, memory })
        }
        (_, _, Some(dir)) if dir.join("cpu.stat").exists() => Some(Cgroup::V2(dir)),
        _ => None,
    }
}

fn note(usage: &Mutex<ResourceUsage>, peak: u64, cpu_ns: u64) {
    if peak == 0 && cpu_ns == 0 {
        // An exited container's engine stats are all zeros.
        return;
    }
    let mut u = usage.lock().unwrap_or_else(|p| p.into_inner());
    u.samples += 1;
    u.peak_memory_bytes = u.peak_memory_bytes.max(peak);
    u.cpu_time_ms = u.cpu_time_ms.max(cpu_ns / 1_000_000);
}

/// One read of the engine's stats: (peak memory, CPU ns).
async fn engine_read(docker: &bollard::Docker, id: &str) -> Option<(u64, u64)> {
    let opts = StatsOptionsBuilder::default()
        .stream(false)
        .one_shot(true)
        .build();
    let st = docker.stats(id, Some(opts)).next().await?.ok()?;
    let mem = st.memory_stats.as_ref();
    let peak = mem
        .and_then(|m| m.max_usage.or(m.usage))
        .unwrap_or(0)
        .max(mem.and_then(|m| m.usage).unwrap_or(0));
    let cpu = st
        .cpu_stats
        .as_ref()
        .and_then(|c| c.cpu_usage.as_ref())
        .and_then(|u| u.total_usage)
        .unwrap_or(0);
    Some((peak, cpu))
}

/// Samples one container's usage in the background while its run is watched.
pub struct Sampler {
    docker: bollard::Docker,
    id: String,
    usage: Arc<Mutex<ResourceUsage>>,
    /// Set once the sampler has looked for the cgroup (`None`: not visible here).
    cgroup: Arc<OnceLock<Option<Cgroup>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    /// Starts sampling a started (or adopted) container at once.
    pub fn start(docker: &bollard::Docker, id: &str) -> Sampler {
        let usage = Arc::new(Mutex::new(ResourceUsage::default()));
        let cgroup = Arc::new(OnceLock::new());
        let task = tokio::spawn(run(
            docker.clone(),
            id.to_string(),
            usage.clone(),
            cgroup.clone(),
        ));
        Sampler {
            docker: docker.clone(),
            id: id.to_string(),
            usage,
            cgroup,
            task,
        }
    }

    /// One more reading now: before a kill, while the container still has its figures.
    pub async fn read_now(&self) {
        let got = match self.cgroup.get() {
            Some(Some(cg)) => cg.read(),
            _ => tokio::time::timeout(ENGINE_FINAL_WAIT, engine_read(&self.docker, &self.id))
                .await
                .ok()
                .flatten(),
        };
        if let Some((peak, cpu)) = got {
            note(&self.usage, peak, cpu);
        }
    }

    /// Stops sampling; what was read.
    pub fn stop(self) -> ResourceUsage {
        self.task.abort();
        *self.usage.lock().unwrap_or_else(|p| p.into_inner())
    }
}

async fn run(
    docker: bollard::Docker,
    id: String,
    usage: Arc<Mutex<ResourceUsage>>,
    cell: Arc<OnceLock<Option<Cgroup>>>,
) {
    let root = Path::new(CGROUP_ROOT);
    let mut cgroup = locate(root, &id, None);
    if cgroup.is_none() {
        // Not in the usual places: where its process is (one engine round trip).
        let pid = docker
            .inspect_container(&id, None)
            .await
            .ok()
            .and_then(|c| c.state)
            .and_then(|s| s.pid);
        cgroup = locate(root, &id, pid);
    }
    let cgroup = cell.get_or_init(|| cgroup).clone();
    let every = if cgroup.is_some() {
        CGROUP_EVERY
    } else {
        ENGINE_EVERY
    };
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let got = match &cgroup {
            Some(cg) => match cg.read() {
                Some(r) => Some(r),
                // Gone: the container stopped, nothing more to read.
                None => return,
            },
            // Gone, or the engine is busy: the next tick tries again (the run's watcher
            // decides when sampling ends).
            None => engine_read(&docker, &id).await,
        };
        if let Some((peak, cpu)) = got {
            note(&usage, peak, cpu);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroups_are_found_and_read_in_both_layouts() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let id = "abc123";
        // Nothing there: not found.
        assert_eq!(locate(root, id, None), None);
        // v1, cgroupfs driver.
        let cpu = root.join("cpuacct/docker").join(id);
        let mem = root.join("memory/docker").join(id);
        std::fs::create_dir_all(&cpu).expect("mkdir");
        std::fs::create_dir_all(&mem).expect("mkdir");
        std::fs::write(cpu.join("cpuacct.usage"), "2500000000\n").expect("write");
        std::fs::write(mem.join("memory.max_usage_in_bytes"), "4096\n").expect("write");
        let cg = locate(root, id, None).expect("v1");
        assert_eq!(cg.read(), Some((4096, 2_500_000_000)));
        // Gone: nothing to read.
        std::fs::remove_dir_all(&cpu).expect("rm");
        assert_eq!(cg.read(), None);

        // v2, systemd driver.
        let dir2 = tempfile::tempdir().expect("tempdir");
        let root = dir2.path();
        std::fs::write(root.join("cgroup.controllers"), "cpu memory\n").expect("write");
        let scope = root.join(format!("system.slice/docker-{id}.scope"));
        std::fs::create_dir_all(&scope).expect("mkdir");
        std::fs::write(
            scope.join("cpu.stat"),
            "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n",
        )
        .expect("write");
        std::fs::write(scope.join("memory.current"), "8192\n").expect("write");
        let cg = locate(root, id, None).expect("v2");
        assert_eq!(cg.read(), Some((8192, 1_500_000)));
        std::fs::write(scope.join("memory.peak"), "16384\n").expect("write");
        assert_eq!(cg.read(), Some((16384, 1_500_000)));

        // Elsewhere, named by the process's listing.
        let other = root.join("custom/parent");
        std::fs::create_dir_all(&other).expect("mkdir");
        std::fs::write(other.join("cpu.stat"), "usage_usec 7\n").expect("write");
        std::fs::write(other.join("memory.current"), "1\n").expect("write");
        assert_eq!(
            from_proc(root, "0::/custom/parent\n"),
            Some(Cgroup::V2(other))
        );
    }

    #[test]
    fn a_zero_reading_is_not_a_sample() {
        let u = Mutex::new(ResourceUsage::default());
        note(&u, 0, 0);
        assert_eq!(u.lock().expect("lock").samples, 0);
        note(&u, 10, 3_000_000);
        note(&u, 5, 2_000_000);
        let u = *u.lock().expect("lock");
        assert_eq!((u.samples, u.peak_memory_bytes, u.cpu_time_ms), (2, 10, 3));
    }
}
