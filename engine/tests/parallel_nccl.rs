//! The NCCL reducer on real GPUs (built with `--features nccl`, run on the GPU machine): one
//! rank per visible GPU — world size 1 on one H200 — checks the sums and broadcasts, then that
//! data-parallel training through NCCL follows the single-process curve of `train`.
//!
//! Set `NCCL_NVLS_ENABLE=0` in the environment of the run (as the device scripts do).
#![cfg(feature = "nccl")]

use std::sync::Arc;
use std::thread;

use candle_core::cuda_backend::cudarc::driver::CudaContext;
use candle_core::{Device, Tensor};
use lorasweep_engine::adapter::Variant;
use lorasweep_engine::parallel::{GradReducer, NcclReducer};
use lorasweep_engine::train::{self, TrainMetrics};

mod parallel_common;
use parallel_common::{adapter_values, examples, parameter_gaps, relative_gap, settings, PAD};

fn world() -> usize {
    let count = CudaContext::device_count().expect("the cuda driver answers");
    assert!(count > 0, "no cuda device is visible");
    count as usize
}

/// Runs `work(rank, reducer, device)` on one thread per visible GPU, each rank joined to one
/// NCCL group; returns the results in rank order.
fn on_every_gpu<T: Send + 'static>(
    work: impl Fn(usize, &NcclReducer, &Device) -> T + Send + Sync + 'static,
) -> Vec<T> {
    let world = world();
    let id = NcclReducer::new_unique_id().unwrap();
    assert_eq!(id.len(), NcclReducer::ID_BYTES);
    let work = Arc::new(work);
    let threads: Vec<_> = (0..world)
        .map(|rank| {
            let id = id.clone();
            let work = work.clone();
            thread::spawn(move || {
                let device = Device::new_cuda(rank).unwrap();
                let reducer = NcclReducer::new(rank, world, &id, &device).unwrap();
                work(rank, &reducer, &device)
            })
        })
        .collect();
    threads.into_iter().map(|t| t.join().unwrap()).collect()
}

#[test]
fn nccl_sums_and_broadcasts_across_every_visible_gpu() {
    let world = world();
    let results = on_every_gpu(|rank, reducer, device| {
        assert_eq!(reducer.rank(), rank);
        let mine =
            Tensor::from_vec(vec![rank as f32 + 1.0, 0.5, -2.0, 3.0], (2, 2), device).unwrap();
        let sum = reducer.all_reduce_sum(&mine).unwrap();
        assert_eq!(sum.dims(), &[2, 2]);
        assert!(sum.device().is_cuda());
        let mean = reducer.all_reduce_mean(&mine).unwrap();
        // A host tensor goes through the device and comes back.
        let host = reducer
            .all_reduce_sum(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap())
            .unwrap();
        assert!(host.device().is_cpu());
        let bytes = reducer
            .broadcast_bytes(if rank == 0 {
                b"start".to_vec()
            } else {
                Vec::new()
            })
            .unwrap();
        reducer.barrier().unwrap();
        (
            sum.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            mean.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            host.to_vec1::<f32>().unwrap(),
            bytes,
        )
    });
    let w = world as f32;
    for (sum, mean, host, bytes) in results {
        assert_eq!(sum, vec![w * (w + 1.0) / 2.0, 0.5 * w, -2.0 * w, 3.0 * w]);
        assert_eq!(mean, vec![(w + 1.0) / 2.0, 0.5, -2.0, 3.0]);
        assert_eq!(host, vec![w, 2.0 * w]);
        assert_eq!(bytes, b"start");
    }
    assert!(NcclReducer::new(0, 1, &[0u8; 3], &Device::Cpu).is_err());
}

#[test]
fn nccl_training_follows_the_single_process_curve() {
    let device = Device::new_cuda(0).unwrap();
    let (expected, expected_adapters) =
        parallel_common::train_alone(&parallel_common::model(Variant::Lora, &device));
    let runs: Vec<(TrainMetrics, Vec<f32>)> = on_every_gpu(|rank, reducer, device| {
        let model = parallel_common::model(Variant::Lora, device);
        let scratch = tempfile::tempdir().unwrap();
        let metrics = train::train_with(
            &model,
            &examples(),
            PAD,
            &settings(),
            scratch.path(),
            false,
            &mut |record| {
                if rank == 0 {
                    println!(
                        "step {} loss {:.6} grad_norm {:.6}",
                        record.step, record.loss, record.grad_norm
                    );
                }
            },
            Some(reducer as &dyn GradReducer),
        )
        .unwrap();
        (metrics, adapter_values(&model))
    });
    for (metrics, adapters) in &runs {
        let worst = metrics
            .steps
            .iter()
            .zip(&expected.steps)
            .map(|(ours, theirs)| relative_gap(ours.loss, theirs.loss))
            .fold(0f64, f64::max);
        let (largest, p99) = parameter_gaps(adapters, &expected_adapters);
        println!(
            "world {}: worst loss gap {worst:e}, adapter gap {largest:e} (p99 {p99:e})",
            runs.len()
        );
        assert!(worst < 1e-5);
        assert!(largest < 1e-3 && p99 < 1e-5);
        assert_eq!(adapters, &runs[0].1);
    }
}
