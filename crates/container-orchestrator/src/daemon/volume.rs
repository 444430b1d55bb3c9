//! The daemon's volume: made and filled once per engine, checked once per process.
//!
//! Filling goes through a helper container of the space's own image (present on the host,
//! since the space is made from it), created with the volume mounted and never started: the
//! engine's archive API writes into a created container's volumes (checked on Engine 20.10).
//! The helper is removed whatever happens. A volume that exists is used when it holds a file
//! of the binary's size; otherwise it is written again (the engine replaces a file by
//! unlinking it, so a daemon running from the old one is not disturbed).

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, HostConfig, Mount, MountType, VolumeCreateRequest};
use bollard::query_parameters::CreateContainerOptionsBuilder;

use super::{BINARY, Binary, DIR, Daemon};
use crate::docker::{EngineError, EngineErrorKind};
use crate::labels::{LABEL_HOST, LABEL_KIND, LABEL_MANAGED, LABEL_SHA256};

/// `tether.kind` of the daemon's volume (and of its short-lived helper container).
pub const KIND: &str = "space-daemon";

impl Daemon {
    /// The volume, holding the binary, for a space of `image`: `None` when the daemon is off.
    pub async fn ensure_volume(&self, image: &str) -> Result<Option<&Binary>, EngineError> {
        let Some(b) = &self.binary else {
            return Ok(None);
        };
        let mut filled = self.filled.lock().await;
        if *filled {
            return Ok(Some(b));
        }
        let docker = self.engine.docker();
        match docker
            .inspect_volume(&b.volume)
            .await
            .map_err(EngineError::from)
        {
            Ok(_) => {}
            Err(e) if e.kind() == EngineErrorKind::NotFound => {
                let labels = HashMap::from([
                    (LABEL_MANAGED.to_string(), "true".to_string()),
                    (LABEL_KIND.to_string(), KIND.to_string()),
                    (LABEL_SHA256.to_string(), b.sha256.clone()),
                ]);
                docker
                    .create_volume(VolumeCreateRequest {
                        name: Some(b.volume.clone()),
                        labels: Some(labels),
                        ..Default::default()
                    })
                    .await?;
            }
            Err(e) => return Err(e),
        }
        let helper = self.helper(image, &b.volume).await?;
        let done = self.fill(&helper, b).await;
        if let Err(e) = self.engine.remove(&helper).await {
            tracing::warn!(container = %helper, error = %e, "cannot remove the daemon volume's helper");
        }
        done?;
        *filled = true;
        Ok(Some(b))
    }

    /// A created, never started container of `image` with the volume mounted writable.
    async fn helper(&self, image: &str, volume: &str) -> Result<String, EngineError> {
        let short = uuid::Uuid::new_v4().simple().to_string();
        let name = format!("tether-spaced-fill-{}", &short[..12]);
        let opts = CreateContainerOptionsBuilder::default().name(&name).build();
        let labels = HashMap::from([
            (LABEL_MANAGED.to_string(), "true".to_string()),
            (LABEL_HOST.to_string(), self.engine.host_id().to_string()),
            (LABEL_KIND.to_string(), KIND.to_string()),
        ]);
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            // Never run; the engine wants a command for images that have none.
            entrypoint: Some(vec![format!("{DIR}/{BINARY}")]),
            cmd: Some(Vec::new()),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                mounts: Some(vec![Mount {
                    target: Some(DIR.into()),
                    source: Some(volume.into()),
                    typ: Some(MountType::VOLUME),
                    read_only: Some(false),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        };
        Ok(self
            .engine
            .docker()
            .create_container(Some(opts), body)
            .await?
            .id)
    }

    /// Writes the binary (mode 0555) unless the volume holds a file of its size already.
    async fn fill(&self, helper: &str, b: &Binary) -> Result<(), EngineError> {
        let bytes = tokio::fs::read(&b.path).await.map_err(|e| {
            EngineError::new(
                EngineErrorKind::Other,
                format!("cannot read {}: {e}", b.path.display()),
            )
        })?;
        if super::sha256_hex(&bytes) != b.sha256 {
            return Err(EngineError::new(
                EngineErrorKind::Other,
                format!(
                    "{} changed since the orchestrator started: restart it to use the new binary",
                    b.path.display()
                ),
            ));
        }
        let there = self
            .engine
            .file_size(helper, &format!("{DIR}/{BINARY}"))
            .await;
        if there == i64::try_from(bytes.len()).ok() {
            return Ok(());
        }
        self.engine
            .put_file(helper, DIR, BINARY, 0o555, &bytes)
            .await?;
        tracing::info!(volume = %b.volume, bytes = bytes.len(), "space daemon volume filled");
        Ok(())
    }
}
