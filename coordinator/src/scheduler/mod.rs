//! Job scheduling as a pure function: a [`Snapshot`] of jobs, leases and workers in, a list
//! of [`Decision`]s out. No IO, no clock: the caller passes `now`, and the store applies
//! the decisions in the same transaction it read the snapshot in.
//!
//! See `README.md` beside this file for the algorithm and the gang policy.

pub mod sim;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use crate::domain::{JobState, RankSlot, Timestamp};
use crate::ids::{JobId, WorkerId};

/// Timing knobs of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// How long a lease lives without a heartbeat.
    pub lease_ttl: Duration,
    /// A worker not heard from for this long gets no new work.
    pub worker_timeout: Duration,
    /// How long a multi-slot job waits with smaller jobs running past it before it starts
    /// holding free slots for itself.
    pub gang_patience: Duration,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        SchedulerConfig {
            lease_ttl: Duration::from_secs(30),
            worker_timeout: Duration::from_secs(30),
            gang_patience: Duration::from_secs(60),
        }
    }
}

/// A lease one worker holds on a running job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseView {
    /// The worker.
    pub worker: WorkerId,
    /// Its ranks and their slots on that worker.
    pub ranks: Vec<RankSlot>,
    /// When the lease expires unless a heartbeat extends it.
    pub deadline: Timestamp,
}

/// What the scheduler knows of one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobView {
    /// The job.
    pub id: JobId,
    /// A human name for reasons (`probe-3fa2…`).
    pub key: String,
    /// Its state.
    pub state: JobState,
    /// Jobs that must succeed first (each must also be in the snapshot).
    pub deps: Vec<JobId>,
    /// Slots it needs, leased together (0 is taken as 1).
    pub gpus: u32,
    /// Attempts started so far.
    pub attempts: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The epoch of its latest lease.
    pub epoch: u64,
    /// When it entered the queue last.
    pub queued_at: Timestamp,
    /// When it reached a final state.
    pub finished_at: Option<Timestamp>,
    /// The error of its latest failed attempt.
    pub last_error: Option<String>,
    /// Its leases while running (one per worker of its gang).
    pub leases: Vec<LeaseView>,
}

/// What the scheduler knows of one worker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerView {
    /// The worker.
    pub id: WorkerId,
    /// The slots it offers (GPU indices, or `[0]` for a CPU-only worker).
    pub slots: Vec<u32>,
    /// When it was last heard from.
    pub last_heartbeat: Timestamp,
}

/// Everything one scheduling round looks at.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The time of the round.
    pub now: Timestamp,
    /// Timing knobs.
    pub config: SchedulerConfig,
    /// Every queued and running job, and every job one of them depends on.
    pub jobs: Vec<JobView>,
    /// Every known worker.
    pub workers: Vec<WorkerView>,
}

/// The slots of one gang member: one worker and the ranks it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkerPlacement {
    /// The worker.
    pub worker: WorkerId,
    /// The ranks it runs and their slots.
    pub ranks: Vec<RankSlot>,
}

/// A job leased to one or more workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    /// The job.
    pub job: JobId,
    /// The new lease epoch (previous epoch + 1).
    pub epoch: u64,
    /// The attempt this starts (previous attempts + 1).
    pub attempt: u32,
    /// Ranks in all.
    pub world_size: u32,
    /// Where each rank runs; rank 0 is on the first worker.
    pub placements: Vec<WorkerPlacement>,
    /// When the new leases expire unless extended.
    pub deadline: Timestamp,
}

/// One change the scheduler wants made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A running job's lease expired and attempts are left: back to the queue.
    Requeue {
        /// The job.
        job: JobId,
        /// The epoch whose lease expired.
        epoch: u64,
        /// Why, for the job's last error.
        reason: String,
    },
    /// A running job's lease expired on its last attempt: failed.
    Fail {
        /// The job.
        job: JobId,
        /// The epoch whose lease expired.
        epoch: u64,
        /// The error kept on the job.
        error: String,
    },
    /// A queued job whose dependency did not succeed.
    Skip {
        /// The job.
        job: JobId,
        /// Which dependency and why.
        reason: String,
    },
    /// A ready job leased to workers.
    Assign(Assignment),
}

/// Whether a worker is recent enough to get new work.
fn is_live(worker: &WorkerView, snapshot: &Snapshot) -> bool {
    snapshot.now.millis_since(worker.last_heartbeat)
        <= u64::try_from(snapshot.config.worker_timeout.as_millis()).unwrap_or(u64::MAX)
}

/// Runs one scheduling round. See the module README for the rules.
pub fn schedule(snapshot: &Snapshot) -> Vec<Decision> {
    let mut decisions = Vec::new();
    let mut states: HashMap<JobId, JobState> = snapshot
        .jobs
        .iter()
        .map(|job| (job.id, job.state))
        .collect();
    let mut requeued_now: HashSet<JobId> = HashSet::new();
    let mut busy: HashSet<(&WorkerId, u32)> = HashSet::new();

    // 1. Leases: an expired lease ends the whole attempt (every rank of a gang).
    for job in snapshot
        .jobs
        .iter()
        .filter(|job| job.state == JobState::Running)
    {
        let expired = job
            .leases
            .iter()
            .find(|lease| lease.deadline < snapshot.now);
        if expired.is_none() && !job.leases.is_empty() {
            for lease in &job.leases {
                for rank in &lease.ranks {
                    busy.insert((&lease.worker, rank.gpu));
                }
            }
            continue;
        }
        let reason = match expired {
            Some(lease) => format!(
                "lease of attempt {} expired on worker {}",
                job.attempts, lease.worker
            ),
            None => format!("attempt {} had no lease left", job.attempts),
        };
        if job.attempts >= job.max_attempts {
            let error = match &job.last_error {
                Some(previous) => format!(
                    "{reason}; out of attempts ({} of {}); previous error: {previous}",
                    job.attempts, job.max_attempts
                ),
                None => format!(
                    "{reason}; out of attempts ({} of {})",
                    job.attempts, job.max_attempts
                ),
            };
            decisions.push(Decision::Fail {
                job: job.id,
                epoch: job.epoch,
                error,
            });
            states.insert(job.id, JobState::Failed);
        } else {
            decisions.push(Decision::Requeue {
                job: job.id,
                epoch: job.epoch,
                reason,
            });
            states.insert(job.id, JobState::Queued);
            requeued_now.insert(job.id);
        }
    }

    // 2. Skips: a queued job whose dependency ended without success never runs. Repeat
    //    until nothing changes, so a skip reaches dependents of dependents in one round.
    let keys: HashMap<JobId, &str> = snapshot
        .jobs
        .iter()
        .map(|job| (job.id, job.key.as_str()))
        .collect();
    loop {
        let mut changed = false;
        for job in &snapshot.jobs {
            if states.get(&job.id) != Some(&JobState::Queued) {
                continue;
            }
            let blocking = job.deps.iter().find_map(|dep| match states.get(dep) {
                Some(state @ (JobState::Failed | JobState::Skipped | JobState::Cancelled)) => {
                    Some(format!(
                        "dependency {} {}",
                        keys.get(dep).copied().unwrap_or("?"),
                        state
                    ))
                }
                Some(_) => None,
                None => Some(format!("dependency job {dep} is unknown")),
            });
            if let Some(reason) = blocking {
                decisions.push(Decision::Skip {
                    job: job.id,
                    reason,
                });
                states.insert(job.id, JobState::Skipped);
                changed = true;
            }
        }
        if !changed {
            break;
        }
    }

    // 3. Ready jobs, oldest first.
    let finished_at: HashMap<JobId, Option<Timestamp>> = snapshot
        .jobs
        .iter()
        .map(|job| (job.id, job.finished_at))
        .collect();
    let mut ready: Vec<(&JobView, Timestamp)> = snapshot
        .jobs
        .iter()
        .filter(|job| states.get(&job.id) == Some(&JobState::Queued))
        .filter(|job| {
            job.deps
                .iter()
                .all(|dep| states.get(dep) == Some(&JobState::Succeeded))
        })
        .map(|job| {
            let ready_since = if requeued_now.contains(&job.id) {
                snapshot.now
            } else {
                job.deps
                    .iter()
                    .filter_map(|dep| finished_at.get(dep).copied().flatten())
                    .fold(job.queued_at, Timestamp::max)
            };
            (job, ready_since)
        })
        .collect();
    ready.sort_by_key(|(job, ready_since)| (*ready_since, job.id));

    // 4. Free slots of live workers, by worker id.
    let mut free: BTreeMap<&WorkerId, Vec<u32>> = BTreeMap::new();
    let mut live_slot_count = 0usize;
    for worker in snapshot
        .workers
        .iter()
        .filter(|worker| is_live(worker, snapshot))
    {
        live_slot_count += worker.slots.len();
        let slots: Vec<u32> = worker
            .slots
            .iter()
            .copied()
            .filter(|slot| !busy.contains(&(&worker.id, *slot)))
            .collect();
        if !slots.is_empty() {
            free.insert(&worker.id, slots);
        }
    }

    // 5. Place ready jobs; the oldest gang past its patience holds free slots.
    let patience = u64::try_from(snapshot.config.gang_patience.as_millis()).unwrap_or(u64::MAX);
    let mut reservation_made = false;
    for (job, ready_since) in ready {
        let needed = job.gpus.max(1) as usize;
        if needed > live_slot_count {
            // It cannot run on the workers there are now; holding slots would only idle them.
            continue;
        }
        if let Some(placements) = place(&free, needed) {
            take_slots(&mut free, &placements);
            decisions.push(Decision::Assign(Assignment {
                job: job.id,
                epoch: job.epoch + 1,
                attempt: job.attempts + 1,
                world_size: needed as u32,
                placements,
                deadline: snapshot.now.plus(snapshot.config.lease_ttl),
            }));
            continue;
        }
        let waited = snapshot.now.millis_since(ready_since);
        if needed > 1 && !reservation_made && waited >= patience {
            // Hold what is free for this gang; slots freed later come to it first because
            // every later job is placed only from what is left.
            let held = spread(
                &free,
                free.values().map(Vec::len).sum::<usize>().min(needed),
            );
            take_slots(&mut free, &held);
            reservation_made = true;
        }
    }

    debug_assert_eq!(check_decisions(snapshot, &decisions), Ok(()));
    decisions
}

/// Chooses slots for a job needing `needed` of them: on one worker when one has room (the
/// one with the fewest free slots that fits, keeping large holes for gangs), else across
/// workers, those with the most free slots first. `None` when too few are free.
fn place(free: &BTreeMap<&WorkerId, Vec<u32>>, needed: usize) -> Option<Vec<WorkerPlacement>> {
    let best_single = free
        .iter()
        .filter(|(_, slots)| slots.len() >= needed)
        .min_by_key(|(worker, slots)| (slots.len(), **worker));
    if let Some((worker, slots)) = best_single {
        let ranks = slots
            .iter()
            .take(needed)
            .enumerate()
            .map(|(rank, gpu)| RankSlot {
                rank: rank as u32,
                gpu: *gpu,
            })
            .collect();
        return Some(vec![WorkerPlacement {
            worker: (*worker).clone(),
            ranks,
        }]);
    }
    let total: usize = free.values().map(Vec::len).sum();
    if total < needed {
        return None;
    }
    Some(spread(free, needed))
}

/// Takes `count` slots across workers, those with the most free slots first (ties by
/// worker id), numbering ranks in that order.
fn spread(free: &BTreeMap<&WorkerId, Vec<u32>>, count: usize) -> Vec<WorkerPlacement> {
    let mut workers: Vec<(&&WorkerId, &Vec<u32>)> = free.iter().collect();
    workers.sort_by_key(|(worker, slots)| (std::cmp::Reverse(slots.len()), **worker));
    let mut placements = Vec::new();
    let mut next_rank = 0u32;
    for (worker, slots) in workers {
        if next_rank as usize == count {
            break;
        }
        let take = slots.len().min(count - next_rank as usize);
        let ranks = slots[..take]
            .iter()
            .map(|gpu| {
                let slot = RankSlot {
                    rank: next_rank,
                    gpu: *gpu,
                };
                next_rank += 1;
                slot
            })
            .collect();
        placements.push(WorkerPlacement {
            worker: (*worker).clone(),
            ranks,
        });
    }
    placements
}

fn take_slots(free: &mut BTreeMap<&WorkerId, Vec<u32>>, placements: &[WorkerPlacement]) {
    for placement in placements {
        if let Some(slots) = free.get_mut(&placement.worker) {
            slots.retain(|slot| !placement.ranks.iter().any(|rank| rank.gpu == *slot));
            if slots.is_empty() {
                free.remove(&placement.worker);
            }
        }
    }
}

/// Checks the post-conditions of a round: each job decided at most once; assignments only
/// for ready jobs, only on live workers' existing slots that nobody else holds, with ranks
/// `0..world_size` each exactly once and `world_size` equal to the job's need; requeue and
/// fail only for running jobs with an expired (or no) lease; skip only for queued jobs.
pub fn check_decisions(snapshot: &Snapshot, decisions: &[Decision]) -> Result<(), String> {
    let jobs: HashMap<JobId, &JobView> = snapshot.jobs.iter().map(|job| (job.id, job)).collect();
    let workers: HashMap<&WorkerId, &WorkerView> = snapshot
        .workers
        .iter()
        .map(|worker| (&worker.id, worker))
        .collect();
    let mut decided: HashSet<JobId> = HashSet::new();
    let mut held: HashSet<(WorkerId, u32)> = HashSet::new();
    let mut ended: HashSet<JobId> = HashSet::new();
    for decision in decisions {
        if let Decision::Requeue { job, .. } | Decision::Fail { job, .. } = decision {
            ended.insert(*job);
        }
    }
    for job in snapshot
        .jobs
        .iter()
        .filter(|job| job.state == JobState::Running && !ended.contains(&job.id))
    {
        for lease in &job.leases {
            for rank in &lease.ranks {
                held.insert((lease.worker.clone(), rank.gpu));
            }
        }
    }
    for decision in decisions {
        let job_id = match decision {
            Decision::Requeue { job, .. }
            | Decision::Fail { job, .. }
            | Decision::Skip { job, .. } => *job,
            Decision::Assign(assignment) => assignment.job,
        };
        let Some(job) = jobs.get(&job_id) else {
            return Err(format!("decision for job {job_id} not in the snapshot"));
        };
        let requeued_then_assigned = matches!(decision, Decision::Assign(_))
            && decisions
                .iter()
                .any(|other| matches!(other, Decision::Requeue { job, .. } if *job == job_id));
        if !decided.insert(job_id) && !requeued_then_assigned {
            return Err(format!("job {job_id} decided twice"));
        }
        match decision {
            Decision::Requeue { epoch, .. } | Decision::Fail { epoch, .. } => {
                if job.state != JobState::Running || *epoch != job.epoch {
                    return Err(format!(
                        "job {job_id} ended but was not running at epoch {epoch}"
                    ));
                }
                let expired = job.leases.is_empty()
                    || job.leases.iter().any(|lease| lease.deadline < snapshot.now);
                if !expired {
                    return Err(format!("job {job_id} ended with a live lease"));
                }
                let out_of_attempts = job.attempts >= job.max_attempts;
                if matches!(decision, Decision::Fail { .. }) != out_of_attempts {
                    return Err(format!("job {job_id}: fail iff out of attempts"));
                }
            }
            Decision::Skip { .. } => {
                if job.state != JobState::Queued {
                    return Err(format!("job {job_id} skipped but not queued"));
                }
            }
            Decision::Assign(assignment) => {
                if job.state != JobState::Queued && !requeued_then_assigned {
                    return Err(format!("job {job_id} assigned but not queued"));
                }
                for dep in &job.deps {
                    if jobs.get(dep).map(|dep| dep.state) != Some(JobState::Succeeded) {
                        return Err(format!(
                            "job {job_id} assigned before dependency {dep} succeeded"
                        ));
                    }
                }
                if assignment.epoch != job.epoch + 1 || assignment.attempt != job.attempts + 1 {
                    return Err(format!(
                        "job {job_id} assigned with a wrong epoch or attempt"
                    ));
                }
                if assignment.world_size != job.gpus.max(1) {
                    return Err(format!(
                        "job {job_id} assigned {} ranks, needs {}",
                        assignment.world_size,
                        job.gpus.max(1)
                    ));
                }
                let mut ranks: Vec<u32> = Vec::new();
                for placement in &assignment.placements {
                    let Some(worker) = workers.get(&placement.worker) else {
                        return Err(format!(
                            "job {job_id} placed on unknown worker {}",
                            placement.worker
                        ));
                    };
                    if !is_live(worker, snapshot) {
                        return Err(format!("job {job_id} placed on lost worker {}", worker.id));
                    }
                    if placement.ranks.is_empty() {
                        return Err(format!("job {job_id} has an empty placement"));
                    }
                    for rank in &placement.ranks {
                        if !worker.slots.contains(&rank.gpu) {
                            return Err(format!(
                                "job {job_id} placed on missing slot {} of {}",
                                rank.gpu, worker.id
                            ));
                        }
                        if !held.insert((placement.worker.clone(), rank.gpu)) {
                            return Err(format!("slot {} of {} leased twice", rank.gpu, worker.id));
                        }
                        ranks.push(rank.rank);
                    }
                }
                ranks.sort_unstable();
                if ranks != (0..assignment.world_size).collect::<Vec<_>>() {
                    return Err(format!("job {job_id} ranks are {ranks:?}"));
                }
                if assignment.placements[0]
                    .ranks
                    .iter()
                    .all(|rank| rank.rank != 0)
                {
                    return Err(format!("job {job_id}: rank 0 is not on the first worker"));
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
