//! Scheduler tests on the simulated cluster: no store, no network, no real workers.

use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::sim::{SimCluster, SimJob};
use super::*;

const SECOND: Duration = Duration::from_secs(1);

fn config() -> SchedulerConfig {
    SchedulerConfig {
        lease_ttl: Duration::from_secs(10),
        worker_timeout: Duration::from_secs(10),
        gang_patience: Duration::from_secs(20),
    }
}

fn assignments(decisions: &[Decision]) -> Vec<&Assignment> {
    decisions
        .iter()
        .filter_map(|decision| match decision {
            Decision::Assign(assignment) => Some(assignment),
            _ => None,
        })
        .collect()
}

#[test]
fn a_job_runs_only_after_its_dependencies_succeeded() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("w1", &[0]);
    cluster.add_worker("w2", &[0]);
    let probe = cluster.add_job(SimJob::new(5 * SECOND));
    let train = cluster.add_job(SimJob::new(5 * SECOND).after(&[probe]));
    let eval = cluster.add_job(SimJob::new(5 * SECOND).after(&[train]));
    let first = cluster.tick(SECOND);
    let assigned: Vec<JobId> = assignments(&first).iter().map(|a| a.job).collect();
    assert_eq!(
        assigned,
        vec![probe],
        "only the probe is ready, two workers are free"
    );
    for _ in 0..4 {
        cluster.tick(SECOND);
        assert_eq!(cluster.state(train), JobState::Queued);
    }
    assert!(cluster.run_until_idle(SECOND, 100));
    for job in [probe, train, eval] {
        assert_eq!(cluster.state(job), JobState::Succeeded);
        assert_eq!(cluster.completions(job), 1);
    }
}

#[test]
fn a_lost_worker_s_job_is_requeued_after_its_lease_expires_and_runs_elsewhere() {
    let mut cluster = SimCluster::new(config());
    let first = cluster.add_worker("a", &[0]);
    cluster.tick(SECOND);
    let job = cluster.add_job(SimJob::new(30 * SECOND));
    cluster.tick(SECOND);
    assert_eq!(cluster.job(job).leases[0].worker, first);
    cluster.add_worker("b", &[0]);
    cluster.lose_worker(&first);
    // The lease lives lease_ttl after the last heartbeat; until then nothing moves.
    for _ in 0..9 {
        cluster.tick(SECOND);
        assert_eq!(cluster.state(job), JobState::Running);
        assert_eq!(cluster.job(job).epoch, 1);
    }
    let mut requeued = false;
    for _ in 0..3 {
        let decisions = cluster.tick(SECOND);
        requeued |= decisions
            .iter()
            .any(|decision| matches!(decision, Decision::Requeue { job: id, epoch: 1, .. } if *id == job));
    }
    assert!(requeued);
    assert_eq!(cluster.job(job).leases[0].worker.as_str(), "b");
    assert_eq!(cluster.job(job).epoch, 2);
    assert_eq!(cluster.job(job).attempts, 2);
    assert!(cluster.run_until_idle(SECOND, 100));
    assert_eq!(cluster.completions(job), 1);
    assert_eq!(cluster.lease_expiries(), 1);
}

#[test]
fn out_of_attempts_fails_with_the_error_kept_and_dependents_are_skipped_with_the_reason() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("w", &[0, 1]);
    let probe = cluster.add_job(SimJob::new(2 * SECOND).max_attempts(2).failing(5));
    let train = cluster.add_job(SimJob::new(2 * SECOND).after(&[probe]));
    let eval = cluster.add_job(SimJob::new(2 * SECOND).after(&[train]));
    let unrelated = cluster.add_job(SimJob::new(2 * SECOND));
    assert!(cluster.run_until_idle(SECOND, 100));
    assert_eq!(cluster.state(probe), JobState::Failed);
    assert_eq!(cluster.assignments(probe), 2);
    assert!(cluster
        .job(probe)
        .last_error
        .as_deref()
        .unwrap()
        .contains("simulated failure"));
    assert_eq!(cluster.state(train), JobState::Skipped);
    assert_eq!(cluster.state(eval), JobState::Skipped);
    assert_eq!(
        cluster.job(train).last_error.as_deref(),
        Some("dependency job-1 failed")
    );
    assert_eq!(
        cluster.job(eval).last_error.as_deref(),
        Some("dependency job-2 skipped")
    );
    assert_eq!(cluster.state(unrelated), JobState::Succeeded);
    assert_eq!(cluster.assignments(train), 0);
}

#[test]
fn a_lease_expiring_on_the_last_attempt_fails_the_job_and_skips_its_dependents_in_one_round() {
    let mut cluster = SimCluster::new(config());
    let worker = cluster.add_worker("w", &[0]);
    let job = cluster.add_job(SimJob::new(100 * SECOND).max_attempts(1));
    let dependent = cluster.add_job(SimJob::new(SECOND).after(&[job]));
    cluster.tick(SECOND);
    cluster.lose_worker(&worker);
    let mut failing_round = None;
    for _ in 0..15 {
        let decisions = cluster.tick(SECOND);
        if decisions.iter().any(|d| matches!(d, Decision::Fail { .. })) {
            failing_round = Some(decisions);
            break;
        }
    }
    let decisions = failing_round.expect("the lease expires within lease_ttl");
    assert!(decisions
        .iter()
        .any(|d| matches!(d, Decision::Skip { job: id, .. } if *id == dependent)));
    let error = cluster.job(job).last_error.clone().unwrap();
    assert!(error.contains("expired on worker w"), "{error}");
    assert!(error.contains("out of attempts (1 of 1)"), "{error}");
}

#[test]
fn a_gang_prefers_one_worker_with_room_and_the_tightest_fit() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("big", &[0, 1, 2, 3]);
    cluster.add_worker("pair", &[0, 1]);
    let gang = cluster.add_job(SimJob::new(5 * SECOND).gpus(2));
    let decisions = cluster.tick(SECOND);
    let assignment = assignments(&decisions)[0].clone();
    assert_eq!(assignment.job, gang);
    assert_eq!(assignment.world_size, 2);
    assert_eq!(assignment.placements.len(), 1);
    assert_eq!(assignment.placements[0].worker.as_str(), "pair");
    assert_eq!(
        assignment.placements[0].ranks,
        vec![RankSlot { rank: 0, gpu: 0 }, RankSlot { rank: 1, gpu: 1 }]
    );
}

#[test]
fn a_gang_spans_workers_when_no_single_worker_has_room() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("a", &[0]);
    cluster.add_worker("b", &[0, 1]);
    cluster.add_worker("c", &[5]);
    let gang = cluster.add_job(SimJob::new(5 * SECOND).gpus(4));
    let decisions = cluster.tick(SECOND);
    let assignment = assignments(&decisions)[0].clone();
    assert_eq!(assignment.job, gang);
    let workers: Vec<&str> = assignment
        .placements
        .iter()
        .map(|p| p.worker.as_str())
        .collect();
    assert_eq!(
        workers,
        vec!["b", "a", "c"],
        "most free slots first, rank 0 on b"
    );
    assert_eq!(
        assignment.placements[0].ranks[0],
        RankSlot { rank: 0, gpu: 0 }
    );
    assert!(cluster.run_until_idle(SECOND, 50));
    assert_eq!(cluster.completions(gang), 1);
}

#[test]
fn losing_one_rank_of_a_gang_requeues_the_whole_job_and_frees_the_other_ranks() {
    let mut cluster = SimCluster::new(config());
    let a = cluster.add_worker("a", &[0]);
    cluster.add_worker("b", &[0]);
    cluster.add_worker("c", &[0]);
    let gang = cluster.add_job(SimJob::new(60 * SECOND).gpus(2));
    cluster.tick(SECOND);
    assert_eq!(cluster.job(gang).leases.len(), 2);
    let holders: Vec<WorkerId> = cluster
        .job(gang)
        .leases
        .iter()
        .map(|l| l.worker.clone())
        .collect();
    assert!(holders.contains(&a));
    cluster.lose_worker(&a);
    let mut requeue_seen = false;
    for _ in 0..15 {
        let decisions = cluster.tick(SECOND);
        requeue_seen |= decisions
            .iter()
            .any(|d| matches!(d, Decision::Requeue { .. }));
        if requeue_seen {
            break;
        }
    }
    assert!(requeue_seen);
    // Re-leased as a whole on the two live workers, at a new epoch.
    let job = cluster.job(gang);
    assert_eq!(job.epoch, 2);
    let mut workers: Vec<&str> = job.leases.iter().map(|l| l.worker.as_str()).collect();
    workers.sort();
    assert_eq!(workers, vec!["b", "c"]);
    assert!(cluster.run_until_idle(SECOND, 200));
    assert_eq!(cluster.completions(gang), 1);
}

#[test]
fn small_jobs_run_past_a_waiting_gang_before_its_patience_runs_out() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("a", &[0]);
    cluster.add_worker("b", &[0]);
    let long = cluster.add_job(SimJob::new(15 * SECOND));
    cluster.tick(SECOND);
    let gang = cluster.add_job(SimJob::new(5 * SECOND).gpus(2));
    let small = cluster.add_job(SimJob::new(3 * SECOND));
    let decisions = cluster.tick(SECOND);
    let assigned: Vec<JobId> = assignments(&decisions).iter().map(|a| a.job).collect();
    assert_eq!(
        assigned,
        vec![small],
        "the gang cannot fit; the small job backfills"
    );
    assert_eq!(cluster.state(gang), JobState::Queued);
    assert!(cluster.run_until_idle(SECOND, 100));
    for job in [long, gang, small] {
        assert_eq!(cluster.completions(job), 1);
    }
}

#[test]
fn a_gang_is_not_starved_by_a_steady_stream_of_small_jobs() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("a", &[0]);
    cluster.add_worker("b", &[0]);
    // Staggered small jobs keep at least one slot busy at every moment.
    cluster.add_job(SimJob::new(4 * SECOND));
    cluster.tick(SECOND);
    cluster.tick(SECOND);
    let gang = cluster.add_job(SimJob::new(3 * SECOND).gpus(2));
    let mut gang_started_at = None;
    for tick in 0..200 {
        if tick % 2 == 0 {
            cluster.add_job(SimJob::new(4 * SECOND));
        }
        cluster.tick(SECOND);
        if gang_started_at.is_none() && cluster.state(gang) != JobState::Queued {
            gang_started_at = Some(tick);
        }
    }
    let started = gang_started_at.expect("the gang must start");
    // Patience (20 s) plus the longest small job (4 s) plus a tick of slack.
    assert!(started <= 26, "gang started only at tick {started}");
    assert_eq!(cluster.completions(gang), 1);
}

#[test]
fn a_gang_larger_than_the_cluster_waits_without_holding_slots_and_runs_when_workers_join() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("a", &[0]);
    let huge = cluster.add_job(SimJob::new(2 * SECOND).gpus(3));
    for _ in 0..30 {
        cluster.add_job(SimJob::new(SECOND));
    }
    for _ in 0..80 {
        cluster.tick(SECOND);
    }
    assert_eq!(cluster.state(huge), JobState::Queued);
    let others_done = cluster
        .job_ids()
        .into_iter()
        .filter(|job| *job != huge)
        .all(|job| cluster.state(job) == JobState::Succeeded);
    assert!(
        others_done,
        "small jobs must not be blocked by a gang that cannot fit"
    );
    cluster.add_worker("b", &[0, 1]);
    assert!(cluster.run_until_idle(SECOND, 20));
    assert_eq!(cluster.completions(huge), 1);
}

#[test]
fn no_new_work_goes_to_a_worker_that_stopped_heartbeating() {
    let mut cluster = SimCluster::new(config());
    let quiet = cluster.add_worker("quiet", &[0]);
    cluster.lose_worker(&quiet);
    for _ in 0..11 {
        cluster.tick(SECOND);
    }
    let job = cluster.add_job(SimJob::new(SECOND));
    let decisions = cluster.tick(SECOND);
    assert!(assignments(&decisions).is_empty());
    assert_eq!(cluster.state(job), JobState::Queued);
    cluster.revive_worker(&quiet);
    assert!(cluster.run_until_idle(SECOND, 10));
}

#[test]
fn check_decisions_catches_a_double_leased_slot() {
    let mut cluster = SimCluster::new(config());
    cluster.add_worker("w", &[0]);
    cluster.add_job(SimJob::new(SECOND));
    cluster.add_job(SimJob::new(SECOND));
    let snapshot = cluster.snapshot();
    let decisions = schedule(&snapshot);
    assert_eq!(assignments(&decisions).len(), 1);
    let mut forged = decisions.clone();
    if let Decision::Assign(mut second) = decisions[0].clone() {
        second.job = JobId(2);
        forged.push(Decision::Assign(second));
    }
    let error = check_decisions(&snapshot, &forged).unwrap_err();
    assert!(error.contains("leased twice"), "{error}");
}

/// Random DAGs, random gang sizes, random failures and worker losses: every job ends, none
/// succeeds twice, a job succeeds only after its dependencies did, and a job whose
/// dependency did not succeed is skipped. `tick` checks every round's post-conditions.
#[test]
fn random_clusters_always_drain_with_every_job_done_at_most_once() {
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut cluster = SimCluster::new(config());
        let worker_count = rng.random_range(1..5);
        let mut workers = Vec::new();
        let mut max_slots = 0;
        for index in 0..worker_count {
            let slots: Vec<u32> = (0..rng.random_range(1..4)).collect();
            max_slots = max_slots.max(slots.len());
            workers.push(cluster.add_worker(&format!("w{index}"), &slots));
        }
        let total_slots: usize = cluster
            .snapshot()
            .workers
            .iter()
            .map(|w| w.slots.len())
            .sum();
        let mut jobs: Vec<JobId> = Vec::new();
        for _ in 0..rng.random_range(5..30) {
            let mut deps = Vec::new();
            for existing in &jobs {
                if rng.random_bool(0.15) {
                    deps.push(*existing);
                }
            }
            let gpus = rng.random_range(1..=total_slots.min(3)) as u32;
            let job = SimJob::new(Duration::from_secs(rng.random_range(1..8)))
                .gpus(gpus)
                .after(&deps)
                .max_attempts(rng.random_range(1..4))
                .failing(if rng.random_bool(0.2) {
                    rng.random_range(1..3)
                } else {
                    0
                });
            jobs.push(cluster.add_job(job));
        }
        let mut lost = Vec::new();
        for _ in 0..400 {
            if cluster.is_idle() {
                break;
            }
            if rng.random_bool(0.02) {
                let victim = workers[rng.random_range(0..workers.len())].clone();
                cluster.lose_worker(&victim);
                lost.push(victim);
            }
            if !lost.is_empty() && rng.random_bool(0.05) {
                let back = lost.remove(0);
                cluster.revive_worker(&back);
            }
            cluster.tick(SECOND);
        }
        for back in lost.drain(..) {
            cluster.revive_worker(&back);
        }
        assert!(
            cluster.run_until_idle(SECOND, 2000),
            "seed {seed}: cluster did not drain"
        );
        for job in &jobs {
            let view = cluster.job(*job).clone();
            let completions = cluster.completions(*job);
            assert!(
                completions <= 1,
                "seed {seed}: job {job} completed {completions} times"
            );
            assert_eq!(
                completions == 1,
                view.state == JobState::Succeeded,
                "seed {seed}"
            );
            let deps_ok = view
                .deps
                .iter()
                .all(|dep| cluster.state(*dep) == JobState::Succeeded);
            match view.state {
                JobState::Succeeded | JobState::Failed => {
                    assert!(deps_ok, "seed {seed}: job {job} ran early")
                }
                JobState::Skipped => assert!(!deps_ok, "seed {seed}: job {job} skipped wrongly"),
                other => panic!("seed {seed}: job {job} ended {other}"),
            }
            assert!(view.attempts <= view.max_attempts, "seed {seed}");
        }
    }
}
