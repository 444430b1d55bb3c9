//! `user` of a request → uid and gid, from the container's own `/etc/passwd` and `/etc/group`.
//!
//! Design decision: the files are read directly (no NSS, no libc lookups), as Docker does for
//! `--user`: the daemon may be a static binary in an image of any libc, or none. Numeric ids
//! need no entry (as with Docker, a uid without one gets gid 0); names must exist.

use std::path::Path;

/// A resolved user: whom the command runs as.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ids {
    pub uid: u32,
    pub gid: u32,
}

/// Resolves `spec` (`uid`, `uid:gid`, `name`, `name:group`, mixed) against the files under
/// `root` (`/` in a container). The error says what is unknown.
pub fn resolve(spec: &str, root: &Path) -> Result<Ids, String> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if user.is_empty() || group.is_some_and(str::is_empty) {
        return Err(format!(
            "user {spec:?} is not `uid[:gid]` or `name[:group]`"
        ));
    }
    let passwd = std::fs::read_to_string(root.join("etc/passwd")).unwrap_or_default();
    let entry = |f: &dyn Fn(&[&str]) -> bool| {
        passwd
            .lines()
            .map(|l| l.split(':').collect::<Vec<_>>())
            .find(|f2| f2.len() >= 4 && f(f2))
            .and_then(|f2| Some((f2[2].parse::<u32>().ok()?, f2[3].parse::<u32>().ok()?)))
    };
    let (uid, primary) = match user.parse::<u32>() {
        Ok(uid) => (uid, entry(&|f| f[2] == user).map_or(0, |(_, g)| g)),
        Err(_) => entry(&|f| f[0] == user)
            .ok_or_else(|| format!("unknown user {user:?}: not in the container's /etc/passwd"))?,
    };
    let gid = match group {
        None => primary,
        Some(g) => match g.parse::<u32>() {
            Ok(gid) => gid,
            Err(_) => std::fs::read_to_string(root.join("etc/group"))
                .unwrap_or_default()
                .lines()
                .map(|l| l.split(':').collect::<Vec<_>>())
                .find(|f| f.len() >= 3 && f[0] == g)
                .and_then(|f| f[2].parse().ok())
                .ok_or_else(|| format!("unknown group {g:?}: not in the container's /etc/group"))?,
        },
    };
    Ok(Ids { uid, gid })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_and_names_resolve() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("etc")).expect("etc");
        std::fs::write(
            dir.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1001::/home/app:/bin/sh\n",
        )
        .expect("passwd");
        std::fs::write(dir.path().join("etc/group"), "root:x:0:\nstaff:x:50:\n").expect("group");
        let r = |s| resolve(s, dir.path());
        assert_eq!(
            r("app"),
            Ok(Ids {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(
            r("1000"),
            Ok(Ids {
                uid: 1000,
                gid: 1001
            })
        );
        assert_eq!(r("4242"), Ok(Ids { uid: 4242, gid: 0 }));
        assert_eq!(r("4242:7"), Ok(Ids { uid: 4242, gid: 7 }));
        assert_eq!(r("app:staff"), Ok(Ids { uid: 1000, gid: 50 }));
        assert!(
            r("nobody-here")
                .expect_err("unknown")
                .contains("unknown user")
        );
        assert!(
            r("app:nogroup")
                .expect_err("unknown")
                .contains("unknown group")
        );
        assert!(r(":5").is_err());
        assert!(r("5:").is_err());
    }
}
