//! The in-process reducer: sums in rank order, broadcasts, sharding, and a group that fails
//! as a whole (dropped rank, aborted rank, mismatched buffers, timeout) instead of hanging.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use lorasweep_engine::parallel::{shard_rows, GradReducer, ReduceError, ThreadReducer};

/// Longest a test waits for a rank before calling it hung.
const HANG: Duration = Duration::from_secs(20);

/// Runs `work` on every rank of `handles` in its own thread; returns each rank's result, in
/// rank order, failing the test if one does not come back within [`HANG`].
fn run_ranks<T: Send + 'static>(
    handles: Vec<ThreadReducer>,
    work: impl Fn(&ThreadReducer) -> T + Send + Sync + Clone + 'static,
) -> Vec<T> {
    let world = handles.len();
    let (sender, receiver) = mpsc::channel();
    for handle in handles {
        let sender = sender.clone();
        let work = work.clone();
        thread::spawn(move || {
            let result = work(&handle);
            let rank = handle.rank();
            drop(handle);
            let _ = sender.send((rank, result));
        });
    }
    let mut results: Vec<Option<T>> = (0..world).map(|_| None).collect();
    for _ in 0..world {
        let (rank, result) = receiver
            .recv_timeout(HANG)
            .expect("a rank hung instead of returning");
        results[rank] = Some(result);
    }
    results.into_iter().map(Option::unwrap).collect()
}

fn tensor(values: &[f32]) -> Tensor {
    Tensor::from_slice(values, values.len(), &Device::Cpu).unwrap()
}

#[test]
fn sums_are_taken_in_rank_order_whatever_the_arrival_order() {
    // In f32, (1e8 + 1) - 1e8 = 0 but (1e8 - 1e8) + 1 = 1: the order of the sum shows.
    let contributions = [1e8f32, 1.0, -1e8];
    let results = run_ranks(ThreadReducer::group(3), move |reducer| {
        // Arrive in reverse rank order.
        thread::sleep(Duration::from_millis(60 * (2 - reducer.rank()) as u64));
        let mine = tensor(&[contributions[reducer.rank()], reducer.rank() as f32]);
        reducer
            .all_reduce_sum(&mine)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    });
    for result in results {
        assert_eq!(result, vec![0.0, 3.0]);
    }
}

#[test]
fn mean_keeps_shape_and_many_rounds_stay_in_step() {
    let results = run_ranks(ThreadReducer::group(4), |reducer| {
        let mut seen = Vec::new();
        for round in 0..50 {
            let value = (reducer.rank() * 100 + round) as f32;
            let mine = Tensor::from_vec(vec![value; 6], (2, 3), &Device::Cpu).unwrap();
            let mean = reducer.all_reduce_mean(&mine).unwrap();
            assert_eq!(mean.dims(), &[2, 3]);
            seen.push(mean.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]);
        }
        seen
    });
    let expected: Vec<f32> = (0..50).map(|round| 150.0 + round as f32).collect();
    for result in results {
        assert_eq!(result, expected);
    }
}

#[test]
fn broadcasts_carry_rank_zero_values_exactly() {
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 + i / 3) as u8).collect();
    let expected = payload.clone();
    let results = run_ranks(ThreadReducer::group(3), move |reducer| {
        let bytes = if reducer.rank() == 0 {
            payload.clone()
        } else {
            b"ignored".to_vec()
        };
        let bytes = reducer.broadcast_bytes(bytes).unwrap();
        let mine = tensor(&[reducer.rank() as f32 + 0.1, -0.0, f32::MAX]);
        let values = reducer
            .broadcast_tensor(&mine)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        reducer.barrier().unwrap();
        (bytes, values)
    });
    for (bytes, values) in results {
        assert_eq!(bytes, expected);
        assert_eq!(values, vec![0.1, 0.0, f32::MAX]);
    }
}

#[test]
fn a_single_rank_group_returns_its_own_values() {
    let group = ThreadReducer::group(1);
    let mine = tensor(&[1.5, -2.0]);
    assert_eq!(
        group[0]
            .all_reduce_mean(&mine)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap(),
        vec![1.5, -2.0]
    );
    assert_eq!(group[0].broadcast_bytes(b"abc".to_vec()).unwrap(), b"abc");
}

#[test]
fn a_dropped_rank_fails_the_others_instead_of_hanging() {
    let started = Instant::now();
    let results = run_ranks(ThreadReducer::group(3), |reducer| {
        for round in 0..5 {
            if reducer.rank() == 1 && round == 2 {
                // Returning drops the handle, as a crashed rank's thread would.
                return Err(round);
            }
            if let Err(error) = reducer.all_reduce_sum(&tensor(&[1.0])) {
                return Ok(error.to_string());
            }
        }
        Ok("finished".to_string())
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(results[1], Err(2));
    for rank in [0, 2] {
        let message = results[rank].clone().unwrap();
        assert!(message.contains("rank 1 left the group"), "{message}");
    }
}

#[test]
fn an_aborted_rank_fails_the_others_with_its_reason() {
    let results = run_ranks(ThreadReducer::group(2), |reducer| {
        reducer.all_reduce_sum(&tensor(&[1.0])).unwrap();
        if reducer.rank() == 0 {
            reducer.abort("disk full");
            // Its own later collectives fail too.
        }
        reducer.all_reduce_sum(&tensor(&[1.0])).unwrap_err()
    });
    for error in results {
        assert!(matches!(error, ReduceError::GroupFailed(_)), "{error}");
        assert!(
            error.to_string().contains("rank 0 failed: disk full"),
            "{error}"
        );
    }
}

#[test]
fn buffers_of_different_lengths_fail_every_rank() {
    let results = run_ranks(ThreadReducer::group(3), |reducer| {
        let values = vec![1.0f32; 4 + usize::from(reducer.rank() == 2)];
        reducer.all_reduce_sum(&tensor(&values)).unwrap_err()
    });
    for error in &results {
        let text = error.to_string();
        assert!(
            text.contains("gave 5 values") || text.contains("gave 4 values"),
            "{text}"
        );
    }
}

#[test]
fn a_stalled_rank_times_out_the_group() {
    let started = Instant::now();
    let results = run_ranks(
        ThreadReducer::group_with_timeout(3, Duration::from_millis(300)),
        move |reducer| {
            reducer.all_reduce_sum(&tensor(&[1.0])).unwrap();
            if reducer.rank() == 2 {
                thread::sleep(Duration::from_secs(3));
            }
            let error = reducer.all_reduce_sum(&tensor(&[1.0])).unwrap_err();
            (error, started.elapsed())
        },
    );
    for (rank, (error, elapsed)) in results.iter().enumerate() {
        if rank == 2 {
            assert!(matches!(error, ReduceError::GroupFailed(_)), "{error}");
        } else {
            assert!(*elapsed < Duration::from_millis(2500), "{elapsed:?}");
        }
        assert!(error.to_string().contains("for ranks [2]"), "{error}");
    }
}

#[test]
fn shards_are_disjoint_and_cover_the_batch() {
    for batch in 0..13 {
        for world in 1..6 {
            let mut seen = vec![0; batch];
            for rank in 0..world {
                let rows = shard_rows(batch, rank, world);
                assert!(rows.windows(2).all(|w| w[0] < w[1]));
                assert!(rows.iter().all(|&row| row % world == rank));
                for row in rows {
                    seen[row] += 1;
                }
            }
            assert!(seen.iter().all(|&count| count == 1), "{batch} {world}");
        }
    }
    assert_eq!(shard_rows(7, 1, 3), vec![1, 4]);
}
