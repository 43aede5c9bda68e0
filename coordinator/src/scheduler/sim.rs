//! A simulated cluster around [`schedule`]: jobs that take a set time, workers that
//! heartbeat every tick until they are lost, a clock that only moves when told. It applies
//! decisions the way the store does, so scheduler tests (and the scheduler benchmark) need
//! no database, no network and no real workers.
//!
//! ```
//! use std::time::Duration;
//! use lorasweep_coordinator::scheduler::sim::{SimCluster, SimJob};
//! use lorasweep_coordinator::scheduler::SchedulerConfig;
//!
//! let mut cluster = SimCluster::new(SchedulerConfig::default());
//! cluster.add_worker("w1", &[0]);
//! let probe = cluster.add_job(SimJob::new(Duration::from_secs(5)));
//! let train = cluster.add_job(SimJob::new(Duration::from_secs(5)).after(&[probe]));
//! assert!(cluster.run_until_idle(Duration::from_secs(1), 100));
//! assert_eq!(cluster.completions(train), 1);
//! ```

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use super::{
    check_decisions, schedule, Decision, JobView, LeaseView, SchedulerConfig, Snapshot, WorkerView,
};
use crate::domain::{JobState, Timestamp};
use crate::ids::{JobId, WorkerId};

/// A job to add to the simulation.
#[derive(Debug, Clone)]
pub struct SimJob {
    /// Run time of one attempt.
    pub duration: Duration,
    /// Slots it needs.
    pub gpus: u32,
    /// Jobs that must succeed first.
    pub deps: Vec<JobId>,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// How many of its first attempts fail (retryable) when they finish.
    pub failing_attempts: u32,
}

impl SimJob {
    /// A one-slot job taking `duration`, three attempts allowed.
    pub fn new(duration: Duration) -> SimJob {
        SimJob {
            duration,
            gpus: 1,
            deps: Vec::new(),
            max_attempts: 3,
            failing_attempts: 0,
        }
    }

    /// Needs `gpus` slots.
    pub fn gpus(mut self, gpus: u32) -> SimJob {
        self.gpus = gpus;
        self
    }

    /// Depends on these jobs.
    pub fn after(mut self, deps: &[JobId]) -> SimJob {
        self.deps = deps.to_vec();
        self
    }

    /// Allows this many attempts.
    pub fn max_attempts(mut self, max_attempts: u32) -> SimJob {
        self.max_attempts = max_attempts;
        self
    }

    /// Its first `count` attempts fail when they finish.
    pub fn failing(mut self, count: u32) -> SimJob {
        self.failing_attempts = count;
        self
    }
}

#[derive(Debug, Clone)]
struct JobSim {
    view: JobView,
    duration: Duration,
    failing_attempts: u32,
    started: Option<Timestamp>,
    completions: u32,
    assignments: u32,
}

#[derive(Debug, Clone)]
struct WorkerSim {
    view: WorkerView,
    alive: bool,
}

/// A simulated cluster; see the module docs.
#[derive(Debug, Clone)]
pub struct SimCluster {
    now: Timestamp,
    config: SchedulerConfig,
    jobs: BTreeMap<JobId, JobSim>,
    workers: BTreeMap<WorkerId, WorkerSim>,
    next_job: u64,
    lease_expiries: u64,
    slot_time_used: Duration,
}

impl SimCluster {
    /// An empty cluster at time 1 000 000 ms.
    pub fn new(config: SchedulerConfig) -> SimCluster {
        SimCluster {
            now: Timestamp(1_000_000),
            config,
            jobs: BTreeMap::new(),
            workers: BTreeMap::new(),
            next_job: 1,
            lease_expiries: 0,
            slot_time_used: Duration::ZERO,
        }
    }

    /// The simulated time.
    pub fn now(&self) -> Timestamp {
        self.now
    }

    /// Adds a live worker with these slots (panics on an invalid id: test input).
    pub fn add_worker(&mut self, id: &str, slots: &[u32]) -> WorkerId {
        let id = WorkerId::new(id).expect("simulated worker ids are valid");
        self.workers.insert(
            id.clone(),
            WorkerSim {
                view: WorkerView {
                    id: id.clone(),
                    slots: slots.to_vec(),
                    last_heartbeat: self.now,
                },
                alive: true,
            },
        );
        id
    }

    /// Queues a job; its id is returned.
    pub fn add_job(&mut self, job: SimJob) -> JobId {
        let id = JobId(self.next_job);
        self.next_job += 1;
        self.jobs.insert(
            id,
            JobSim {
                view: JobView {
                    id,
                    key: format!("job-{}", id.0),
                    state: JobState::Queued,
                    deps: job.deps,
                    gpus: job.gpus,
                    attempts: 0,
                    max_attempts: job.max_attempts,
                    epoch: 0,
                    queued_at: self.now,
                    finished_at: None,
                    last_error: None,
                    leases: Vec::new(),
                },
                duration: job.duration,
                failing_attempts: job.failing_attempts,
                started: None,
                completions: 0,
                assignments: 0,
            },
        );
        id
    }

    /// The worker stops heartbeating and its jobs stop making progress.
    pub fn lose_worker(&mut self, id: &WorkerId) {
        if let Some(worker) = self.workers.get_mut(id) {
            worker.alive = false;
        }
    }

    /// A lost worker comes back (with nothing running).
    pub fn revive_worker(&mut self, id: &WorkerId) {
        if let Some(worker) = self.workers.get_mut(id) {
            worker.alive = true;
        }
    }

    /// Moves the clock by `step`; live workers heartbeat (extending their leases) and finish
    /// jobs whose time is up; then one scheduling round runs, its post-conditions are
    /// checked (panicking on a violation: this is a test harness) and its decisions applied.
    pub fn tick(&mut self, step: Duration) -> Vec<Decision> {
        self.now = self.now.plus(step);
        let live: HashSet<WorkerId> = self
            .workers
            .values()
            .filter(|worker| worker.alive)
            .map(|worker| worker.view.id.clone())
            .collect();
        for worker in self.workers.values_mut().filter(|worker| worker.alive) {
            worker.view.last_heartbeat = self.now;
        }
        let deadline = self.now.plus(self.config.lease_ttl);
        let now = self.now;
        for job in self.jobs.values_mut() {
            if job.view.state != JobState::Running {
                continue;
            }
            let all_alive = job
                .view
                .leases
                .iter()
                .all(|lease| live.contains(&lease.worker));
            for lease in job.view.leases.iter_mut() {
                if live.contains(&lease.worker) {
                    lease.deadline = deadline;
                }
            }
            let started = job.started.unwrap_or(now);
            if !all_alive || Duration::from_millis(now.millis_since(started)) < job.duration {
                continue;
            }
            let slots: u32 = job
                .view
                .leases
                .iter()
                .map(|lease| lease.ranks.len() as u32)
                .sum();
            self.slot_time_used += job.duration * slots;
            job.view.leases.clear();
            if job.failing_attempts > 0 {
                job.failing_attempts -= 1;
                job.view.last_error = Some(format!(
                    "simulated failure of attempt {}",
                    job.view.attempts
                ));
                if job.view.attempts >= job.view.max_attempts {
                    job.view.state = JobState::Failed;
                    job.view.finished_at = Some(now);
                } else {
                    job.view.state = JobState::Queued;
                    job.view.queued_at = now;
                }
            } else {
                job.view.state = JobState::Succeeded;
                job.view.finished_at = Some(now);
                job.completions += 1;
            }
        }
        let snapshot = self.snapshot();
        let decisions = schedule(&snapshot);
        if let Err(violation) = check_decisions(&snapshot, &decisions) {
            panic!(
                "scheduler post-condition violated at {:?}: {violation}",
                self.now
            );
        }
        for decision in &decisions {
            self.apply(decision);
        }
        decisions
    }

    /// Ticks until no job is queued or running (true) or `max_ticks` pass (false).
    pub fn run_until_idle(&mut self, step: Duration, max_ticks: usize) -> bool {
        for _ in 0..max_ticks {
            if self.is_idle() {
                return true;
            }
            self.tick(step);
        }
        self.is_idle()
    }

    /// Whether no job is queued or running.
    pub fn is_idle(&self) -> bool {
        self.jobs.values().all(|job| job.view.state.is_final())
    }

    /// A job's state.
    pub fn state(&self, job: JobId) -> JobState {
        self.jobs[&job].view.state
    }

    /// A job as the scheduler sees it.
    pub fn job(&self, job: JobId) -> &JobView {
        &self.jobs[&job].view
    }

    /// How many times a job succeeded (must never exceed 1).
    pub fn completions(&self, job: JobId) -> u32 {
        self.jobs[&job].completions
    }

    /// How many times a job was leased.
    pub fn assignments(&self, job: JobId) -> u32 {
        self.jobs[&job].assignments
    }

    /// Leases that expired so far.
    pub fn lease_expiries(&self) -> u64 {
        self.lease_expiries
    }

    /// Slot-time spent by attempts that ran to their end.
    pub fn slot_time_used(&self) -> Duration {
        self.slot_time_used
    }

    /// Ids of every job.
    pub fn job_ids(&self) -> Vec<JobId> {
        self.jobs.keys().copied().collect()
    }

    /// The scheduler's input now (jobs, leases, workers).
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            now: self.now,
            config: self.config,
            jobs: self.jobs.values().map(|job| job.view.clone()).collect(),
            workers: self
                .workers
                .values()
                .map(|worker| worker.view.clone())
                .collect(),
        }
    }

    fn apply(&mut self, decision: &Decision) {
        match decision {
            Decision::Requeue { job, reason, .. } => {
                let job = self.jobs.get_mut(job).expect("decided job exists");
                job.view.state = JobState::Queued;
                job.view.queued_at = self.now;
                job.view.last_error = Some(reason.clone());
                job.view.leases.clear();
                job.started = None;
                self.lease_expiries += 1;
            }
            Decision::Fail { job, error, .. } => {
                let job = self.jobs.get_mut(job).expect("decided job exists");
                job.view.state = JobState::Failed;
                job.view.finished_at = Some(self.now);
                job.view.last_error = Some(error.clone());
                job.view.leases.clear();
                self.lease_expiries += 1;
            }
            Decision::Skip { job, reason } => {
                let job = self.jobs.get_mut(job).expect("decided job exists");
                job.view.state = JobState::Skipped;
                job.view.finished_at = Some(self.now);
                job.view.last_error = Some(reason.clone());
            }
            Decision::Assign(assignment) => {
                let job = self
                    .jobs
                    .get_mut(&assignment.job)
                    .expect("decided job exists");
                job.view.state = JobState::Running;
                job.view.epoch = assignment.epoch;
                job.view.attempts = assignment.attempt;
                job.view.leases = assignment
                    .placements
                    .iter()
                    .map(|placement| LeaseView {
                        worker: placement.worker.clone(),
                        ranks: placement.ranks.clone(),
                        deadline: assignment.deadline,
                    })
                    .collect();
                job.started = Some(self.now);
                job.assignments += 1;
            }
        }
    }
}
