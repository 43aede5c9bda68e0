//! What every RPC handler shares: the [`State`] (store, artifact folder, timing), running
//! store calls on blocking threads, and mapping store and conversion errors to gRPC statuses.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use crate::convert::{self, ConvertError};
use crate::domain::{Timestamp, WorkerRecord};
use crate::scheduler::{schedule, SchedulerConfig};
use crate::store::{Store, StoreError};

pub(super) struct State {
    pub(super) store: Arc<dyn Store>,
    pub(super) artifact_dir: PathBuf,
    pub(super) scheduler: SchedulerConfig,
    pub(super) heartbeat_interval: Duration,
}

fn store_status(error: StoreError) -> Status {
    match &error {
        StoreError::NotFound { .. } => Status::not_found(error.to_string()),
        StoreError::InvalidPlan(_) => Status::invalid_argument(error.to_string()),
        _ if error.is_retryable() => Status::unavailable(error.to_string()),
        _ => {
            tracing::error!(%error, "store failure");
            Status::internal(error.to_string())
        }
    }
}

pub(super) fn bad_field(error: ConvertError) -> Status {
    Status::invalid_argument(error.to_string())
}

impl State {
    pub(super) async fn with_store<T, F>(&self, body: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnOnce(&dyn Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || body(store.as_ref()))
            .await
            .map_err(|error| Status::internal(format!("store task failed: {error}")))?
            .map_err(store_status)
    }

    pub(super) async fn schedule_round(&self) -> Result<(), Status> {
        let config = self.scheduler;
        self.with_store(move |store| {
            store
                .schedule_round(Timestamp::now(), config, &mut |snapshot| schedule(snapshot))
                .map(|_| ())
        })
        .await
    }

    pub(super) fn worker_record(
        &self,
        id: &str,
        host: &str,
        gpus: &[u32],
    ) -> Result<WorkerRecord, Status> {
        let mut gpus = gpus.to_vec();
        gpus.sort_unstable();
        gpus.dedup();
        Ok(WorkerRecord {
            id: convert::worker_id("worker_id", id).map_err(bad_field)?,
            host: host.to_string(),
            gpus,
            last_heartbeat: Timestamp::now(),
        })
    }
}
