//! What the engine changes on a pool container when it is taken (the `pool` module): its
//! name, which from then on says its space, and its limits, where the request's differ from
//! the pool's.

use bollard::models::ContainerUpdateBody;
use bollard::query_parameters::RenameContainerOptionsBuilder;

use super::{Engine, EngineError, MIB};

impl Engine {
    /// Renames container `id` (and forgets what the cache knew of it by either name).
    pub async fn rename(&self, id: &str, name: &str) -> Result<(), EngineError> {
        let opts = RenameContainerOptionsBuilder::default().name(name).build();
        let r = self.docker.rename_container(id, opts).await;
        self.forget(id);
        Ok(r?)
    }

    /// Sets the memory (and swap: none beyond it), CPU and pids limits of container `id`.
    pub async fn update_limits(
        &self,
        id: &str,
        memory_mb: i32,
        cpu_limit: f64,
        pids_limit: i32,
    ) -> Result<(), EngineError> {
        let memory = i64::from(memory_mb) * MIB;
        let body = ContainerUpdateBody {
            memory: Some(memory),
            memory_swap: Some(memory),
            nano_cpus: Some((cpu_limit * 1e9).round() as i64),
            pids_limit: Some(i64::from(pids_limit)),
            ..Default::default()
        };
        let r = self.docker.update_container(id, body).await;
        self.forget(id);
        Ok(r?)
    }
}
