//! The Docker engine for tests, through the `docker` CLI.
//!
//! Test support only: the orchestrator itself talks to the engine through bollard. No image
//! registry is reachable, so the one test image is built locally `FROM scratch` out of
//! Debian's static busybox, once per machine (a file lock serialises parallel test processes).

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command, Output};

use anyhow::Context;

/// The tag of the test image built by [`busybox_image`].
pub const BUSYBOX_IMAGE: &str = "tether-test/busybox:latest";

/// The label that test-made containers may carry so [`remove_labeled`] can clean them up.
pub const TEST_RUN_LABEL: &str = "tether.test.run";

fn docker(args: &[&str]) -> anyhow::Result<Output> {
    Command::new("docker").args(args).output().with_context(|| {
        format!(
            "run `docker {}` (is the docker CLI installed?)",
            args.join(" ")
        )
    })
}

/// True when the Docker engine answers (`docker version` reaches the server).
pub fn available() -> bool {
    docker(&["version", "--format", "{{.Server.Version}}"]).is_ok_and(|o| o.status.success())
}

fn image_exists(tag: &str) -> bool {
    docker(&["image", "inspect", "--format", "{{.Id}}", tag]).is_ok_and(|o| o.status.success())
}

/// Builds (when missing) `tether-test/busybox:latest`: `FROM scratch` with `/bin/busybox`
/// (Debian's busybox-static; path from env `TETHER_BUSYBOX`, else `/bin/busybox`), a symlink
/// per applet in `/bin` (like `busybox --install -s /bin`), `/tmp` (mode 1777), `/work`,
/// minimal `/etc/passwd` and `/etc/group`, `PATH=/bin`, no entrypoint, `CMD ["sh"]`.
/// Parallel test processes build it once: they wait on a file lock in the system temp dir.
/// Returns the tag.
pub fn busybox_image() -> anyhow::Result<String> {
    if image_exists(BUSYBOX_IMAGE) {
        return Ok(BUSYBOX_IMAGE.into());
    }
    let lock_path = std::env::temp_dir().join("tether-test-busybox.lock");
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    // Released when `_guard` drops (also if this process dies).
    let _guard = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| anyhow::anyhow!("cannot lock {}: {e}", lock_path.display()))?;
    if !image_exists(BUSYBOX_IMAGE) {
        build_busybox_image(BUSYBOX_IMAGE)?;
    }
    Ok(BUSYBOX_IMAGE.into())
}

/// Builds the busybox test image under `tag` unconditionally (no lock; [`busybox_image`] is
/// the entry point for tests that just need the image).
pub fn build_busybox_image(tag: &str) -> anyhow::Result<()> {
    let busybox = std::env::var("TETHER_BUSYBOX")
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/bin/busybox".into());
    let ctx = tempfile::Builder::new()
        .prefix("tether-busybox-ctx-")
        .tempdir()
        .context("create build context dir")?;
    let root = ctx.path().join("root");
    for d in ["bin", "tmp", "work", "etc", "root"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::set_permissions(root.join("work"), std::fs::Permissions::from_mode(0o755))?;
    std::fs::copy(&busybox, root.join("bin/busybox")).with_context(|| {
        format!("copy {busybox} (install Debian's busybox-static, or set TETHER_BUSYBOX)")
    })?;
    std::fs::set_permissions(
        root.join("bin/busybox"),
        std::fs::Permissions::from_mode(0o755),
    )?;
    let list = Command::new(&busybox)
        .arg("--list")
        .output()
        .with_context(|| format!("run `{busybox} --list`"))?;
    if !list.status.success() {
        anyhow::bail!(
            "`{busybox} --list` failed ({}): {}",
            list.status,
            String::from_utf8_lossy(&list.stderr)
        );
    }
    let applets = String::from_utf8_lossy(&list.stdout);
    let mut count = 0usize;
    for applet in applets
        .lines()
        .map(str::trim)
        .filter(|a| !a.is_empty() && *a != "busybox" && !a.contains('/'))
    {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet))
            .with_context(|| format!("symlink applet {applet}"))?;
        count += 1;
    }
    if count == 0 {
        anyhow::bail!("`{busybox} --list` printed no applets");
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(root.join("etc/group"), "root:x:0:\nnobody:x:65534:\n")?;
    write_dockerfile(ctx.path())?;
    build(tag, ctx.path())?;
    Ok(())
}

/// Builds `tag`: `FROM scratch` with the dynamically linked `binary` (a workspace binary, e.g.
/// from [`crate::cargo_bin`]) as its entrypoint, plus the shared libraries `ldd` names for it
/// at the same paths (the loader included), an empty `/tmp` (1777) and `/etc/passwd`. Built
/// every time (the engine's layer cache makes an unchanged one cheap). Returns the tag.
pub fn build_binary_image(tag: &str, binary: &Path) -> anyhow::Result<String> {
    let ctx = tempfile::Builder::new()
        .prefix("tether-bin-ctx-")
        .tempdir()
        .context("create build context dir")?;
    let root = ctx.path().join("root");
    for d in ["tmp", "etc", "bin"] {
        std::fs::create_dir_all(root.join(d))?;
    }
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/false\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    let name = binary
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("{} has no file name", binary.display()))?;
    std::fs::copy(binary, root.join("bin").join(name))
        .with_context(|| format!("copy {}", binary.display()))?;
    let ldd = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run `ldd` (install libc-bin)")?;
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let dest = root.join(lib.trim_start_matches('/'));
        if let Some(dir) = dest.parent() {
            std::fs::create_dir_all(dir)?;
        }
        // Follows symlinks: the library itself under the name the binary asks for.
        std::fs::copy(lib, &dest).with_context(|| format!("copy {lib}"))?;
    }
    std::fs::write(
        ctx.path().join("Dockerfile"),
        format!("FROM scratch\nCOPY root/ /\nENTRYPOINT [\"/bin/{name}\"]\n"),
    )
    .context("write Dockerfile")?;
    build(tag, ctx.path())?;
    Ok(tag.to_string())
}

/// `docker build -q -t tag ctx`.
fn build(tag: &str, ctx: &Path) -> anyhow::Result<()> {
    let ctx_arg = ctx.display().to_string();
    let out = docker(&["build", "-q", "-t", tag, &ctx_arg])?;
    if !out.status.success() {
        anyhow::bail!(
            "`docker build -t {tag}` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `COPY` keeps the modes set in the context (1777 on /tmp), so no `RUN` step is needed.
fn write_dockerfile(ctx: &Path) -> anyhow::Result<()> {
    std::fs::write(
        ctx.join("Dockerfile"),
        "FROM scratch\n\
         COPY root/ /\n\
         ENV PATH=/bin\n\
         WORKDIR /\n\
         CMD [\"sh\"]\n",
    )
    .context("write Dockerfile")
}

/// Removes (force, with anonymous volumes) every container matching the label filter `label`
/// (`key` or `key=value`, e.g. `tether.test.run=<id>`). Returns how many were removed.
pub fn remove_labeled(label: &str) -> anyhow::Result<usize> {
    let ids = listed(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={label}"),
    ])?;
    if ids.is_empty() {
        return Ok(0);
    }
    let mut args = vec!["rm", "-f", "-v"];
    args.extend(ids.iter().map(String::as_str));
    let out = docker(&args)?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    // A container that went away meanwhile (e.g. `--rm`) is not an error.
    let real_errors: Vec<&str> = stderr
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains("No such container"))
        .collect();
    if !out.status.success() && !real_errors.is_empty() {
        anyhow::bail!("`docker rm -f` failed: {}", real_errors.join("\n"));
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count())
}

/// Removes (force, with anonymous volumes) every network matching the label filter `label`.
/// Returns how many were removed.
pub fn remove_labeled_networks(label: &str) -> anyhow::Result<usize> {
    let ids = listed(&["network", "ls", "-q", "--filter", &format!("label={label}")])?;
    Ok(ids
        .iter()
        .filter(|id| docker(&["network", "rm", id]).is_ok_and(|o| o.status.success()))
        .count())
}

/// The non-empty lines a listing command (`docker ps -q …`, `docker network ls -q …`) printed.
fn listed(args: &[&str]) -> anyhow::Result<Vec<String>> {
    let out = docker(args)?;
    if !out.status.success() {
        anyhow::bail!(
            "`docker {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_string)
        .collect())
}

/// What a test created on the engine, removed when this drops (also when the test panics):
/// containers and networks by label (e.g. `tether.host=<host id>`, which the orchestrator
/// sets on everything it makes), and containers by name.
#[derive(Debug, Default)]
pub struct Cleanup {
    labels: Vec<String>,
    names: Vec<String>,
}

impl Cleanup {
    /// Also remove every container and network labelled `label` (`key=value`).
    pub fn label(&mut self, label: impl Into<String>) {
        self.labels.push(label.into());
    }

    /// Also remove the container named (or with id) `name`.
    pub fn name(&mut self, name: impl Into<String>) {
        self.names.push(name.into());
    }

    /// Removes everything named now (it is removed again, harmlessly, on drop).
    pub fn run(&self) {
        for l in &self.labels {
            let _ = remove_labeled(l);
        }
        if !self.names.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(self.names.iter().map(String::as_str));
            let _ = docker(&args);
        }
        // Networks after containers: a network with endpoints cannot be removed.
        for l in &self.labels {
            let _ = remove_labeled_networks(l);
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if !self.labels.is_empty() || !self.names.is_empty() {
            self.run();
        }
    }
}

/// The label the orchestrator puts on every container and network it makes for host `host_id`.
pub fn host_label(host_id: &str) -> String {
    format!("tether.host={host_id}")
}

/// Ids (full) of every container, running or not, labelled `label`, sorted.
pub fn labeled_containers(label: &str) -> Vec<String> {
    let mut v = listed(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={label}"),
    ])
    .unwrap_or_default();
    v.sort();
    v
}

/// `docker ARGS...`: its stdout, trimmed (empty when it failed; tests assert on the output).
pub fn run(args: &[&str]) -> String {
    docker(args)
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// One exec of `true` in container `id` through the engine's exec API (create, start, read to
/// the end, inspect): the baseline the exec benches compare with. Panics when it fails.
pub async fn engine_exec_true(d: &bollard::Docker, id: &str) {
    use futures::StreamExt;
    let e = d
        .create_exec(
            id,
            bollard::exec::CreateExecOptions::<String> {
                attach_stdout: Some(true),
                attach_stderr: Some(true),
                cmd: Some(vec!["true".into()]),
                ..Default::default()
            },
        )
        .await
        .expect("create the exec");
    if let bollard::exec::StartExecResults::Attached { mut output, .. } =
        d.start_exec(&e.id, None).await.expect("start the exec")
    {
        while output.next().await.is_some() {}
    }
    let r = d.inspect_exec(&e.id).await.expect("inspect the exec");
    assert_eq!(r.exit_code, Some(0), "`true` failed through the exec API");
}

/// One `docker exec <id> true` (the CLI baseline of the exec benches). Panics when it fails.
pub fn cli_exec_true(id: &str) {
    let s = Command::new("docker")
        .args(["exec", id, "true"])
        .status()
        .expect("run `docker exec`");
    assert!(s.success(), "`docker exec {id} true` failed: {s}");
}
