//! What a running job sees ([`JobContext`]): its scratch folder and lease, whether it must
//! stop, progress (sent by the agent, throttled), artifact downloads, checkpoint uploads
//! (queued for the agent's uploader), the probe cache and the gang's rendezvous; and why
//! such a call fails ([`ContextError`]).
//!
//! It does not send progress or upload checkpoints itself (the agent's background tasks in
//! `super` do) and does not define the executor contract (`super::exec`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::sync::{mpsc, Notify};

use lorasweep_coordinator::client::{ClientError, CoordinatorClient};
use lorasweep_coordinator::domain::{ArtifactInfo, CacheHit, Progress};
use lorasweep_coordinator::store::LeaseRef;

use super::retrying;

/// Why a [`JobContext`] call failed.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// The job was told to stop.
    #[error("the job was cancelled")]
    Cancelled,
    /// The coordinator refused or could not be reached.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// A local file operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// Waiting for another rank took too long.
    #[error("timed out after {0:?} waiting for rank 0's rendezvous")]
    RendezvousTimeout(Duration),
}

/// An upload queued by [`JobContext::save_checkpoint`].
pub(super) struct QueuedUpload {
    pub(super) path: PathBuf,
    pub(super) name: String,
    pub(super) step: u64,
}

/// What a running job may ask of the coordinator. Methods block (they are called from the
/// executor's thread) and never run on the async runtime's threads.
pub struct JobContext {
    pub(super) client: CoordinatorClient,
    pub(super) runtime: Handle,
    pub(super) lease: LeaseRef,
    pub(super) work_dir: PathBuf,
    pub(super) cancelled: Arc<AtomicBool>,
    pub(super) latest_progress: Arc<Mutex<Option<Progress>>>,
    pub(super) progress_ready: Arc<Notify>,
    pub(super) uploads: mpsc::UnboundedSender<QueuedUpload>,
}

impl JobContext {
    /// A scratch folder for this attempt (created; removed after a success).
    pub fn work_dir(&self) -> &Path {
        &self.work_dir
    }

    /// The lease this attempt runs under.
    pub fn lease(&self) -> &LeaseRef {
        &self.lease
    }

    /// Whether the job must stop now (cancelled, re-leased, finished by another rank, or
    /// the worker is shutting down).
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }

    /// Records progress; sent to the coordinator at most about once a second, the latest
    /// value winning. Never blocks.
    pub fn progress(&self, progress: Progress) {
        if let Ok(mut slot) = self.latest_progress.lock() {
            *slot = Some(progress);
        }
        self.progress_ready.notify_one();
    }

    /// Downloads an artifact (of a dependency, or the checkpoint to resume from) into
    /// `dir`, verifying its SHA-256; returns the local path.
    pub fn fetch_artifact(
        &self,
        artifact: &ArtifactInfo,
        dir: &Path,
    ) -> Result<PathBuf, ContextError> {
        if self.is_cancelled() {
            return Err(ContextError::Cancelled);
        }
        let destination = dir.join(&artifact.name);
        let client = self.client.clone();
        let job = artifact.job;
        let name = artifact.name.clone();
        let target = destination.clone();
        self.runtime
            .block_on(retrying("download artifact", &self.cancelled, || {
                let client = client.clone();
                let name = name.clone();
                let target = target.clone();
                async move { client.download_artifact(job, &name, &target).await }
            }))?;
        Ok(destination)
    }

    /// Queues a checkpoint file for upload (in the background, in order). The file is moved
    /// out of the way first, so the job may write its next checkpoint to the same path.
    /// The newest uploaded checkpoint is handed to the next attempt if this one is lost.
    pub fn save_checkpoint(&self, file: &Path, step: u64) -> Result<(), ContextError> {
        if self.is_cancelled() {
            return Err(ContextError::Cancelled);
        }
        let extension = file
            .extension()
            .map(|extension| format!(".{}", extension.to_string_lossy()))
            .unwrap_or_default();
        let name = format!("checkpoint-{step:08}{extension}");
        let queued = self.work_dir.join(".uploads");
        std::fs::create_dir_all(&queued).map_err(|source| ContextError::Io {
            context: format!("cannot create {}", queued.display()),
            source,
        })?;
        let staged = queued.join(&name);
        if std::fs::rename(file, &staged).is_err() {
            std::fs::copy(file, &staged).map_err(|source| ContextError::Io {
                context: format!("cannot stage checkpoint {}", file.display()),
                source,
            })?;
        }
        self.uploads
            .send(QueuedUpload {
                path: staged,
                name,
                step,
            })
            .map_err(|_| ContextError::Cancelled)
    }

    /// Looks up a cached result by content key. On a hit its artifacts are attached to
    /// this job; return `JobOutput { result: hit.result, cache_key: Some(key), .. }`.
    pub fn cached(&self, cache_key: &str) -> Result<Option<CacheHit>, ContextError> {
        let client = self.client.clone();
        let lease = self.lease.clone();
        let key = cache_key.to_string();
        Ok(self
            .runtime
            .block_on(retrying("lookup cache", &self.cancelled, || {
                let client = client.clone();
                let lease = lease.clone();
                let key = key.clone();
                async move { client.lookup_cache(&lease, &key).await }
            }))?)
    }

    /// Rank 0 of a gang publishes bytes (the NCCL unique id) for the other ranks.
    pub fn publish_rendezvous(&self, blob: &[u8]) -> Result<(), ContextError> {
        let client = self.client.clone();
        let lease = self.lease.clone();
        let blob = blob.to_vec();
        Ok(self
            .runtime
            .block_on(retrying("publish rendezvous", &self.cancelled, || {
                let client = client.clone();
                let lease = lease.clone();
                let blob = blob.clone();
                async move { client.publish_rendezvous(&lease, &blob).await }
            }))?)
    }

    /// Waits for rank 0's rendezvous bytes (polling every 200 ms) up to `timeout`.
    pub fn wait_rendezvous(&self, timeout: Duration) -> Result<Vec<u8>, ContextError> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.is_cancelled() {
                return Err(ContextError::Cancelled);
            }
            let client = self.client.clone();
            let lease = self.lease.clone();
            let fetched =
                self.runtime
                    .block_on(retrying("fetch rendezvous", &self.cancelled, || {
                        let client = client.clone();
                        let lease = lease.clone();
                        async move { client.fetch_rendezvous(&lease).await }
                    }))?;
            if let Some(blob) = fetched {
                return Ok(blob);
            }
            if std::time::Instant::now() >= deadline {
                return Err(ContextError::RendezvousTimeout(timeout));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
