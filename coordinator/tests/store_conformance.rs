//! One conformance suite for every way of opening the store (`store_conformance!` below):
//! lifecycle, leases and epochs, duplicate and stale reports, artifacts, cache, rendezvous.

use std::time::Duration;

use lorasweep_coordinator::domain::{
    ArtifactInfo, ArtifactKind, ArtifactRecord, FailureKind, JobState, Progress, ReportOutcome,
    Timestamp, WorkerRecord,
};
use lorasweep_coordinator::graph::{JobKey, JobKind, PlannedJob};
use lorasweep_coordinator::ids::{JobId, SweepId, WorkerId};
use lorasweep_coordinator::scheduler::{schedule, Decision, SchedulerConfig};
use lorasweep_coordinator::store::{LeaseRef, NewSweep, Store, StoreError};
use serde_json::json;

const T0: Timestamp = Timestamp(1_700_000_000_000);

fn config() -> SchedulerConfig {
    SchedulerConfig {
        lease_ttl: Duration::from_secs(10),
        worker_timeout: Duration::from_secs(10),
        gang_patience: Duration::from_secs(60),
    }
}

fn planned(key: &str, kind: JobKind, deps: &[&str], gpus: u32) -> PlannedJob {
    PlannedJob {
        key: JobKey(key.to_string()),
        kind,
        model: "tiny".to_string(),
        task: "math".to_string(),
        params: json!({"rank": 8, "name": key}),
        deps: deps.iter().map(|dep| JobKey(dep.to_string())).collect(),
        gpus,
    }
}

/// probe → train → eval, plus a base eval with no dependency.
fn chain() -> Vec<PlannedJob> {
    vec![
        planned("probe-a", JobKind::Probe, &[], 1),
        planned("train-a", JobKind::Train, &["probe-a"], 1),
        planned("eval-a", JobKind::Eval, &["train-a"], 1),
        planned("eval-base", JobKind::Eval, &[], 1),
    ]
}

fn submit(store: &dyn Store, spec: &str, jobs: &[PlannedJob], max_attempts: u32) -> SweepId {
    store
        .create_sweep(
            NewSweep {
                name: "demo",
                file_name: "demo.yaml",
                spec_yaml: spec,
                jobs,
                max_attempts,
            },
            T0,
        )
        .expect("create sweep")
}

fn worker(store: &dyn Store, name: &str, gpus: &[u32], now: Timestamp) -> WorkerId {
    let id = WorkerId::new(name).unwrap();
    store
        .register_worker(&WorkerRecord {
            id: id.clone(),
            host: "localhost".to_string(),
            gpus: gpus.to_vec(),
            last_heartbeat: now,
        })
        .unwrap();
    id
}

fn heartbeat(
    store: &dyn Store,
    id: &WorkerId,
    running: &[(JobId, u64)],
    now: Timestamp,
) -> Vec<(JobId, u64)> {
    store
        .heartbeat(
            &WorkerRecord {
                id: id.clone(),
                host: "localhost".to_string(),
                gpus: Vec::new(),
                last_heartbeat: now,
            },
            running,
            config().lease_ttl,
        )
        .unwrap()
}

fn round(store: &dyn Store, now: Timestamp) -> Vec<Decision> {
    store
        .schedule_round(now, config(), &mut |snapshot| schedule(snapshot))
        .unwrap()
}

fn lease(job: JobId, epoch: u64, worker: &WorkerId) -> LeaseRef {
    LeaseRef {
        job,
        epoch,
        worker: worker.clone(),
    }
}

fn at(seconds: u64) -> Timestamp {
    T0.plus(Duration::from_secs(seconds))
}

fn artifact(job: JobId, name: &str, kind: ArtifactKind, step: u64) -> ArtifactRecord {
    ArtifactRecord {
        info: ArtifactInfo {
            job,
            name: name.to_string(),
            sha256: format!("{:064x}", step + 1),
            size: 10 + step,
            kind,
            step,
        },
        relative_path: format!("jobs/{}/{}", job, name),
    }
}

fn sweep_is_created_with_every_job_queued_and_dependencies_mapped(store: &dyn Store) {
    let sweep = submit(store, "spec: 1", &chain(), 3);
    let status = store.sweep_status(sweep).unwrap();
    assert_eq!(status.name, "demo");
    assert_eq!(
        store.sweep_results(sweep).unwrap().sweep.spec_yaml,
        "spec: 1"
    );
    assert_eq!(status.jobs.len(), 4);
    assert_eq!(status.counts[&JobState::Queued], 4);
    assert!(!status.ended);
    let train = status
        .jobs
        .iter()
        .find(|job| job.key.0 == "train-a")
        .unwrap();
    let probe = status
        .jobs
        .iter()
        .find(|job| job.key.0 == "probe-a")
        .unwrap();
    assert_eq!(train.deps, vec![probe.id]);
    assert_eq!(train.kind, JobKind::Train);
    assert_eq!(train.params, json!({"rank": 8, "name": "train-a"}));
    assert_eq!(train.max_attempts, 3);
    assert_eq!(store.find_sweeps_by_spec("spec: 1").unwrap(), vec![sweep]);
    assert!(store.find_sweeps_by_spec("spec: 2").unwrap().is_empty());
    assert_eq!(store.list_sweeps().unwrap()[0].id, sweep);
    assert!(matches!(
        store.sweep_status(SweepId(999)),
        Err(StoreError::NotFound { .. })
    ));
}

fn a_plan_with_a_dependency_not_planned_before_is_refused(store: &dyn Store) {
    let jobs = vec![
        planned("train-a", JobKind::Train, &["probe-a"], 1),
        planned("probe-a", JobKind::Probe, &[], 1),
    ];
    let error = store
        .create_sweep(
            NewSweep {
                name: "bad",
                file_name: "bad.yaml",
                spec_yaml: "",
                jobs: &jobs,
                max_attempts: 1,
            },
            T0,
        )
        .unwrap_err();
    assert!(
        error.to_string().contains("train-a depends on probe-a"),
        "{error}"
    );
    assert!(store.list_sweeps().unwrap().is_empty(), "nothing stored");
}

fn assignments_are_delivered_once_with_dependency_outputs(store: &dyn Store) {
    let sweep = submit(store, "s", &chain()[..3], 3);
    let w = worker(store, "w1", &[], T0);
    round(store, at(1));
    let given = store.take_assignments(&w).unwrap();
    assert_eq!(given.len(), 1, "one CPU slot");
    let probe = &given[0];
    assert_eq!(probe.key.0, "probe-a");
    assert_eq!((probe.epoch, probe.attempt, probe.world_size), (1, 1, 1));
    assert!(
        store.take_assignments(&w).unwrap().is_empty(),
        "delivered once"
    );
    let probe_lease = lease(probe.job, 1, &w);
    store
        .put_artifact(
            &probe_lease,
            &artifact(probe.job, "page.json", ArtifactKind::Output, 0),
            at(2),
        )
        .unwrap();
    let outcome = store
        .complete_job(
            &probe_lease,
            &json!({"dominant": "layers.2.mlp.down_proj"}),
            None,
            at(3),
        )
        .unwrap();
    assert_eq!(outcome, ReportOutcome::Accepted);
    heartbeat(store, &w, &[], at(3));
    round(store, at(4));
    let given = store.take_assignments(&w).unwrap();
    assert_eq!(given.len(), 1);
    let train = &given[0];
    assert_eq!(train.key.0, "train-a");
    assert_eq!(train.dependencies.len(), 1);
    assert_eq!(train.dependencies[0].kind, JobKind::Probe);
    assert_eq!(
        train.dependencies[0].result,
        json!({"dominant": "layers.2.mlp.down_proj"})
    );
    assert_eq!(train.dependencies[0].artifacts[0].name, "page.json");
    assert!(train.resume_from.is_none());
    let status = store.sweep_status(sweep).unwrap();
    assert_eq!(status.counts[&JobState::Succeeded], 1);
    assert_eq!(status.counts[&JobState::Running], 1);
}

fn a_result_delivered_twice_is_counted_once(store: &dyn Store) {
    let sweep = submit(
        store,
        "s",
        &[planned("eval-base", JobKind::Eval, &[], 1)],
        3,
    );
    let w = worker(store, "w1", &[], T0);
    round(store, at(1));
    let job = store.take_assignments(&w).unwrap()[0].job;
    let first = store
        .complete_job(&lease(job, 1, &w), &json!({"score": 0.5}), None, at(2))
        .unwrap();
    let second = store
        .complete_job(&lease(job, 1, &w), &json!({"score": 0.9}), None, at(3))
        .unwrap();
    assert!(first.is_accepted());
    assert!(matches!(second, ReportOutcome::Ignored(reason) if reason.contains("succeeded")));
    let record = store.job(job).unwrap();
    assert_eq!(record.result, Some(json!({"score": 0.5})));
    assert_eq!(record.finished_at, Some(at(2)));
    let failed_late = store
        .fail_job(&lease(job, 1, &w), "late", FailureKind::Retryable, at(4))
        .unwrap();
    assert!(!failed_late.is_accepted());
    assert_eq!(store.job(job).unwrap().state, JobState::Succeeded);
    assert!(store.sweep_status(sweep).unwrap().ended);
}

fn a_result_for_a_stale_lease_epoch_is_ignored(store: &dyn Store) {
    submit(store, "s", &[planned("train-a", JobKind::Train, &[], 1)], 3);
    let slow = worker(store, "slow", &[], T0);
    round(store, at(1));
    let job = store.take_assignments(&slow).unwrap()[0].job;
    // `slow` stops heartbeating; `fast` appears and keeps heartbeating.
    let fast = worker(store, "fast", &[], at(5));
    heartbeat(store, &fast, &[], at(12));
    let decisions = round(store, at(12));
    assert!(decisions
        .iter()
        .any(|d| matches!(d, Decision::Requeue { epoch: 1, .. })));
    let given = store.take_assignments(&fast).unwrap();
    assert_eq!(given.len(), 1);
    assert_eq!(given[0].epoch, 2);
    assert_eq!(given[0].attempt, 2);
    let late = store
        .complete_job(&lease(job, 1, &slow), &json!({"loss": 9.0}), None, at(13))
        .unwrap();
    assert!(
        matches!(&late, ReportOutcome::Ignored(reason) if reason.contains("stale lease")),
        "{late:?}"
    );
    let progress_late = store
        .record_progress(
            &lease(job, 1, &slow),
            &Progress {
                step: 3,
                ..Progress::default()
            },
        )
        .unwrap();
    assert!(!progress_late.is_accepted());
    let wrong_worker = store
        .complete_job(&lease(job, 2, &slow), &json!({}), None, at(13))
        .unwrap();
    assert!(
        matches!(&wrong_worker, ReportOutcome::Ignored(reason) if reason.contains("holds no lease"))
    );
    let current = store
        .complete_job(&lease(job, 2, &fast), &json!({"loss": 1.0}), None, at(14))
        .unwrap();
    assert!(current.is_accepted());
    let record = store.job(job).unwrap();
    assert_eq!(record.result, Some(json!({"loss": 1.0})));
    assert_eq!(record.attempts, 2);
    // The slow worker's heartbeat is told to stop its stale attempt.
    assert_eq!(heartbeat(store, &slow, &[(job, 1)], at(15)), vec![(job, 1)]);
    assert_eq!(
        store
            .metrics(at(15), config().worker_timeout)
            .unwrap()
            .lease_expiries,
        1
    );
}

fn heartbeats_extend_leases_and_report_what_to_stop(store: &dyn Store) {
    let sweep = submit(store, "s", &[planned("train-a", JobKind::Train, &[], 1)], 3);
    let w = worker(store, "w1", &[], T0);
    round(store, at(1));
    let job = store.take_assignments(&w).unwrap()[0].job;
    // Heartbeats every 5 s keep the 10 s lease alive well past its first deadline.
    for second in [5, 10, 15, 20, 25] {
        assert!(heartbeat(store, &w, &[(job, 1)], at(second)).is_empty());
        assert!(round(store, at(second + 1)).is_empty());
    }
    assert_eq!(store.job(job).unwrap().state, JobState::Running);
    assert_eq!(store.job(job).unwrap().workers, vec![w.clone()]);
    // A job the worker claims but does not hold: stop.
    assert_eq!(
        heartbeat(store, &w, &[(JobId(777), 1)], at(26)),
        vec![(JobId(777), 1)]
    );
    let cancelled = store.cancel_sweep(sweep, at(27)).unwrap();
    assert_eq!(cancelled, 1);
    assert_eq!(heartbeat(store, &w, &[(job, 1)], at(28)), vec![(job, 1)]);
    let record = store.job(job).unwrap();
    assert_eq!(record.state, JobState::Cancelled);
    assert!(record.workers.is_empty());
    assert_eq!(
        store.cancel_sweep(sweep, at(29)).unwrap(),
        0,
        "cancelling twice changes nothing"
    );
    assert!(store.sweep_status(sweep).unwrap().cancelled.is_some());
    assert!(store.find_sweeps_by_spec("s").unwrap().is_empty());
}

fn failures_requeue_until_max_attempts_then_fail_and_interruptions_are_free(store: &dyn Store) {
    submit(store, "s", &[planned("train-a", JobKind::Train, &[], 1)], 2);
    let w = worker(store, "w1", &[], T0);
    round(store, at(1));
    let first = store.take_assignments(&w).unwrap()[0].clone();
    let interrupted = store
        .fail_job(
            &lease(first.job, 1, &w),
            "worker shutting down",
            FailureKind::Interrupted,
            at(2),
        )
        .unwrap();
    assert!(interrupted.is_accepted());
    let record = store.job(first.job).unwrap();
    assert_eq!((record.state, record.attempts), (JobState::Queued, 0));
    heartbeat(store, &w, &[], at(2));
    round(store, at(3));
    let second = store.take_assignments(&w).unwrap()[0].clone();
    assert_eq!((second.epoch, second.attempt), (2, 1));
    store
        .fail_job(
            &lease(second.job, 2, &w),
            "out of memory",
            FailureKind::Retryable,
            at(4),
        )
        .unwrap();
    assert_eq!(store.job(first.job).unwrap().state, JobState::Queued);
    heartbeat(store, &w, &[], at(4));
    round(store, at(5));
    let third = store.take_assignments(&w).unwrap()[0].clone();
    assert_eq!((third.epoch, third.attempt), (3, 2));
    store
        .fail_job(
            &lease(third.job, 3, &w),
            "out of memory again",
            FailureKind::Retryable,
            at(6),
        )
        .unwrap();
    let record = store.job(first.job).unwrap();
    assert_eq!(record.state, JobState::Failed);
    assert_eq!(
        record.last_error.as_deref(),
        Some("attempt 2 of 2: out of memory again")
    );
    assert_eq!(record.finished_at, Some(at(6)));
}

fn a_leaving_worker_gets_no_more_work_and_its_leases_are_requeued_for_free(store: &dyn Store) {
    submit(
        store,
        "s",
        &[
            planned("train-a", JobKind::Train, &[], 1),
            planned("train-b", JobKind::Train, &[], 1),
        ],
        3,
    );
    let w = worker(store, "w1", &[], T0);
    round(store, at(1));
    let delivered = store.take_assignments(&w).unwrap()[0].clone();
    // The second job is leased to w in a later round but never delivered.
    store
        .complete_job(
            &lease(delivered.job, delivered.epoch, &w),
            &json!({}),
            None,
            at(2),
        )
        .unwrap();
    let decisions = round(store, at(3));
    assert!(matches!(decisions.as_slice(), [Decision::Assign(_)]));
    let requeued = store.retire_worker(&w, at(4)).unwrap();
    assert_eq!(requeued.len(), 1);
    let record = store.job(requeued[0]).unwrap();
    assert_eq!((record.state, record.attempts), (JobState::Queued, 0));
    assert_eq!(
        record.last_error.as_deref(),
        Some("interrupted: worker w1 left")
    );
    assert!(round(store, at(5)).is_empty(), "a retired worker got work");
    assert!(store.take_assignments(&w).unwrap().is_empty());
    // Coming back (a heartbeat registers it again) makes it eligible again.
    heartbeat(store, &w, &[], at(6));
    round(store, at(7));
    let again = store.take_assignments(&w).unwrap();
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].attempt, 1);
}

fn a_permanent_failure_fails_at_once_and_dependents_are_skipped(store: &dyn Store) {
    let sweep = submit(store, "s", &chain(), 3);
    let w = worker(store, "w1", &[0, 1], T0);
    round(store, at(1));
    let given = store.take_assignments(&w).unwrap();
    assert_eq!(given.len(), 2, "probe and base eval are ready");
    let probe = given.iter().find(|a| a.key.0 == "probe-a").unwrap();
    store
        .fail_job(
            &lease(probe.job, 1, &w),
            "unknown module kind",
            FailureKind::Permanent,
            at(2),
        )
        .unwrap();
    heartbeat(store, &w, &[], at(2));
    round(store, at(3));
    let status = store.sweep_status(sweep).unwrap();
    let state_of = |key: &str| {
        status
            .jobs
            .iter()
            .find(|job| job.key.0 == key)
            .unwrap()
            .clone()
    };
    assert_eq!(state_of("probe-a").state, JobState::Failed);
    assert!(state_of("probe-a")
        .last_error
        .unwrap()
        .contains("failed permanently: unknown module kind"));
    assert_eq!(state_of("train-a").state, JobState::Skipped);
    assert_eq!(
        state_of("train-a").last_error.as_deref(),
        Some("dependency probe-a failed")
    );
    assert_eq!(state_of("eval-a").state, JobState::Skipped);
    assert_eq!(state_of("eval-base").state, JobState::Running);
}

fn a_requeued_train_job_resumes_from_its_newest_checkpoint(store: &dyn Store) {
    submit(store, "s", &[planned("train-a", JobKind::Train, &[], 1)], 3);
    let a = worker(store, "a", &[], T0);
    round(store, at(1));
    let job = store.take_assignments(&a).unwrap()[0].job;
    let current = lease(job, 1, &a);
    for step in [50, 100] {
        let name = format!("checkpoint-{step:06}");
        let outcome = store
            .put_artifact(
                &current,
                &artifact(job, &name, ArtifactKind::Checkpoint, step),
                at(2),
            )
            .unwrap();
        assert!(outcome.is_accepted());
    }
    let b = worker(store, "b", &[], at(11));
    heartbeat(store, &b, &[], at(12));
    round(store, at(12));
    let resumed = store.take_assignments(&b).unwrap()[0].clone();
    let checkpoint = resumed.resume_from.expect("a checkpoint to resume from");
    assert_eq!(
        (checkpoint.name.as_str(), checkpoint.step),
        ("checkpoint-000100", 100)
    );
    // The lost worker can no longer add artifacts to the job.
    let stale = store
        .put_artifact(
            &current,
            &artifact(job, "checkpoint-000150", ArtifactKind::Checkpoint, 150),
            at(13),
        )
        .unwrap();
    assert!(!stale.is_accepted());
    assert_eq!(store.artifacts(job).unwrap().len(), 2);
    let stored = store.artifact(job, "checkpoint-000050").unwrap().unwrap();
    assert_eq!(
        stored.relative_path,
        format!("jobs/{job}/checkpoint-000050")
    );
}

fn a_gang_is_leased_together_and_only_rank_zero_reports_the_result(store: &dyn Store) {
    submit(store, "s", &[planned("train-a", JobKind::Train, &[], 2)], 3);
    let a = worker(store, "a", &[0], T0);
    let b = worker(store, "b", &[0], T0);
    round(store, at(1));
    let on_a = store.take_assignments(&a).unwrap();
    let on_b = store.take_assignments(&b).unwrap();
    assert_eq!((on_a.len(), on_b.len()), (1, 1));
    let (rank_zero, other) = if on_a[0].local_ranks[0].rank == 0 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    assert_eq!(on_a[0].world_size, 2);
    let job = on_a[0].job;
    let from_other = store
        .publish_rendezvous(&lease(job, 1, other), b"nope")
        .unwrap();
    assert!(!from_other.is_accepted());
    assert_eq!(store.fetch_rendezvous(&lease(job, 1, other)).unwrap(), None);
    assert!(store
        .publish_rendezvous(&lease(job, 1, rank_zero), b"nccl-id")
        .unwrap()
        .is_accepted());
    assert_eq!(
        store.fetch_rendezvous(&lease(job, 1, other)).unwrap(),
        Some(b"nccl-id".to_vec())
    );
    let not_rank_zero = store
        .complete_job(&lease(job, 1, other), &json!({}), None, at(2))
        .unwrap();
    assert!(matches!(not_rank_zero, ReportOutcome::Ignored(reason) if reason.contains("rank 0")));
    assert!(store
        .complete_job(&lease(job, 1, rank_zero), &json!({"ok": true}), None, at(3))
        .unwrap()
        .is_accepted());
    // The other rank is told to stop at its next heartbeat.
    assert_eq!(heartbeat(store, other, &[(job, 1)], at(4)), vec![(job, 1)]);
}

fn a_cached_probe_is_reused_by_another_sweep_with_its_artifacts(store: &dyn Store) {
    submit(
        store,
        "first",
        &[planned("probe-a", JobKind::Probe, &[], 1)],
        3,
    );
    let w = worker(store, "w", &[], T0);
    round(store, at(1));
    let first = store.take_assignments(&w).unwrap()[0].job;
    let first_lease = lease(first, 1, &w);
    assert!(store
        .lookup_cache(&first_lease, "digest-123", at(1))
        .unwrap()
        .is_none());
    store
        .put_artifact(
            &first_lease,
            &artifact(first, "page.json", ArtifactKind::Output, 0),
            at(2),
        )
        .unwrap();
    store
        .complete_job(
            &first_lease,
            &json!({"top": "layers.1.mlp.down_proj"}),
            Some("digest-123"),
            at(3),
        )
        .unwrap();
    submit(
        store,
        "second",
        &[planned("probe-a", JobKind::Probe, &[], 1)],
        3,
    );
    heartbeat(store, &w, &[], at(4));
    round(store, at(4));
    let second = store.take_assignments(&w).unwrap()[0].job;
    assert_ne!(first, second);
    let hit = store
        .lookup_cache(&lease(second, 1, &w), "digest-123", at(5))
        .unwrap()
        .expect("cache hit");
    assert_eq!(hit.source, first);
    assert_eq!(hit.result, json!({"top": "layers.1.mlp.down_proj"}));
    assert_eq!(hit.artifacts.len(), 1);
    assert_eq!(hit.artifacts[0].job, second);
    let attached = store.artifact(second, "page.json").unwrap().unwrap();
    assert_eq!(
        attached.relative_path,
        format!("jobs/{first}/page.json"),
        "same file, not a copy"
    );
    assert!(store
        .lookup_cache(&lease(second, 1, &w), "other-digest", at(5))
        .unwrap()
        .is_none());
    assert!(
        store
            .lookup_cache(&lease(second, 7, &w), "digest-123", at(5))
            .unwrap()
            .is_none(),
        "stale lease"
    );
}

fn leases_survive_a_restart_grace_and_metrics_add_up(store: &dyn Store) {
    submit(store, "s", &chain(), 3);
    let w = worker(store, "w", &[], T0);
    round(store, at(1));
    let job = store.take_assignments(&w).unwrap()[0].job;
    assert_eq!(store.extend_all_leases(at(100)).unwrap(), 1);
    assert!(round(store, at(50))
        .iter()
        .all(|d| !matches!(d, Decision::Requeue { .. })));
    assert!(heartbeat(store, &w, &[(job, 1)], at(60)).is_empty());
    store
        .complete_job(&lease(job, 1, &w), &json!({}), None, at(61))
        .unwrap();
    let metrics = store.metrics(at(62), config().worker_timeout).unwrap();
    assert_eq!(metrics.jobs_by_state[&JobState::Succeeded], 1);
    assert_eq!(metrics.jobs_by_state[&JobState::Queued], 3);
    assert_eq!((metrics.live_workers, metrics.known_workers), (1, 1));
    assert_eq!(metrics.job_durations, vec![(JobKind::Probe, 60.0)]);
    let later = store.metrics(at(200), config().worker_timeout).unwrap();
    assert_eq!(later.live_workers, 0);
}

fn progress_is_recorded_for_the_current_lease(store: &dyn Store) {
    submit(store, "s", &[planned("train-a", JobKind::Train, &[], 1)], 3);
    let w = worker(store, "w", &[], T0);
    round(store, at(1));
    let job = store.take_assignments(&w).unwrap()[0].job;
    let progress = Progress {
        step: 40,
        total_steps: 300,
        loss: Some(1.25),
        tokens_per_second: Some(812.5),
        message: "training".to_string(),
    };
    assert!(store
        .record_progress(&lease(job, 1, &w), &progress)
        .unwrap()
        .is_accepted());
    assert_eq!(store.job(job).unwrap().progress, progress);
    assert!(store.lease_is_current(&lease(job, 1, &w)).unwrap());
    assert!(!store.lease_is_current(&lease(job, 2, &w)).unwrap());
}

macro_rules! store_conformance {
    ($backend:ident, $open:expr) => {
        mod $backend {
            use super::*;

            fn open() -> (Box<dyn Store>, Option<tempfile::TempDir>) {
                #[allow(clippy::redundant_closure_call)]
                ($open)()
            }

            macro_rules! case {
                ($name:ident) => {
                    #[test]
                    fn $name() {
                        let (store, _dir) = open();
                        super::$name(store.as_ref());
                    }
                };
            }

            case!(sweep_is_created_with_every_job_queued_and_dependencies_mapped);
            case!(a_plan_with_a_dependency_not_planned_before_is_refused);
            case!(assignments_are_delivered_once_with_dependency_outputs);
            case!(a_result_delivered_twice_is_counted_once);
            case!(a_result_for_a_stale_lease_epoch_is_ignored);
            case!(heartbeats_extend_leases_and_report_what_to_stop);
            case!(failures_requeue_until_max_attempts_then_fail_and_interruptions_are_free);
            case!(a_leaving_worker_gets_no_more_work_and_its_leases_are_requeued_for_free);
            case!(a_permanent_failure_fails_at_once_and_dependents_are_skipped);
            case!(a_requeued_train_job_resumes_from_its_newest_checkpoint);
            case!(a_gang_is_leased_together_and_only_rank_zero_reports_the_result);
            case!(a_cached_probe_is_reused_by_another_sweep_with_its_artifacts);
            case!(leases_survive_a_restart_grace_and_metrics_add_up);
            case!(progress_is_recorded_for_the_current_lease);
        }
    };
}

store_conformance!(sqlite_in_memory, || {
    let store = lorasweep_coordinator::store::SqliteStore::open_in_memory().unwrap();
    (Box::new(store) as Box<dyn Store>, None)
});

store_conformance!(sqlite_file, || {
    let dir = tempfile::tempdir().unwrap();
    let store =
        lorasweep_coordinator::store::SqliteStore::open(&dir.path().join("state.db")).unwrap();
    (Box::new(store) as Box<dyn Store>, Some(dir))
});

#[test]
fn a_database_file_keeps_its_state_across_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let sweep = {
        let store = lorasweep_coordinator::store::SqliteStore::open(&path).unwrap();
        submit(&store, "persisted", &chain(), 3)
    };
    let store = lorasweep_coordinator::store::SqliteStore::open(&path).unwrap();
    let status = store.sweep_status(sweep).unwrap();
    assert_eq!(
        store.sweep_results(sweep).unwrap().sweep.spec_yaml,
        "persisted"
    );
    assert_eq!(status.jobs.len(), 4);
}

#[test]
fn a_database_from_a_newer_lorasweep_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    {
        let connection = rusqlite::Connection::open(&path).unwrap();
        connection.pragma_update(None, "user_version", 99).unwrap();
    }
    let error = lorasweep_coordinator::store::SqliteStore::open(&path).unwrap_err();
    assert!(
        matches!(error, StoreError::SchemaTooNew { found: 99, .. }),
        "{error}"
    );
    assert!(error.to_string().contains("upgrade lorasweep"));
}
