//! A space container's spec with the daemon as its init (see the module above for what
//! changes). Everything the daemon needs is decided here, before the engine's create.

use super::{BINARY, DIR, Daemon, TOKEN_PATH};
use crate::labels::LABEL_DAEMON;
use crate::spec::{ContainerSpec, DaemonSetup, Kind};
use crate::workers::credentials::TOKEN_DIR;

impl Daemon {
    /// Puts the daemon into `spec` (a space container's); leaves it as it is when the daemon
    /// is off or cannot be set up (said in a warning: the space works without it).
    pub async fn prepare(&self, spec: &mut ContainerSpec) {
        if spec.kind != Kind::Space {
            return;
        }
        let binary = match self.ensure_volume(&spec.image).await {
            Ok(Some(b)) => b.clone(),
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(image = %spec.image, error = %e, "the space daemon's volume is not ready: the container gets no daemon");
                return;
            }
        };
        let image = match self.engine.docker().inspect_image(&spec.image).await {
            Ok(i) => i,
            Err(e) => {
                tracing::warn!(image = %spec.image, error = %e, "cannot inspect the image: the container gets no daemon");
                return;
            }
        };
        let cfg = image.config.unwrap_or_default();
        let entry = cfg.entrypoint.unwrap_or_default();
        let cmd = spec.cmd.clone().or(cfg.cmd).unwrap_or_default();
        apply(
            spec,
            &binary.volume,
            &entry,
            &cmd,
            self.subject_prefix.as_deref(),
        );
    }
}

/// The spec changes themselves (pure, tested below).
fn apply(
    spec: &mut ContainerSpec,
    volume: &str,
    image_entry: &[String],
    cmd: &[String],
    subject_prefix: Option<&str>,
) {
    let mut entrypoint = vec![format!("{DIR}/{BINARY}")];
    if !image_entry.is_empty() || !cmd.is_empty() {
        entrypoint.push("--".into());
        entrypoint.extend(image_entry.iter().cloned());
        entrypoint.extend(cmd.iter().cloned());
    }
    spec.daemon = Some(DaemonSetup {
        volume: volume.to_string(),
        dir: DIR.into(),
        entrypoint,
    });
    // A pool container's space comes later, in its bind file (the `pool` module).
    if spec.space.is_empty() {
        spec.env.push(format!(
            "TETHER_DAEMON_BIND_FILE={TOKEN_DIR}/{}",
            super::BIND_NAME
        ));
        // Until then it serves its pool space, where a bind comes over the bus.
        if let Some(s) = crate::labels::pool_space(
            spec.labels.contains_key(crate::labels::LABEL_POOL),
            &spec.name,
        ) {
            spec.env.push(format!("TETHER_DAEMON_POOL_SPACE={s}"));
        }
    } else {
        spec.env.push(format!("TETHER_SPACE_ID={}", spec.space));
    }
    if let Some(p) = subject_prefix {
        spec.env.push(format!(
            "{}={p}",
            tether_space_daemon::config::ENV_SUBJECT_PREFIX
        ));
    }
    spec.env
        .push(format!("TETHER_DAEMON_TOKEN_FILE={TOKEN_PATH}"));
    spec.secret_dir = Some(TOKEN_DIR.into());
    spec.labels.insert(LABEL_DAEMON.into(), volume.to_string());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Policy, validate_create};

    fn space() -> ContainerSpec {
        let req = tether_proto::CreateContainerRequest {
            image: "img".into(),
            command: None,
            ..Default::default()
        };
        validate_create(&req, "s1", "a", &Policy::for_tests(), chrono::Utc::now()).expect("spec")
    }

    #[test]
    fn the_daemon_wraps_the_images_entrypoint_and_the_command() {
        let mut s = space();
        let cmd = s.cmd.clone().expect("a space has a command");
        apply(
            &mut s,
            "tether-spaced-abc",
            &["/init".to_string()],
            &cmd,
            None,
        );
        let d = s.daemon.clone().expect("daemon");
        assert_eq!(
            d.entrypoint[..3],
            [format!("{DIR}/{BINARY}"), "--".into(), "/init".into()]
        );
        assert_eq!(d.entrypoint[3..], cmd[..]);
        assert!(s.env.contains(&"TETHER_SPACE_ID=s1".to_string()));
        assert!(
            s.env
                .contains(&format!("TETHER_DAEMON_TOKEN_FILE={TOKEN_PATH}"))
        );
        assert!(!s.env.iter().any(|e| e.starts_with("TETHER_DAEMON_TOKEN=")));
        assert!(
            !s.env
                .iter()
                .any(|e| e.starts_with("TETHER_DAEMON_SUBJECT_PREFIX="))
        );
        assert_eq!(s.secret_dir.as_deref(), Some("/run/tether"));
        assert_eq!(s.labels[LABEL_DAEMON], "tether-spaced-abc");
        let body = crate::docker::create_body(&s, &Policy::for_tests().cfg);
        let h = body.host_config.expect("host config");
        assert_eq!(h.init, Some(false), "the daemon is the init");
        assert_eq!(body.cmd, None);
        let m = h.mounts.expect("mounts");
        assert!(
            m.iter()
                .any(|m| m.source.as_deref() == Some("tether-spaced-abc")
                    && m.read_only == Some(true)
                    && m.target.as_deref() == Some(DIR))
        );

        let mut bare = space();
        apply(&mut bare, "v", &[], &[], Some("prod"));
        assert_eq!(
            bare.daemon.expect("daemon").entrypoint,
            [format!("{DIR}/{BINARY}")]
        );
        // Under a deployment's subject prefix, the daemon serves where its identity allows.
        assert!(
            bare.env
                .contains(&"TETHER_DAEMON_SUBJECT_PREFIX=prod".to_string())
        );
    }
}
