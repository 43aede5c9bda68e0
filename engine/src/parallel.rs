//! Data-parallel training: the collective operations ranks use to agree on gradients, and the
//! two implementations of them — [`ThreadReducer`] (ranks as threads of one process, for the
//! CPU and for tests) and `NcclReducer` (ranks as GPUs, through NCCL; `nccl` feature).
//!
//! # How a data-parallel step works
//!
//! Every rank holds the whole data set and the same seeded data order, so every rank knows the
//! whole global micro-batch of `batch_size` rows without talking to the others. Rank `r` of
//! `W` runs the rows `r, r + W, r + 2W, …` of it ([`shard_rows`]). The single-process loss of a
//! micro-batch is the mean over its `T` response tokens; rank `r`, whose rows hold `T_r` of
//! them, computes the mean over its own rows and scales it by `W · T_r / T`. The mean over
//! ranks of these scaled losses — and of their gradients — is then exactly the single-process
//! loss and gradient, whatever the split of tokens between ranks. Gradients of all trainable
//! parameters are flattened into one buffer per optimizer step (after gradient accumulation),
//! averaged with one [`GradReducer::all_reduce_mean`], and split back; every rank then applies
//! the same AdamW step to the same numbers, so the adapters stay bit-identical across ranks.
//!
//! Only rank 0 reads and writes checkpoints. At start, rank 0 broadcasts its settings, the size
//! of its data set and the checkpoint it resumes from (if any), then the parameters and
//! optimizer moments, so every rank starts from the same point; a rank whose settings or data
//! differ fails, and with it the whole group.
//!
//! # Failure
//!
//! A rank that fails calls [`GradReducer::abort`]; a [`ThreadReducer`] handle that is dropped
//! (its thread returned or panicked) counts as failed too. Every rank then gets an error from
//! its next collective, or from the one it is waiting in, instead of waiting forever. A
//! [`ThreadReducer`] group may also have a timeout. With NCCL a lost peer cannot be detected
//! from inside a collective; the coordinator stops the other ranks of the job.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use crate::data::Example;
use crate::param::Param;

/// Why a collective operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ReduceError {
    /// Another rank failed, left the group or timed out, or this rank did earlier.
    #[error("the rank group failed: {0}")]
    GroupFailed(String),
    /// This rank waited longer than the group's timeout for the others.
    #[error("rank {rank} waited {waited:?} in collective #{round} for ranks {missing:?}")]
    TimedOut {
        /// The rank that waited.
        rank: usize,
        /// How long it waited.
        waited: Duration,
        /// The collective's sequence number, from 0.
        round: u64,
        /// The ranks that had not arrived.
        missing: Vec<usize>,
    },
    /// Ranks disagreed about the shape of a collective or about what they train.
    #[error("ranks disagree: {0}")]
    Mismatch(String),
    /// A tensor could not be read or made.
    #[error("collective: {0}")]
    Tensor(#[from] candle_core::Error),
    /// NCCL reported an error.
    #[error("nccl: {0}")]
    Nccl(String),
}

/// The collectives a data-parallel training run needs, over a fixed group of ranks.
///
/// Every rank must call the same collectives in the same order, with buffers of the same
/// length; each call returns once every rank has made it. One handle belongs to one rank and
/// is used by one thread at a time.
pub trait GradReducer: Send + Sync {
    /// This rank, `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Element-wise sum over all ranks of a tensor of `f32` values (any shape, same on every
    /// rank). Every rank gets the same result, as `f32`, with the input's shape and device.
    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, ReduceError>;

    /// Marks this rank as failed, so that every rank's current or next collective returns an
    /// error instead of waiting for it. The first reason given is the one reported.
    fn abort(&self, reason: &str);

    /// Element-wise mean over all ranks (the sum divided by the world size).
    fn all_reduce_mean(&self, buffer: &Tensor) -> Result<Tensor, ReduceError> {
        let sum = self.all_reduce_sum(buffer)?;
        Ok((sum / self.world_size() as f64)?)
    }

    /// Rank 0's tensor, on every rank (others pass a tensor of the same shape, whose values
    /// are ignored). Implemented as a sum to which the other ranks add zeros, which is exact.
    fn broadcast_tensor(&self, buffer: &Tensor) -> Result<Tensor, ReduceError> {
        let contribution = if self.rank() == 0 {
            buffer.to_dtype(DType::F32)?
        } else {
            Tensor::zeros(buffer.shape(), DType::F32, buffer.device())?
        };
        self.all_reduce_sum(&contribution)
    }

    /// Rank 0's bytes, on every rank (others pass anything, e.g. an empty vector): the length
    /// goes first as four 16-bit pieces, then the bytes, each carried exactly by an `f32`.
    fn broadcast_bytes(&self, bytes: Vec<u8>) -> Result<Vec<u8>, ReduceError> {
        let len = if self.rank() == 0 {
            bytes.len() as u64
        } else {
            0
        };
        let pieces: Vec<f32> = (0..4)
            .map(|i| ((len >> (16 * i)) & 0xFFFF) as f32)
            .collect();
        let pieces = Tensor::from_vec(pieces, 4, &Device::Cpu)?;
        let pieces = self.broadcast_tensor(&pieces)?.to_vec1::<f32>()?;
        let len = pieces
            .iter()
            .enumerate()
            .try_fold(0u64, |acc, (i, &piece)| {
                exact_integer(piece, 0xFFFF).map(|piece| acc | (piece << (16 * i)))
            })
            .ok_or_else(|| ReduceError::Mismatch("a broadcast length arrived damaged".into()))?;
        let len = usize::try_from(len)
            .map_err(|_| ReduceError::Mismatch(format!("a broadcast of {len} bytes")))?;
        let payload: Vec<f32> = if self.rank() == 0 {
            bytes.iter().map(|&b| b as f32).collect()
        } else {
            vec![0.0; len]
        };
        let payload = Tensor::from_vec(payload, len, &Device::Cpu)?;
        self.broadcast_tensor(&payload)?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|value| exact_integer(value, 255).map(|b| b as u8))
            .collect::<Option<Vec<u8>>>()
            .ok_or_else(|| ReduceError::Mismatch("broadcast bytes arrived damaged".into()))
    }

    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<(), ReduceError> {
        self.all_reduce_sum(&Tensor::zeros(1, DType::F32, &Device::Cpu)?)?;
        Ok(())
    }
}

fn exact_integer(value: f32, max: u64) -> Option<u64> {
    (value >= 0.0 && value <= max as f32 && value.fract() == 0.0).then_some(value as u64)
}

/// Which rows of a global micro-batch of `batch` rows rank `rank` of `world` runs: `rank`,
/// `rank + world`, … Over all ranks the shards are disjoint and cover `0..batch`; a rank may
/// get none when `batch < world`.
pub fn shard_rows(batch: usize, rank: usize, world: usize) -> Vec<usize> {
    if world == 0 {
        return Vec::new();
    }
    (rank..batch).step_by(world).collect()
}

/// The number of positions of `example` that are loss targets: response tokens after the
/// first (the first token is never predicted), as [`crate::data::collate`] weights them.
pub fn response_targets(example: &Example) -> usize {
    example.response.iter().skip(1).filter(|&&r| r).count()
}

/// A digest of tokenized examples (tokens and response masks, in order), for ranks to check
/// that they train on the same data.
pub fn digest_examples(examples: &[Example]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update((examples.len() as u64).to_le_bytes());
    for example in examples {
        hasher.update((example.tokens.len() as u64).to_le_bytes());
        for (&token, &response) in example.tokens.iter().zip(&example.response) {
            hasher.update(token.to_le_bytes());
            hasher.update([response as u8]);
        }
    }
    hex::encode(hasher.finalize())
}

/// This rank's part of one global micro-batch.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Shard {
    /// Indices into the examples, in the order of the global micro-batch.
    pub(crate) examples: Vec<usize>,
    /// Factor on the shard's own mean loss: `W · T_r / T` (NaN when `T = 0`, as the
    /// single-process loss then is).
    pub(crate) scale: f64,
}

/// Rank `rank`'s shard of the global micro-batch `picked` (example indices).
pub(crate) fn shard(examples: &[Example], picked: &[usize], rank: usize, world: usize) -> Shard {
    let rows = shard_rows(picked.len(), rank, world);
    let total: usize = picked.iter().map(|&i| response_targets(&examples[i])).sum();
    let local: usize = rows
        .iter()
        .map(|&row| response_targets(&examples[picked[row]]))
        .sum();
    Shard {
        examples: rows.iter().map(|&row| picked[row]).collect(),
        scale: world as f64 * local as f64 / total as f64,
    }
}

/// Averages one step's accumulated gradients and loss over all ranks with a single
/// collective. A gradient missing on every rank stays missing (its parameter is not stepped,
/// as in a single process); one missing on some ranks only counts as zeros there.
pub(crate) fn reduce_step(
    reducer: &dyn GradReducer,
    params: &[Param],
    grads: Vec<Option<Tensor>>,
    loss: f64,
    device: &Device,
) -> Result<(Vec<Option<Tensor>>, f64), ReduceError> {
    let mut parts = Vec::with_capacity(params.len() + 1);
    let mut tail = Vec::with_capacity(params.len() + 2);
    for (param, grad) in params.iter().zip(&grads) {
        match grad {
            Some(grad) => {
                parts.push(grad.to_dtype(DType::F32)?.flatten_all()?);
                tail.push(1.0f32);
            }
            None => {
                parts.push(Tensor::zeros(param.var.elem_count(), DType::F32, device)?);
                tail.push(0.0);
            }
        }
    }
    // The loss as a pair of f32 whose sum keeps most of its f64 precision.
    let high = loss as f32;
    tail.push(high);
    tail.push((loss - high as f64) as f32);
    let tail_len = tail.len();
    parts.push(Tensor::from_vec(tail, tail_len, device)?);
    let reduced = reducer.all_reduce_mean(&Tensor::cat(&parts, 0)?)?;
    let mut offset = 0;
    let mut pieces = Vec::with_capacity(params.len());
    for param in params {
        let count = param.var.elem_count();
        pieces.push(
            reduced
                .narrow(0, offset, count)?
                .reshape(param.var.shape())?,
        );
        offset += count;
    }
    let flags = reduced.narrow(0, offset, tail_len)?.to_vec1::<f32>()?;
    let grads = pieces
        .into_iter()
        .zip(&flags)
        .map(|(piece, &present)| (present > 0.0).then_some(piece))
        .collect();
    let loss = flags[tail_len - 2] as f64 + flags[tail_len - 1] as f64;
    Ok((grads, loss))
}

/// Gives every rank rank 0's parameters and AdamW moments.
pub(crate) fn broadcast_params(
    reducer: &dyn GradReducer,
    params: &mut [Param],
) -> Result<(), ReduceError> {
    let mut parts = Vec::with_capacity(params.len() * 3);
    for param in params.iter() {
        for tensor in [param.var.as_tensor(), &param.m, &param.v] {
            parts.push(tensor.to_dtype(DType::F32)?.flatten_all()?);
        }
    }
    let all = reducer.broadcast_tensor(&Tensor::cat(&parts, 0)?)?;
    let mut offset = 0;
    let mut take = |like: &Tensor| -> Result<Tensor, ReduceError> {
        let count = like.elem_count();
        let piece = all
            .narrow(0, offset, count)?
            .reshape(like.shape())?
            .to_dtype(like.dtype())?;
        offset += count;
        Ok(piece)
    };
    for param in params.iter_mut() {
        let value = take(param.var.as_tensor())?;
        param.var.set(&value)?;
        param.m = take(&param.m)?;
        param.v = take(&param.v)?;
    }
    Ok(())
}

/// An in-process group of ranks, one handle per thread: collectives meet in shared memory.
///
/// Sums are taken in rank order whatever the order of arrival, so results are reproducible
/// bit for bit. A handle that is dropped, or whose rank calls [`GradReducer::abort`], fails
/// the group: every other rank's current or next collective returns
/// [`ReduceError::GroupFailed`]. With a timeout, a rank that waits longer than it fails the
/// group too. Dropping handles is how a group ends, so a group serves one run.
#[derive(Debug)]
pub struct ThreadReducer {
    rank: usize,
    /// Sequence number of this rank's next collective.
    next_round: AtomicU64,
    group: Arc<Group>,
}

#[derive(Debug)]
struct Group {
    world: usize,
    timeout: Option<Duration>,
    state: Mutex<GroupState>,
    changed: Condvar,
}

#[derive(Debug)]
struct GroupState {
    /// The collective now gathering contributions.
    round: u64,
    /// Each rank's contribution to `round`.
    slots: Vec<Option<Vec<f32>>>,
    arrived: usize,
    /// The last completed collective and its result; it stays until the next one completes,
    /// which cannot happen before every rank has taken it.
    finished: Option<(u64, Arc<Vec<f32>>)>,
    /// Set once, by the first rank that fails.
    failure: Option<String>,
}

impl ThreadReducer {
    /// A group of `world` ranks with no timeout: handle `r` is rank `r`.
    pub fn group(world: usize) -> Vec<ThreadReducer> {
        Self::make_group(world, None)
    }

    /// A group of `world` ranks in which a rank that waits longer than `timeout` for the
    /// others fails the group.
    pub fn group_with_timeout(world: usize, timeout: Duration) -> Vec<ThreadReducer> {
        Self::make_group(world, Some(timeout))
    }

    fn make_group(world: usize, timeout: Option<Duration>) -> Vec<ThreadReducer> {
        let group = Arc::new(Group {
            world,
            timeout,
            state: Mutex::new(GroupState {
                round: 0,
                slots: vec![None; world],
                arrived: 0,
                finished: None,
                failure: None,
            }),
            changed: Condvar::new(),
        });
        (0..world)
            .map(|rank| ThreadReducer {
                rank,
                next_round: AtomicU64::new(0),
                group: group.clone(),
            })
            .collect()
    }

    fn lock(&self) -> MutexGuard<'_, GroupState> {
        // No code panics while holding the lock; a poisoned lock still holds consistent state.
        self.group
            .state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn fail(&self, state: &mut GroupState, reason: String) {
        if state.failure.is_none() {
            state.failure = Some(reason);
        }
        self.group.changed.notify_all();
    }

    /// Adds this rank's contribution to its next collective and waits for the result.
    fn exchange(&self, values: Vec<f32>) -> Result<Arc<Vec<f32>>, ReduceError> {
        let round = self.next_round.fetch_add(1, Ordering::SeqCst);
        let mut state = self.lock();
        if let Some(failure) = &state.failure {
            return Err(ReduceError::GroupFailed(failure.clone()));
        }
        if state.round != round || state.slots[self.rank].is_some() {
            let reason = format!(
                "rank {} called collective #{round} while the group is at #{}",
                self.rank, state.round
            );
            self.fail(&mut state, reason.clone());
            return Err(ReduceError::Mismatch(reason));
        }
        if let Some((other, theirs)) = state
            .slots
            .iter()
            .enumerate()
            .find_map(|(r, slot)| slot.as_ref().map(|s| (r, s.len())))
            .filter(|&(_, len)| len != values.len())
        {
            let reason = format!(
                "in collective #{round} rank {} gave {} values, rank {other} gave {theirs}",
                self.rank,
                values.len()
            );
            self.fail(&mut state, reason.clone());
            return Err(ReduceError::Mismatch(reason));
        }
        state.slots[self.rank] = Some(values);
        state.arrived += 1;
        if state.arrived == self.group.world {
            let mut slots = std::mem::replace(&mut state.slots, vec![None; self.group.world]);
            let mut sum = slots[0].take().unwrap_or_default();
            for slot in slots.iter().skip(1).flatten() {
                for (acc, value) in sum.iter_mut().zip(slot) {
                    *acc += value;
                }
            }
            state.finished = Some((round, Arc::new(sum)));
            state.round += 1;
            state.arrived = 0;
            self.group.changed.notify_all();
        }
        let started = Instant::now();
        loop {
            if let Some((done, result)) = &state.finished {
                if *done == round {
                    return Ok(result.clone());
                }
            }
            if let Some(failure) = &state.failure {
                return Err(ReduceError::GroupFailed(failure.clone()));
            }
            state = match self.group.timeout {
                None => self
                    .group
                    .changed
                    .wait(state)
                    .unwrap_or_else(|poisoned| poisoned.into_inner()),
                Some(timeout) => {
                    let waited = started.elapsed();
                    if waited >= timeout {
                        let missing: Vec<usize> = (0..self.group.world)
                            .filter(|&r| state.slots[r].is_none())
                            .collect();
                        let error = ReduceError::TimedOut {
                            rank: self.rank,
                            waited,
                            round,
                            missing,
                        };
                        self.fail(&mut state, error.to_string());
                        return Err(error);
                    }
                    self.group
                        .changed
                        .wait_timeout(state, timeout - waited)
                        .unwrap_or_else(|poisoned| poisoned.into_inner())
                        .0
                }
            };
        }
    }
}

impl GradReducer for ThreadReducer {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.group.world
    }

    fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, ReduceError> {
        let values = buffer
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let sum = self.exchange(values)?;
        Ok(Tensor::from_slice(
            sum.as_slice(),
            buffer.shape(),
            buffer.device(),
        )?)
    }

    fn abort(&self, reason: &str) {
        let mut state = self.lock();
        self.fail(&mut state, format!("rank {} failed: {reason}", self.rank));
    }
}

impl Drop for ThreadReducer {
    fn drop(&mut self) {
        // Collectives already completed stay readable by the others; any later one fails.
        let mut state = self.lock();
        let reason = format!("rank {} left the group", self.rank);
        self.fail(&mut state, reason);
    }
}

#[cfg(feature = "nccl")]
pub use nccl::NcclReducer;

#[cfg(feature = "nccl")]
mod nccl {
    use std::sync::Mutex;

    use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
    use candle_core::{CudaStorage, CustomOp1, DType, Device, Layout, Shape, Tensor};

    use super::{GradReducer, ReduceError};

    /// A communicator that may move between threads.
    struct SendComm(Comm);

    // SAFETY: an NCCL communicator is a handle to state NCCL owns; NCCL allows any thread to
    // use it as long as no two threads use it at once. `NcclReducer` keeps it behind a mutex,
    // so calls on it are serialized, and the stream it holds is itself `Send`.
    unsafe impl Send for SendComm {}

    /// One rank of a group of GPUs whose collectives go through NCCL, on the stream of the
    /// rank's candle device (so they are ordered with the rank's other work).
    ///
    /// Rank 0 makes the group's id ([`NcclReducer::new_unique_id`]); the coordinator relays it
    /// to the other ranks; then every rank calls [`NcclReducer::new`], which returns once all
    /// ranks have joined.
    pub struct NcclReducer {
        comm: Mutex<SendComm>,
        device: Device,
        rank: usize,
        world: usize,
        failure: Mutex<Option<String>>,
    }

    impl std::fmt::Debug for NcclReducer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("NcclReducer")
                .field("rank", &self.rank)
                .field("world", &self.world)
                .field("device", &self.device)
                .finish()
        }
    }

    fn nccl_error(what: &str, error: impl std::fmt::Debug) -> ReduceError {
        ReduceError::Nccl(format!("{what}: {error:?}"))
    }

    impl NcclReducer {
        /// The number of bytes of an NCCL unique id.
        pub const ID_BYTES: usize = 128;

        /// A fresh group id, made by rank 0 and relayed to the other ranks.
        pub fn new_unique_id() -> Result<Vec<u8>, ReduceError> {
            let id = Id::new().map_err(|e| nccl_error("making a unique id", e.0))?;
            Ok(id.internal().iter().map(|&c| c as u8).collect())
        }

        /// Joins the group `id` as `rank` of `world` on the CUDA `device`; blocks until every
        /// rank has joined.
        pub fn new(
            rank: usize,
            world: usize,
            id: &[u8],
            device: &Device,
        ) -> Result<Self, ReduceError> {
            if rank >= world {
                return Err(ReduceError::Mismatch(format!(
                    "rank {rank} is outside a world of {world}"
                )));
            }
            let Device::Cuda(cuda) = device else {
                return Err(ReduceError::Mismatch(format!(
                    "nccl needs a cuda device, got {device:?}"
                )));
            };
            let internal: [std::ffi::c_char; NcclReducer::ID_BYTES] = id
                .iter()
                .map(|&b| b as std::ffi::c_char)
                .collect::<Vec<_>>()
                .try_into()
                .map_err(|_| {
                    ReduceError::Mismatch(format!(
                        "an nccl unique id has {} bytes, got {}",
                        NcclReducer::ID_BYTES,
                        id.len()
                    ))
                })?;
            let comm = Comm::from_rank(cuda.cuda_stream(), rank, world, Id::uninit(internal))
                .map_err(|e| nccl_error("joining the group", e.0))?;
            Ok(Self {
                comm: Mutex::new(SendComm(comm)),
                device: device.clone(),
                rank,
                world,
                failure: Mutex::new(None),
            })
        }
    }

    /// The in-device sum over ranks, as a candle op so it reads and writes device memory
    /// directly.
    struct AllReduceSum<'a> {
        comm: &'a Comm,
    }

    impl CustomOp1 for AllReduceSum<'_> {
        fn name(&self) -> &'static str {
            "nccl-all-reduce-sum"
        }

        fn cpu_fwd(
            &self,
            _: &candle_core::CpuStorage,
            _: &Layout,
        ) -> candle_core::Result<(candle_core::CpuStorage, Shape)> {
            candle_core::bail!("the nccl all-reduce needs a cuda tensor")
        }

        fn cuda_fwd(
            &self,
            storage: &CudaStorage,
            layout: &Layout,
        ) -> candle_core::Result<(CudaStorage, Shape)> {
            let Some((start, end)) = layout.contiguous_offsets() else {
                candle_core::bail!("the nccl all-reduce needs a contiguous tensor")
            };
            let source = storage.as_cuda_slice::<f32>()?.slice(start..end);
            let device = &storage.device;
            let mut target = device.alloc_zeros::<f32>(end - start)?;
            if end > start {
                self.comm
                    .all_reduce(&source, &mut target, &ReduceOp::Sum)
                    .map_err(|e| candle_core::Error::Msg(format!("nccl all-reduce: {:?}", e.0)))?;
            }
            Ok((
                CudaStorage::wrap_cuda_slice(target, device.clone()),
                layout.shape().clone(),
            ))
        }
    }

    impl GradReducer for NcclReducer {
        fn rank(&self) -> usize {
            self.rank
        }

        fn world_size(&self) -> usize {
            self.world
        }

        fn all_reduce_sum(&self, buffer: &Tensor) -> Result<Tensor, ReduceError> {
            if let Some(failure) = self
                .failure
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            {
                return Err(ReduceError::GroupFailed(failure));
            }
            let flat = buffer
                .to_device(&self.device)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .contiguous()?;
            let comm = self.comm.lock().unwrap_or_else(|p| p.into_inner());
            let sum = flat.apply_op1_no_bwd(&AllReduceSum { comm: &comm.0 })?;
            drop(comm);
            Ok(sum.reshape(buffer.shape())?.to_device(buffer.device())?)
        }

        fn abort(&self, reason: &str) {
            let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if failure.is_none() {
                *failure = Some(format!("rank {} failed: {reason}", self.rank));
            }
        }
    }
}
