//! Files the orchestrator puts into a running container: a worker replica's token and secrets
//! file, a space daemon's token (the `credentials` module renews the tokens).
//!
//! Design decision: the file goes through the engine's archive API (`PUT /containers/{id}/archive`,
//! what `docker cp` uses) into a directory that is an anonymous engine volume of the `local`
//! driver backed by tmpfs ([`secret_dir_mount`]). So:
//! - it works when the orchestrator itself runs in a container with nothing but the Docker
//!   socket: no path of the orchestrator's file system is mounted anywhere;
//! - it survives a restart of the orchestrator (the volume is the engine's and lives as long as
//!   the container; the container is removed with its anonymous volumes);
//! - the token never touches a disk (tmpfs), never appears in the container's environment,
//!   labels or command, and `docker inspect` shows only the mount point;
//! - the engine refuses archive writes into a read-only root and does not see a `--tmpfs`
//!   mount (measured on Engine 20.10: the write is refused, or lands under the mount), while a
//!   tmpfs *volume* is mounted on the engine's side too, where the write lands.
//!
//! A renewal is atomic for readers: the new content is written to the one of two files
//! (`<name>.a`, `<name>.b`) that `<name>` does not point at, then the symlink `<name>` is
//! replaced to point at it. A reader sees the old token or the new one, whole; for an instant
//! the link may be missing, which the worker libraries read as "keep the last token". Which
//! file the link points at is kept in memory, and asked of the engine ([`Engine::secret_side`])
//! for the first write after a restart of the orchestrator. The volume is writable by the container (the engine refuses archive writes into a read-only
//! mount): a replica can only spoil its own token. Each file has its mode and owner
//! ([`SecretFile`]): a replica's token is 0444 (its process may run as any user), a space
//! daemon's 0400 owned by the container's user ([`Owner::ContainerUser`]: the engine resolves
//! a user name in the container's own `/etc/passwd`, measured on Engine 20.10).

use std::collections::HashMap;

use bollard::container::PathStatResponse;
use bollard::models::{Mount, MountType, MountVolumeOptions, MountVolumeOptionsDriverConfig};
use bollard::query_parameters::{
    ContainerArchiveInfoOptionsBuilder, DownloadFromContainerOptionsBuilder,
    UploadToContainerOptionsBuilder,
};

use super::{Engine, EngineError};

/// Size of a secret directory's tmpfs.
const SECRET_DIR_BYTES: u32 = 64 * 1024;

/// The mount of a secret directory at `target`: an anonymous tmpfs volume.
pub fn secret_dir_mount(target: &str) -> Mount {
    Mount {
        target: Some(target.to_string()),
        typ: Some(MountType::VOLUME),
        read_only: Some(false),
        volume_options: Some(MountVolumeOptions {
            driver_config: Some(MountVolumeOptionsDriverConfig {
                name: Some("local".into()),
                options: Some(HashMap::from([
                    ("type".to_string(), "tmpfs".to_string()),
                    ("device".to_string(), "tmpfs".to_string()),
                    (
                        "o".to_string(),
                        format!("size={SECRET_DIR_BYTES},mode=0755,noexec,nosuid,nodev"),
                    ),
                ])),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Which of the two files a renewal writes: the one `<name>` does not point at now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::A => Side::B,
            Side::B => Side::A,
        }
    }
    fn suffix(self) -> &'static str {
        match self {
            Side::A => "a",
            Side::B => "b",
        }
    }
}

/// A file in a secret directory: where, its mode and its owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SecretFile {
    pub dir: String,
    pub name: String,
    pub mode: u32,
    pub owner: Owner,
}

/// Who owns a secret file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Root,
    /// The container's configured user (the image's, or the spec's), resolved by the engine in
    /// the container's own `/etc/passwd` when it is a name (the archive API's `copyUIDGID`).
    ContainerUser,
}

impl SecretFile {
    /// Readable by every user of the container (0444, root's).
    pub fn readable(dir: &str, name: &str) -> Self {
        Self {
            dir: dir.into(),
            name: name.into(),
            mode: 0o444,
            owner: Owner::Root,
        }
    }
}

impl Engine {
    /// The file the link `<dir>/<name>` points at now; `None` when there is no link (nothing
    /// written yet) or the engine cannot say.
    pub async fn secret_side(&self, id: &str, dir: &str, name: &str) -> Option<Side> {
        let stat = self.stat(id, &format!("{dir}/{name}")).await?;
        side_of(&stat.link_target)
    }

    /// The engine's stat of `path` in container `id` (`None`: not there, or no answer).
    async fn stat(&self, id: &str, path: &str) -> Option<PathStatResponse> {
        let opts = ContainerArchiveInfoOptionsBuilder::default()
            .path(path)
            .build();
        self.docker
            .get_container_archive_info(id, Some(opts))
            .await
            .ok()
    }

    /// Writes `content` as `<dir>/<name>.<side>` (the file's mode and owner) and points the
    /// symlink `<dir>/<name>` at it, in one archive.
    pub async fn put_secret(
        &self,
        id: &str,
        f: &SecretFile,
        side: Side,
        content: &[u8],
    ) -> Result<(), EngineError> {
        let file = format!("{}.{}", f.name, side.suffix());
        let mut tar = Vec::with_capacity(2048 + content.len());
        entry(&mut tar, &file, b'0', "", f.mode, content);
        entry(&mut tar, &f.name, b'2', &file, 0o777, &[]);
        self.upload(id, &f.dir, f.owner, tar).await
    }

    /// Ends the archive `tar` and extracts it into `dir` of container `id`, owned by `owner`.
    async fn upload(
        &self,
        id: &str,
        dir: &str,
        owner: Owner,
        mut tar: Vec<u8>,
    ) -> Result<(), EngineError> {
        tar.extend_from_slice(&[0u8; 1024]);
        let mut opts = UploadToContainerOptionsBuilder::default().path(dir);
        if owner == Owner::ContainerUser {
            opts = opts.copy_uidgid("1");
        }
        let opts = opts.build();
        Ok(self
            .docker
            .upload_to_container(id, Some(opts), bollard::body_full(tar.into()))
            .await?)
    }

    /// Writes one regular file `<dir>/<name>` (root's, `mode`) into container `id`, which
    /// may be created and never started (its volumes are the engine's either way).
    pub async fn put_file(
        &self,
        id: &str,
        dir: &str,
        name: &str,
        mode: u32,
        content: &[u8],
    ) -> Result<(), EngineError> {
        let mut tar = Vec::with_capacity(1536 + content.len());
        entry(&mut tar, name, b'0', "", mode, content);
        self.upload(id, dir, Owner::Root, tar).await
    }

    /// A taken pool container's delivery, in one archive (so one engine call): the daemon's
    /// token as side A of `token` (when there is one), then the bind file `bind_name`, the
    /// daemon's sign to start (the `pool` module), with `token`'s mode and owner.
    pub async fn put_bind(
        &self,
        id: &str,
        token: &SecretFile,
        content: Option<&[u8]>,
        bind_name: &str,
        bind: &[u8],
    ) -> Result<(), EngineError> {
        let mut tar = Vec::with_capacity(4096 + bind.len());
        if let Some(content) = content {
            let file = format!("{}.{}", token.name, Side::A.suffix());
            entry(&mut tar, &file, b'0', "", token.mode, content);
            entry(&mut tar, &token.name, b'2', &file, 0o777, &[]);
        }
        entry(&mut tar, bind_name, b'0', "", token.mode, bind);
        self.upload(id, &token.dir, token.owner, tar).await
    }

    /// The content of the regular file `path` in container `id` (at most `max` bytes), through
    /// the archive API; `None` when it is not there, not a regular file, or larger.
    pub async fn read_file(&self, id: &str, path: &str, max: usize) -> Option<Vec<u8>> {
        use futures::StreamExt;
        let opts = DownloadFromContainerOptionsBuilder::default()
            .path(path)
            .build();
        let mut s = self.docker.download_from_container(id, Some(opts));
        let mut tar = Vec::new();
        while let Some(chunk) = s.next().await {
            tar.extend_from_slice(&chunk.ok()?);
            if tar.len() > max + 2048 {
                return None;
            }
        }
        first_file(&tar, max)
    }

    /// The size of `path` in container `id`, `None` when it is not there.
    pub async fn file_size(&self, id: &str, path: &str) -> Option<i64> {
        Some(self.stat(id, path).await?.size)
    }

    /// A renewal: writes `content` as the side the link does not point at (`known`, else as
    /// the engine sees it after a restart) and returns the side written.
    pub async fn renew_secret(
        &self,
        id: &str,
        f: &SecretFile,
        known: Option<Side>,
        content: &[u8],
    ) -> Result<Side, EngineError> {
        let now_at = match known {
            Some(s) => Some(s),
            None => self.secret_side(id, &f.dir, &f.name).await,
        };
        let side = now_at.map_or(Side::A, Side::other);
        self.put_secret(id, f, side, content).await?;
        Ok(side)
    }
}

/// The content of an archive's first entry when it is a regular file of at most `max` bytes.
fn first_file(tar: &[u8], max: usize) -> Option<Vec<u8>> {
    let h = tar.get(..512)?;
    if !matches!(h[156], b'0' | 0) {
        return None;
    }
    let size = std::str::from_utf8(&h[124..136]).ok()?;
    let size = usize::from_str_radix(size.trim_matches(|c: char| c == '\0' || c == ' '), 8).ok()?;
    if size > max {
        return None;
    }
    tar.get(512..512 + size).map(<[u8]>::to_vec)
}

/// The side a link target (`token.a`, `/run/tether/token.b`) names.
fn side_of(target: &str) -> Option<Side> {
    if target.ends_with(".a") {
        Some(Side::A)
    } else if target.ends_with(".b") {
        Some(Side::B)
    } else {
        None
    }
}

/// One ustar entry: a regular file (`b'0'`) or a symlink (`b'2'`) to `link`. Names are short
/// and plain (checked by the callers' constants).
fn entry(out: &mut Vec<u8>, name: &str, kind: u8, link: &str, mode: u32, content: &[u8]) {
    let mut h = [0u8; 512];
    let put = |h: &mut [u8; 512], at: usize, v: &[u8]| h[at..at + v.len()].copy_from_slice(v);
    let octal = |v: u64, width: usize| format!("{v:0w$o}\0", w = width - 1);
    put(&mut h, 0, name.as_bytes());
    put(&mut h, 100, octal(u64::from(mode), 8).as_bytes());
    put(&mut h, 108, octal(0, 8).as_bytes());
    put(&mut h, 116, octal(0, 8).as_bytes());
    put(&mut h, 124, octal(content.len() as u64, 12).as_bytes());
    let now = chrono::Utc::now().timestamp().max(0) as u64;
    put(&mut h, 136, octal(now, 12).as_bytes());
    put(&mut h, 148, b"        ");
    h[156] = kind;
    put(&mut h, 157, link.as_bytes());
    put(&mut h, 257, b"ustar\x0000");
    let sum: u32 = h.iter().map(|b| u32::from(*b)).sum();
    put(&mut h, 148, format!("{sum:06o}\0 ").as_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(content);
    let pad = (512 - content.len() % 512) % 512;
    out.extend(std::iter::repeat_n(0u8, pad));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(h: &[u8], at: usize, len: usize) -> String {
        String::from_utf8_lossy(&h[at..at + len])
            .trim_end_matches('\0')
            .to_string()
    }

    #[test]
    fn a_file_and_its_link_are_ustar_entries() {
        let mut tar = Vec::new();
        entry(&mut tar, "token.a", b'0', "", 0o400, b"jwt-value");
        entry(&mut tar, "token", b'2', "token.a", 0o777, &[]);
        assert_eq!(tar.len(), 512 + 512 + 512);
        let (file, link) = (&tar[..512], &tar[1024..1536]);
        assert_eq!(field(file, 0, 100), "token.a");
        assert_eq!(field(file, 100, 8), "0000400");
        assert_eq!(field(file, 108, 8), "0000000");
        assert_eq!(
            u64::from_str_radix(&field(file, 124, 12), 8).expect("size"),
            9
        );
        assert_eq!(&tar[512..521], b"jwt-value");
        assert_eq!(link[156], b'2');
        assert_eq!(field(link, 157, 100), "token.a");
        assert_eq!(&file[257..265], b"ustar\x0000");
        // The checksum is the byte sum with its own field read as spaces.
        for h in [file, link] {
            let stored = u32::from_str_radix(field(h, 148, 6).trim(), 8).expect("sum");
            let sum: u32 = h
                .iter()
                .enumerate()
                .map(|(i, b)| {
                    if (148..156).contains(&i) {
                        32
                    } else {
                        u32::from(*b)
                    }
                })
                .sum();
            assert_eq!(stored, sum);
        }
    }

    #[test]
    fn the_first_regular_file_of_an_archive_is_read_back() {
        let mut tar = Vec::new();
        entry(&mut tar, "bind", b'0', "", 0o400, b"{\"space\":\"s\"}");
        tar.extend_from_slice(&[0u8; 1024]);
        assert_eq!(
            first_file(&tar, 64).as_deref(),
            Some(&b"{\"space\":\"s\"}"[..])
        );
        assert_eq!(first_file(&tar, 4), None, "larger than the bound");
        let mut link = Vec::new();
        entry(&mut link, "token", b'2', "token.a", 0o777, &[]);
        assert_eq!(first_file(&link, 64), None, "not a regular file");
        assert_eq!(first_file(&tar[..100], 64), None, "truncated");
    }

    #[test]
    fn the_volume_is_tmpfs_and_anonymous() {
        let m = secret_dir_mount("/run/tether");
        assert_eq!(m.typ, Some(MountType::VOLUME));
        assert!(m.source.is_none());
        let opts = m
            .volume_options
            .and_then(|v| v.driver_config)
            .and_then(|d| d.options)
            .expect("options");
        assert_eq!(opts.get("type").map(String::as_str), Some("tmpfs"));
        assert_eq!(Side::A.other(), Side::B);
        assert_eq!(side_of("/run/tether/token.b"), Some(Side::B));
        assert_eq!(side_of("token.a"), Some(Side::A));
        assert_eq!(side_of(""), None);
    }
}
