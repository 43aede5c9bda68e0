//! The gRPC service in-process: a coordinator on 127.0.0.1:0 and the typed client, no
//! worker processes. Registration and its version check, tokens, the job lifecycle with
//! artifacts, duplicate and stale reports, cancellation, and the metrics endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use lorasweep_coordinator::client::{ClientOptions, CoordinatorClient, WorkerIdentity};
use lorasweep_coordinator::domain::{ArtifactKind, FailureKind, JobState, Progress, ReportOutcome};
use lorasweep_coordinator::graph::JobKind;
use lorasweep_coordinator::ids::WorkerId;
use lorasweep_coordinator::scheduler::SchedulerConfig;
use lorasweep_coordinator::service::auth::AttachToken;
use lorasweep_coordinator::service::{start, CoordinatorOptions, RunningCoordinator, ServeError};
use lorasweep_coordinator::store::{LeaseRef, SqliteStore, Store};
use lorasweep_proto::v1 as pb;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "test-token-0123456789abcdef";

const SWEEP: &str = "version: 1\nname: grpc-test\nmodels: [smollm2-135m]\ntasks: [math]\n";

/// One probe, one train on the dominant module that reads it, two evals.
const DOMINANT_SWEEP: &str =
    "version: 1\nname: dominant\nmodels: [smollm2-135m]\ntasks: [math]\nsweep: {grid: {placement: [dominant]}}\n";

struct Harness {
    coordinator: RunningCoordinator,
    store: Arc<dyn Store>,
    dir: tempfile::TempDir,
}

impl Harness {
    fn url(&self) -> String {
        format!("http://{}", self.coordinator.address)
    }

    fn client(&self, token: Option<&str>) -> CoordinatorClient {
        let mut options = ClientOptions::new(self.url());
        options.token = token.map(str::to_string);
        CoordinatorClient::connect(&options).unwrap()
    }
}

async fn harness() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("state.db")).unwrap());
    let mut options =
        CoordinatorOptions::new("127.0.0.1:0".parse().unwrap(), dir.path().join("artifacts"));
    options.token = Some(TOKEN.to_string());
    options.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    options.scheduler = SchedulerConfig {
        lease_ttl: Duration::from_secs(30),
        worker_timeout: Duration::from_secs(30),
        gang_patience: Duration::from_secs(60),
    };
    let coordinator = start(store.clone(), options).await.unwrap();
    Harness {
        coordinator,
        store,
        dir,
    }
}

fn identity(name: &str, gpus: &[u32]) -> WorkerIdentity {
    WorkerIdentity {
        id: WorkerId::new(name).unwrap(),
        host: "localhost".to_string(),
        gpus: gpus.to_vec(),
    }
}

async fn raw_worker_client(
    url: String,
    token: Option<&str>,
) -> pb::worker_service_client::WorkerServiceClient<
    tonic::codegen::InterceptedService<tonic::transport::Channel, AttachToken>,
> {
    let channel = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .connect()
        .await
        .unwrap();
    pb::worker_service_client::WorkerServiceClient::with_interceptor(
        channel,
        AttachToken::new(token).unwrap(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn register_checks_the_protocol_version() {
    let harness = harness().await;
    let client = harness.client(Some(TOKEN));
    let registration = client.register(&identity("w1", &[0])).await.unwrap();
    assert_eq!(registration.lease_ttl, Duration::from_secs(30));
    let mut raw = raw_worker_client(harness.url(), Some(TOKEN)).await;
    let refused = raw
        .register(pb::RegisterRequest {
            protocol_version: lorasweep_proto::PROTOCOL_VERSION + 1,
            worker_id: "w2".to_string(),
            host: "h".to_string(),
            gpus: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("protocol version mismatch"),
        "{}",
        refused.message()
    );
    let heartbeat = raw
        .heartbeat(pb::HeartbeatRequest {
            protocol_version: 0,
            worker_id: "w1".to_string(),
            host: "h".to_string(),
            gpus: vec![],
            running: vec![],
        })
        .await
        .unwrap_err();
    assert_eq!(heartbeat.code(), tonic::Code::FailedPrecondition);
    harness.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_or_missing_token_is_refused_on_every_service() {
    let harness = harness().await;
    for token in [Some("wrong-token-0123456789abcdef"), None] {
        let client = harness.client(token);
        let error = client.register(&identity("w1", &[])).await.unwrap_err();
        assert_eq!(error.code(), Some(tonic::Code::Unauthenticated), "{error}");
        assert!(error.to_string().contains("bearer token"), "{error}");
        let error = client
            .submit_sweep(SWEEP, "x.yaml", false)
            .await
            .unwrap_err();
        assert_eq!(error.code(), Some(tonic::Code::Unauthenticated));
        assert!(!error.is_retryable());
    }
    assert!(harness.store.list_sweeps().unwrap().is_empty());
    harness.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listening_beyond_loopback_without_a_token_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in_memory().unwrap());
    let address: SocketAddr = "0.0.0.0:0".parse().unwrap();
    let error = start(
        store.clone(),
        CoordinatorOptions::new(address, dir.path().join("a")),
    )
    .await
    .err()
    .expect("must refuse");
    assert!(matches!(error, ServeError::TokenRequired { .. }));
    assert!(error.to_string().contains("without a token"));
    // Loopback without a token is allowed.
    let local = start(
        store,
        CoordinatorOptions::new("127.0.0.1:0".parse().unwrap(), dir.path().join("b")),
    )
    .await
    .unwrap();
    local.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_sweep_is_refused_with_file_line_and_field() {
    let harness = harness().await;
    let client = harness.client(Some(TOKEN));
    let error = client
        .submit_sweep(
            "version: 1\nname: bad\nmodels: [smollm2-135m]\ntasks: [math]\ntrain: {stepz: 3}\n",
            "bad.yaml",
            false,
        )
        .await
        .unwrap_err();
    assert_eq!(error.code(), Some(tonic::Code::InvalidArgument));
    let message = error.to_string();
    assert!(message.contains("bad.yaml:5:"), "{message}");
    assert!(message.contains("stepz"), "{message}");
    harness.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_through_poll_upload_complete_and_a_duplicate_completion_is_ignored() {
    let harness = harness().await;
    let client = harness.client(Some(TOKEN));
    let submitted = client
        .submit_sweep(SWEEP, "grpc.yaml", false)
        .await
        .unwrap();
    assert!(!submitted.existing);
    let status = client.sweep_status(submitted.sweep).await.unwrap();
    assert_eq!(status.name, "grpc-test");
    assert_eq!(status.jobs.len() as u32, submitted.jobs);
    assert_eq!(status.counts[&JobState::Queued], submitted.jobs);
    let reused = client.submit_sweep(SWEEP, "grpc.yaml", true).await.unwrap();
    assert_eq!((reused.sweep, reused.existing), (submitted.sweep, true));

    let worker = identity("w1", &[0]);
    client.register(&worker).await.unwrap();
    let assignments = client.poll_work(&worker.id).await.unwrap();
    assert_eq!(assignments.len(), 1, "one slot, one job");
    let job = assignments[0].clone();
    assert_eq!(job.epoch, 1);
    assert!(
        client.poll_work(&worker.id).await.unwrap().is_empty(),
        "delivered once"
    );
    let lease = LeaseRef {
        job: job.job,
        epoch: job.epoch,
        worker: worker.id.clone(),
    };
    assert!(client
        .heartbeat(&worker, &[(job.job, job.epoch)])
        .await
        .unwrap()
        .is_empty());
    let progress = Progress {
        step: 2,
        total_steps: 4,
        loss: Some(2.5),
        tokens_per_second: Some(100.0),
        message: "working".to_string(),
    };
    assert!(client.report_progress(&lease, &progress).await.unwrap());

    // An artifact larger than one chunk travels in pieces and comes back identical.
    let local = harness.dir.path().join("out.bin");
    let content: Vec<u8> = (0..(1 << 20) + 4321)
        .map(|index| (index * 7 % 256) as u8)
        .collect();
    std::fs::write(&local, &content).unwrap();
    let uploaded = client
        .upload_artifact(&lease, &local, "result.bin", ArtifactKind::Output, 0)
        .await
        .unwrap();
    assert_eq!(uploaded.size, content.len() as u64);
    let back = harness.dir.path().join("back/result.bin");
    let downloaded = client
        .download_artifact(job.job, "result.bin", &back)
        .await
        .unwrap();
    assert_eq!(downloaded, uploaded);
    assert_eq!(std::fs::read(&back).unwrap(), content);
    let missing = client
        .download_artifact(job.job, "nope.bin", &back)
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Some(tonic::Code::NotFound));
    let bad_name = client
        .upload_artifact(&lease, &local, "../escape", ArtifactKind::Output, 0)
        .await
        .unwrap_err();
    assert_eq!(bad_name.code(), Some(tonic::Code::InvalidArgument));

    let first = client
        .complete_job(&lease, &json!({"score": 0.75}), None)
        .await
        .unwrap();
    assert_eq!(first, ReportOutcome::Accepted);
    let second = client
        .complete_job(&lease, &json!({"score": 0.1}), None)
        .await
        .unwrap();
    assert!(
        matches!(&second, ReportOutcome::Ignored(reason) if reason.contains("succeeded")),
        "{second:?}"
    );
    let failed_late = client
        .fail_job(&lease, "late failure", FailureKind::Retryable)
        .await
        .unwrap();
    assert!(!failed_late.is_accepted());
    let stale_upload = client
        .upload_artifact(&lease, &local, "later.bin", ArtifactKind::Output, 0)
        .await
        .unwrap_err();
    assert_eq!(stale_upload.code(), Some(tonic::Code::FailedPrecondition));

    let results = client.results(submitted.sweep).await.unwrap();
    let done = results
        .jobs
        .iter()
        .find(|result| result.job.id == job.job)
        .unwrap();
    assert_eq!(done.job.state, JobState::Succeeded);
    assert_eq!(done.job.result, Some(json!({"score": 0.75})));
    assert_eq!(done.artifacts.len(), 1);
    assert_eq!(results.sweep.spec_yaml, SWEEP);
    let listed = client.list_sweeps().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].counts[&JobState::Succeeded], 1);
    harness.coordinator.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resuming_by_text_takes_only_a_sweep_of_the_same_files() {
    let harness = harness().await;
    let client = harness.client(Some(TOKEN));
    // Relative paths: the same text names other files from another folder.
    let text = "version: 1\nname: local\nmodels: [model]\ntasks: [data.jsonl]\n";
    let (first, second) = (harness.dir.path().join("a"), harness.dir.path().join("b"));
    let submit = |folder: std::path::PathBuf| {
        let client = &client;
        async move {
            client
                .submit_sweep_from(text, "sweep.yaml", Some(&folder), true)
                .await
                .unwrap()
        }
    };
    let a = submit(first.clone()).await;
    assert!(!a.existing);
    let b = submit(second.clone()).await;
    assert!(
        !b.existing,
        "a sweep from another folder resumed sweep {}",
        a.sweep.0
    );
    assert_ne!(a.sweep, b.sweep);
    // Each folder resumes its own sweep, not merely the newest one with this text.
    let again = submit(first).await;
    assert_eq!((again.sweep, again.existing), (a.sweep, true));
    let again = submit(second).await;
    assert_eq!((again.sweep, again.existing), (b.sweep, true));
    let models: Vec<String> = [a.sweep, b.sweep]
        .into_iter()
        .map(|sweep| harness.store.sweep_status(sweep).unwrap())
        .map(|status| status.jobs[0].model.clone())
        .collect();
    assert_ne!(models[0], models[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dependent_gets_its_dependency_outputs_and_a_cancel_stops_running_jobs() {
    let harness = harness().await;
    let client = harness.client(Some(TOKEN));
    let submitted = client
        .submit_sweep(DOMINANT_SWEEP, "dominant.yaml", false)
        .await
        .unwrap();
    let worker = identity("w1", &[0, 1, 2, 3]);
    client.register(&worker).await.unwrap();
    let first = client.poll_work(&worker.id).await.unwrap();
    let probe = first
        .iter()
        .find(|job| job.kind == JobKind::Probe)
        .expect("a probe job")
        .clone();
    let lease = LeaseRef {
        job: probe.job,
        epoch: probe.epoch,
        worker: worker.id.clone(),
    };
    let local = harness.dir.path().join("page.json");
    std::fs::write(&local, b"{\"scores\": [1, 2, 3]}").unwrap();
    client
        .upload_artifact(&lease, &local, "page.json", ArtifactKind::Output, 0)
        .await
        .unwrap();
    client
        .complete_job(
            &lease,
            &json!({"dominant": "layers.1.mlp.down_proj"}),
            Some("weights+data+settings"),
        )
        .await
        .unwrap();
    let next = client.poll_work(&worker.id).await.unwrap();
    let train = next
        .iter()
        .find(|job| job.kind == JobKind::Train)
        .expect("the train job is ready")
        .clone();
    assert_eq!(train.dependencies.len(), 1);
    assert_eq!(train.dependencies[0].job, probe.job);
    assert_eq!(train.dependencies[0].artifacts[0].name, "page.json");
    assert_eq!(
        train.dependencies[0].result["dominant"],
        "layers.1.mlp.down_proj"
    );

    let cancelled = client.cancel_sweep(submitted.sweep).await.unwrap();
    assert!(cancelled >= 1);
    let stop = client
        .heartbeat(&worker, &[(train.job, train.epoch)])
        .await
        .unwrap();
    assert_eq!(stop, vec![(train.job, train.epoch)]);
    let status = client.sweep_status(submitted.sweep).await.unwrap();
    assert!(status.ended);
    assert!(status.cancelled.is_some());
    let train_lease = LeaseRef {
        job: train.job,
        epoch: train.epoch,
        worker: worker.id.clone(),
    };
    assert!(!client
        .report_progress(&train_lease, &Progress::default())
        .await
        .unwrap());
    harness.coordinator.shutdown().await.unwrap();
}

async fn http_get(address: SocketAddr, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_endpoint_reports_jobs_workers_and_health() {
    let harness = harness().await;
    let client = harness.client(Some(TOKEN));
    client
        .submit_sweep(SWEEP, "grpc.yaml", false)
        .await
        .unwrap();
    client.register(&identity("w1", &[0])).await.unwrap();
    client
        .poll_work(&WorkerId::new("w1").unwrap())
        .await
        .unwrap();
    let address = harness.coordinator.metrics_address.unwrap();
    let health = http_get(address, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 200"), "{health}");
    assert!(health.ends_with("\r\n\r\nok\n"), "{health}");
    let metrics = http_get(address, "/metrics").await;
    assert!(
        metrics.contains("lorasweep_jobs{state=\"running\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("lorasweep_workers_live 1"), "{metrics}");
    assert!(
        metrics.contains("lorasweep_lease_expiries_total 0"),
        "{metrics}"
    );
    assert!(metrics.contains("# TYPE lorasweep_job_duration_seconds histogram"));
    assert!(http_get(address, "/other")
        .await
        .starts_with("HTTP/1.1 404"));

    // Break the store under the running coordinator: the endpoint says unhealthy and nothing
    // more (SQLite's "no such table: counters" goes to the log, not to whoever asks).
    let database = rusqlite::Connection::open(harness.dir.path().join("state.db")).unwrap();
    database.busy_timeout(Duration::from_secs(10)).unwrap();
    database
        .execute_batch("ALTER TABLE counters RENAME TO counters_gone")
        .unwrap();
    let health = http_get(address, "/healthz").await;
    assert!(health.starts_with("HTTP/1.1 503"), "{health}");
    assert!(health.ends_with("\r\n\r\nunhealthy\n"), "{health}");
    let metrics = http_get(address, "/metrics").await;
    assert!(metrics.starts_with("HTTP/1.1 500"), "{metrics}");
    assert!(
        metrics.ends_with("\r\n\r\nmetrics unavailable\n"),
        "{metrics}"
    );
    for response in [&health, &metrics] {
        for leak in ["no such table", "counters", "store", "state.db"] {
            assert!(!response.contains(leak), "{leak:?} leaked: {response}");
        }
    }
    database
        .execute_batch("ALTER TABLE counters_gone RENAME TO counters")
        .unwrap();
    harness.coordinator.shutdown().await.unwrap();
}
