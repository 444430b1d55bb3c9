//! Hosts: every orchestrator's record in KV (`tether_hosts`, key = host id), rewritten each
//! `host_heartbeat_ms` with what placement compares hosts by; the table of the other hosts
//! each orchestrator keeps from those records (what `hosts.list` answers); and where a new
//! space goes ([`Hosts::place`]).
//!
//! The one design decision to know — liveness: a host is live while its record keeps changing
//! *as this node sees it*. The table notes how long each revision of a record has gone
//! unchanged by this node's own clock, so the hosts' clocks need not agree; only a revision
//! seen for the first time is dated by its writer's clock (`updated_ms`), and never as older
//! than this node's previous look at that host. A host silent for `host_dead_after_ms`, or
//! whose record says it stopped, is unavailable: what would be forwarded to it is answered 503
//! at once, naming the host and how long it has been silent (after one more read of its
//! record, so a host that has just come back is served), and nothing new is placed on it. A
//! host with no record is not judged: its requests are forwarded and the bus answers (no
//! responders: 503), so an orchestrator of an older version still gets them.
//!
//! Placement: among live hosts that have the image, the most free memory — the host's
//! capacity (`capacity_memory_mb`, else the engine's total) less the memory limits of its
//! running managed containers — then the fewest running managed containers, then the lowest
//! host id. Records are up to one beat old, so creates in quick succession may all go to the
//! host that was the freest at its last beat. This host's image is asked of its engine; the
//! others' come from their records (tags, digests and ids; `busybox` is `busybox:latest`).
//!
//! Nothing moves a space: a space bound to a host that is gone stays bound there and is
//! answered 503 until the host returns; no other host makes it again (each host's janitor
//! reconciles only its own bindings).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bollard::models::ContainerSummaryStateEnum;
use tether_bus::kv::{Bucket, Change};
use tether_bus::{Ctx, Encoding, Problem};
use tether_proto::{HostList, HostRecord, HostStatus};

use crate::config::OrchestratorConfig;
use crate::docker::{Engine, EngineError};

/// How long a record outlives its host's last heartbeat in KV; after that the host is not
/// judged any more (a host taken out of the fleet disappears from `hosts.list`).
const RECORD_MAX_AGE: Duration = Duration::from_secs(86_400);

/// Image names a record carries at most (a host with more is matched on these only).
const MAX_IMAGES: usize = 1024;

/// This host's record, the other hosts' as last read, and the settings that judge them.
pub struct Hosts {
    me: String,
    bucket: Bucket<HostRecord>,
    beat: Duration,
    dead_after: Duration,
    capacity_mb: u32,
    own: Mutex<HostRecord>,
    table: Mutex<HashMap<String, Seen>>,
}

/// A host's record as this node saw it.
#[derive(Clone, Debug)]
struct Seen {
    record: HostRecord,
    revision: u64,
    /// How long the record had gone unchanged when this node last read it.
    silent: Duration,
    /// When this node last read it.
    checked: Instant,
}

impl Seen {
    fn silence(&self, now: Instant) -> Duration {
        self.silent + now.saturating_duration_since(self.checked)
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Liveness {
    Live,
    Silent(Duration),
    Stopped(Duration),
}

fn liveness(s: &Seen, now: Instant, dead_after: Duration) -> Liveness {
    let silent = s.silence(now);
    if s.record.stopped_ms != 0 {
        Liveness::Stopped(silent)
    } else if silent >= dead_after {
        Liveness::Silent(silent)
    } else {
        Liveness::Live
    }
}

/// Notes a record read at `now` (`wall_ms`: this node's clock, unix milliseconds).
fn observe(
    table: &mut HashMap<String, Seen>,
    host: &str,
    mut record: HostRecord,
    revision: u64,
    now: Instant,
    wall_ms: i64,
) {
    record.host_id = host.to_string();
    let prev = table.get(host);
    let silent = match prev {
        Some(p) if p.revision == revision => p.silence(now),
        _ => {
            // Written after this node's previous look, if it had one; by the writer's clock
            // otherwise (a clock ahead of ours counts as just now).
            let claimed = u64::try_from(wall_ms.saturating_sub(record.updated_ms))
                .map_or(Duration::ZERO, Duration::from_millis);
            let bound = prev.map_or(Duration::MAX, |p| now.saturating_duration_since(p.checked));
            claimed.min(bound)
        }
    };
    table.insert(
        host.to_string(),
        Seen {
            record,
            revision,
            silent,
            checked: now,
        },
    );
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Hosts {
    /// Opens (or creates) the bucket; this host's record starts empty until
    /// [`Hosts::measure`].
    pub async fn open(
        js: &jetstream::Context,
        cfg: &OrchestratorConfig,
        me: &str,
        engine_memory_mb: i64,
        cpus: f64,
    ) -> anyhow::Result<Hosts> {
        let config = kv::Config {
            bucket: cfg.hosts_bucket.clone(),
            description: "tether: hosts (orchestrator heartbeats and capacity)".into(),
            history: 1,
            max_age: RECORD_MAX_AGE,
            num_replicas: cfg.kv_replicas.max(1),
            storage: jetstream::stream::StorageType::File,
            ..Default::default()
        };
        let beat = Duration::from_millis(cfg.host_heartbeat_ms);
        let bucket = Bucket::open(js, config, Encoding::Json)
            .await?
            .named("host records")
            .timeout(beat.max(Duration::from_secs(1)));
        let capacity_mb = match cfg.capacity_memory_mb {
            0 => u32::try_from(engine_memory_mb.max(0)).unwrap_or(u32::MAX),
            n => n,
        };
        Ok(Hosts {
            own: Mutex::new(HostRecord {
                host_id: me.to_string(),
                capacity_memory_mb: capacity_mb,
                free_memory_mb: capacity_mb,
                cpus,
                ..Default::default()
            }),
            me: me.to_string(),
            bucket,
            beat,
            dead_after: Duration::from_millis(cfg.host_dead_after_ms),
            capacity_mb,
            table: Mutex::default(),
        })
    }

    pub fn me(&self) -> &str {
        &self.me
    }

    /// Reads this host's facts from the engine into its record: images, running managed
    /// containers and the memory their limits take.
    pub async fn measure(&self, engine: &Engine) -> Result<(), EngineError> {
        let mut images = engine.image_refs().await?;
        images.truncate(MAX_IMAGES);
        let (mut used_mb, mut running) = (0i64, 0u32);
        for c in engine.list_managed("", "", "").await? {
            let Some(id) = c.id.as_deref() else { continue };
            if c.state != Some(ContainerSummaryStateEnum::RUNNING) {
                continue;
            }
            running += 1;
            // Cached after the first look: a managed container's limit never changes.
            match engine.managed(id).await {
                Ok(m) => used_mb += m.memory_mb.max(0),
                Err(e) => tracing::debug!(container = id, error = %e, "cannot read a limit"),
            }
        }
        let free = (i64::from(self.capacity_mb) - used_mb).max(0);
        let mut own = lock(&self.own);
        own.free_memory_mb = u32::try_from(free).unwrap_or(u32::MAX);
        own.containers = running;
        own.images = images;
        Ok(())
    }

    /// Writes this host's record, stamped now (and marked stopped when `stopped`).
    pub async fn publish(&self, stopped: bool) -> Result<(), Problem> {
        let record = {
            let mut own = lock(&self.own);
            own.updated_ms = wall_ms();
            own.stopped_ms = if stopped { own.updated_ms } else { 0 };
            own.clone()
        };
        self.bucket
            .modify(&self.me, |_| Ok(Change::Write(record.clone())))
            .await?;
        Ok(())
    }

    /// Reads every other host's record into the table (a host whose record is gone leaves it).
    pub async fn poll(&self) -> Result<(), Problem> {
        let mut read = Vec::new();
        for host in self.bucket.keys().await? {
            if host == self.me {
                continue;
            }
            if let Some((r, rev)) = self.bucket.get(&host).await? {
                read.push((host, r, rev));
            }
        }
        let (now, wall) = (Instant::now(), wall_ms());
        let mut t = lock(&self.table);
        t.retain(|h, _| read.iter().any(|(r, _, _)| r == h));
        for (host, r, rev) in read {
            observe(&mut t, &host, r, rev, now, wall);
        }
        Ok(())
    }

    /// Reads one host's record again.
    async fn recheck(&self, host: &str) -> Result<(), Problem> {
        let got = self.bucket.get(host).await?;
        let (now, wall) = (Instant::now(), wall_ms());
        let mut t = lock(&self.table);
        match got {
            Some((r, rev)) => observe(&mut t, host, r, rev, now, wall),
            None => {
                t.remove(host);
            }
        }
        Ok(())
    }

    /// Why what lives on `host` cannot be reached there now (`None`: send it on). A refusal
    /// is checked once more against the host's record first.
    pub async fn refusal(&self, host: &str) -> Option<Problem> {
        self.unavailable(host)?;
        if let Err(p) = self.recheck(host).await {
            tracing::debug!(host, error = %p, "cannot read the host's record again");
        }
        self.unavailable(host)
    }

    /// [`Hosts::refusal`] from the table alone.
    pub fn unavailable(&self, host: &str) -> Option<Problem> {
        if host == self.me {
            return None;
        }
        let t = lock(&self.table);
        let why = match liveness(t.get(host)?, Instant::now(), self.dead_after) {
            Liveness::Live => return None,
            Liveness::Silent(d) => format!("no heartbeat for {:.1} s", d.as_secs_f64()),
            Liveness::Stopped(d) => {
                format!("its orchestrator stopped {:.1} s ago", d.as_secs_f64())
            }
        };
        Some(Problem::unavailable(format!(
            "host `{host}` is unavailable ({why})"
        )))
    }

    /// The host a new space of `image` goes to (this one has it when `here_has_image`);
    /// `None` when no live host has it.
    pub fn place(&self, image: &str, here_has_image: bool) -> Option<String> {
        self.candidates(image, here_has_image).into_iter().next()
    }

    /// Every live host that has `image` (this one when `here_has_image`), in placement order:
    /// the host [`Hosts::place`] picks first.
    pub fn candidates(&self, image: &str, here_has_image: bool) -> Vec<String> {
        let now = Instant::now();
        let own = lock(&self.own).clone();
        let t = lock(&self.table);
        let others = t
            .values()
            .filter(|s| liveness(s, now, self.dead_after) == Liveness::Live)
            .map(|s| &s.record)
            .filter(|r| has_image(&r.images, image));
        let mut hosts: Vec<&HostRecord> = here_has_image
            .then_some(&own)
            .into_iter()
            .chain(others)
            .collect();
        hosts.sort_by(|a, b| placement_order(a, b));
        hosts.into_iter().map(|r| r.host_id.clone()).collect()
    }

    /// Every host with a record: this one first, then the others by id.
    pub fn list(&self) -> HostList {
        let now = Instant::now();
        let mut hosts = vec![HostStatus {
            record: Some(lock(&self.own).clone()),
            live: true,
            silent_ms: 0,
        }];
        let t = lock(&self.table);
        let mut others: Vec<&Seen> = t.values().collect();
        others.sort_by(|a, b| a.record.host_id.cmp(&b.record.host_id));
        hosts.extend(others.into_iter().map(|s| HostStatus {
            record: Some(s.record.clone()),
            live: liveness(s, now, self.dead_after) == Liveness::Live,
            silent_ms: u64::try_from(s.silence(now).as_millis()).unwrap_or(u64::MAX),
        }));
        HostList { hosts }
    }
}

/// The host placement picks among `hosts`: the most free memory, then the fewest running
/// containers, then the lowest host id.
pub fn choose<'a>(hosts: impl IntoIterator<Item = &'a HostRecord>) -> Option<&'a HostRecord> {
    hosts.into_iter().min_by(|a, b| placement_order(a, b))
}

/// The order of [`choose`]: the host it picks compares first.
fn placement_order(a: &HostRecord, b: &HostRecord) -> std::cmp::Ordering {
    b.free_memory_mb
        .cmp(&a.free_memory_mb)
        .then(a.containers.cmp(&b.containers))
        .then(a.host_id.cmp(&b.host_id))
}

/// An image reference as the engine lists it: Docker Hub's implicit names dropped, `:latest`
/// when it names no tag or digest.
fn normalize_image(r: &str) -> String {
    let mut r = r;
    for hub in ["docker.io/", "index.docker.io/", "registry-1.docker.io/"] {
        if let Some(rest) = r.strip_prefix(hub) {
            r = rest;
            break;
        }
    }
    if let Some(rest) = r.strip_prefix("library/")
        && !rest.contains('/')
    {
        r = rest;
    }
    let last = r.rsplit('/').next().unwrap_or(r);
    if r.contains('@') || r.starts_with("sha256:") || last.contains(':') {
        r.to_string()
    } else {
        format!("{r}:latest")
    }
}

/// Whether a host whose engine lists `images` has the image `reference` (by name, digest,
/// full id, or an id prefix of at least 12 hex digits).
pub fn has_image(images: &[String], reference: &str) -> bool {
    let want = normalize_image(reference);
    let id_prefix = (reference.len() >= 12 && reference.chars().all(|c| c.is_ascii_hexdigit()))
        .then(|| format!("sha256:{reference}"));
    images
        .iter()
        .any(|i| normalize_image(i) == want || id_prefix.as_ref().is_some_and(|p| i.starts_with(p)))
}

/// The heartbeat: measure, write this host's record, read the others', every beat; on
/// shutdown the record is marked stopped, so the others know at their next look.
pub async fn heartbeat(hosts: Arc<Hosts>, engine: Engine, ctx: Ctx) -> anyhow::Result<()> {
    // Log a failure when it starts and when it ends, not every beat.
    let mut failing = (false, false);
    loop {
        let beat = match hosts.measure(&engine).await {
            Ok(()) => hosts.publish(false).await.map_err(|p| p.detail),
            Err(e) => Err(format!("cannot read the engine: {e}")),
        };
        match (&beat, failing.0) {
            (Err(e), false) => {
                tracing::warn!(error = %e, "no heartbeat: the other hosts will count this one out")
            }
            (Ok(()), true) => tracing::info!("heartbeat written again"),
            _ => {}
        }
        failing.0 = beat.is_err();
        let poll = hosts.poll().await;
        match (&poll, failing.1) {
            (Err(p), false) => tracing::warn!(error = %p, "cannot read the other hosts' records"),
            (Ok(()), true) => tracing::info!("reading the other hosts' records again"),
            _ => {}
        }
        failing.1 = poll.is_err();
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tokio::time::sleep(hosts.beat) => {}
        }
    }
    hosts
        .publish(true)
        .await
        .map_err(|p| anyhow::anyhow!("cannot mark this host stopped: {p}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(host: &str, free: u32, containers: u32) -> HostRecord {
        HostRecord {
            host_id: host.into(),
            free_memory_mb: free,
            containers,
            ..Default::default()
        }
    }

    #[test]
    fn the_freest_host_wins_then_the_emptiest_then_the_first_by_id() {
        let pick = |rs: &[HostRecord]| choose(rs).map(|r| r.host_id.clone());
        let (a, b, c) = (
            record("a", 100, 0),
            record("b", 900, 5),
            record("c", 900, 2),
        );
        assert_eq!(pick(&[a.clone(), b.clone()]).as_deref(), Some("b"));
        assert_eq!(pick(&[a.clone(), b, c.clone()]).as_deref(), Some("c"));
        assert_eq!(pick(&[record("z", 900, 2), c]).as_deref(), Some("c"));
        assert_eq!(pick(&[]), None);
    }

    #[test]
    fn images_match_as_the_engine_names_them() {
        let id = format!("sha256:{}", "ab12".repeat(16));
        let images = vec![
            "busybox:latest".to_string(),
            "ghcr.io/x/tool:1.2".into(),
            "localhost:5000/y:latest".into(),
            "busybox@sha256:ffff".into(),
            id.clone(),
        ];
        for yes in [
            "busybox",
            "busybox:latest",
            "docker.io/library/busybox",
            "library/busybox:latest",
            "ghcr.io/x/tool:1.2",
            "localhost:5000/y",
            "busybox@sha256:ffff",
            id.as_str(),
            "ab12ab12ab12",
        ] {
            assert!(has_image(&images, yes), "{yes}");
        }
        for no in [
            "busybox:1.36",
            "ghcr.io/x/tool",
            "tool:1.2",
            "localhost/y",
            "ab12",
        ] {
            assert!(!has_image(&images, no), "{no}");
        }
    }

    fn seen(t: &HashMap<String, Seen>, h: &str, now: Instant) -> Liveness {
        liveness(&t[h], now, Duration::from_secs(6))
    }

    #[test]
    fn a_host_is_live_while_its_record_changes_as_this_node_sees_it() {
        let mut t = HashMap::new();
        let t0 = Instant::now();
        let wall = 1_000_000;
        let r = |updated_ms: i64| HostRecord {
            updated_ms,
            ..Default::default()
        };
        // First sight: dated by the writer's clock (one ahead of ours counts as now).
        observe(&mut t, "h", r(wall - 1000), 1, t0, wall);
        assert_eq!(t["h"].silent, Duration::from_secs(1));
        assert_eq!(seen(&t, "h", t0), Liveness::Live);
        observe(&mut t, "f", r(wall + 60_000), 1, t0, wall);
        assert_eq!(t["f"].silent, Duration::ZERO);
        // The same revision read again: the silence grows by our clock, whatever the walls.
        let t3 = t0 + Duration::from_secs(3);
        observe(&mut t, "h", r(wall - 1000), 1, t3, wall - 100_000);
        assert_eq!(t["h"].silent, Duration::from_secs(4));
        assert_eq!(
            seen(&t, "h", t3 + Duration::from_millis(1500)),
            Liveness::Live
        );
        assert_eq!(
            seen(&t, "h", t3 + Duration::from_secs(2)),
            Liveness::Silent(Duration::from_secs(6))
        );
        // A new revision was written after our last look, however far behind its clock is.
        let t4 = t3 + Duration::from_secs(1);
        observe(&mut t, "h", r(0), 2, t4, wall);
        assert_eq!(t["h"].silent, Duration::from_secs(1));
        assert_eq!(seen(&t, "h", t4), Liveness::Live);
        // A clean stop is unavailable at once.
        let mut stopped = r(wall);
        stopped.stopped_ms = wall;
        observe(&mut t, "h", stopped, 3, t4, wall);
        assert_eq!(seen(&t, "h", t4), Liveness::Stopped(Duration::ZERO));
    }
}
