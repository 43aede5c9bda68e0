//! Memory stays flat across batches (issue 15, requirement 7): eight probe batches and eight
//! training steps on the SmolLM2-135M geometry (random weights, f32, the CPU), each batch
//! split into two passes as the CPU splits a batch of 8 × 512; the process's peak resident
//! memory during the last batch is within 10% of its peak during the first.
//!
//! Resident memory is per process, so this file holds one test: nothing else runs beside it.
//! The batches are 2 × 64 tokens (passes of 64) so that the test takes seconds on two cores;
//! what a batch keeps alive by mistake (its activations, the probe's full weight gradients,
//! an autograd graph) is tens to hundreds of MB a batch at this size, over the 10% margin
//! after eight batches.

use candle_core::{DType, Device};
use lorasweep_engine::adapter::{AInit, Adapter, AdapterSettings, Variant};
use lorasweep_engine::bench;
use lorasweep_engine::data::{collate, Example};
use lorasweep_engine::memory::PeakRss;
use lorasweep_engine::model::{ModuleId, Transformer};
use lorasweep_engine::probe::{self, Estimator, ProbeSettings};
use lorasweep_engine::rules::Rule;
use lorasweep_engine::train::{self, TrainSettings};
use rand::{Rng, SeedableRng};

const BATCHES: usize = 8;
const ROWS: usize = 2;
/// Tokens of an example: a sequence of 64 after the shift.
const TOKENS: usize = 65;
const PAD: u32 = 0;

/// SmolLM2-135M's geometry with random weights, on the path training and the probe take on
/// the CPU (fused ops, hand-written backward), a batch of two rows run as two passes.
fn smollm2() -> Transformer {
    let config = bench::geometry("smollm2-135m").expect("the smollm2 geometry");
    let mut model =
        bench::random_model(&config, DType::F32, &Device::Cpu, 7).expect("a random model");
    model.set_fused_kernels(lorasweep_engine::fused::on_for_training());
    model.set_tokens_per_pass(Some(TOKENS - 1));
    model
}

/// Random conversations: a 16-token prompt, then the response.
fn examples(count: usize, vocab: usize, seed: u64) -> Vec<Example> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| Example {
            tokens: (0..TOKENS)
                .map(|_| rng.random_range(1..vocab as u32))
                .collect(),
            response: (0..TOKENS).map(|t| t >= 16).collect(),
        })
        .collect()
}

/// The peak of each batch's window, in bytes.
fn readings(peaks: Vec<Option<u64>>, what: &str) -> Vec<u64> {
    assert_eq!(peaks.len(), BATCHES, "{what}: one reading per batch");
    peaks
        .into_iter()
        .map(|peak| peak.unwrap_or_else(|| panic!("{what}: resident memory is not measurable")))
        .collect()
}

fn assert_flat(peaks: &[u64], what: &str) {
    let mib: Vec<u64> = peaks.iter().map(|bytes| bytes >> 20).collect();
    eprintln!("{what}: peak resident memory per batch, MiB: {mib:?}");
    let (first, last) = (peaks[0] as f64, peaks[BATCHES - 1] as f64);
    assert!(
        last <= 1.10 * first,
        "{what}: the last batch peaks at {} MiB, over 10% above the first ({} MiB): {mib:?}",
        mib[BATCHES - 1],
        mib[0]
    );
}

#[test]
fn probe_and_training_memory_is_flat_across_batches() {
    // The probe, `expected` estimator: every module's full weight gradient is formed, summed
    // over the batch's passes, and must be let go with the batch.
    let mut model = smollm2();
    let vocab = model.config().vocab_size;
    let settings = ProbeSettings {
        batches: BATCHES,
        batch_size: ROWS,
        max_len: TOKENS,
        rank: 16,
        alpha: 32.0,
        estimator: Estimator::Expected,
        a_init: AInit::Kaiming,
        seed: 0,
        rule: Rule::Page,
    };
    probe::attach_probe_adapters(&mut model, &settings).expect("probe adapters");
    let data = examples(BATCHES * ROWS, vocab, 1);
    let batches: Vec<_> = data.chunks(ROWS).map(|rows| collate(rows, PAD)).collect();
    assert_eq!(
        model
            .row_passes(
                &candle_core::Tensor::ones((ROWS, TOKENS - 1), DType::F32, &Device::Cpu).unwrap()
            )
            .unwrap()
            .len(),
        ROWS,
        "a batch runs in several passes"
    );
    let mut window = PeakRss::start();
    let mut peaks = Vec::new();
    probe::score_batches(&model, &batches, &settings, &mut |_| {
        peaks.push(window.restart())
    })
    .expect("the probe");
    assert_flat(&readings(peaks, "probe"), "probe");
    drop(model);

    // Training: the README's placement, two down_proj adapters.
    let mut model = smollm2();
    let adapter_settings = AdapterSettings {
        variant: Variant::Lora,
        rank: 8,
        alpha: 16.0,
        a_init: AInit::Kaiming,
        seed: 0,
    };
    for name in ["layers.3.mlp.down_proj", "layers.11.mlp.down_proj"] {
        let module = ModuleId::parse(name).expect("a module");
        let weight = model.projection(module).weight().clone();
        let (adapter, residual) =
            Adapter::init(module, &weight, 8, &adapter_settings).expect("an adapter");
        model.projection_mut(module).attach(adapter, residual);
    }
    assert!(model.hand_backward());
    let settings = TrainSettings {
        steps: BATCHES,
        batch_size: ROWS,
        max_len: TOKENS,
        lr: 1e-3,
        ..TrainSettings::default()
    };
    let data = examples(BATCHES * ROWS, vocab, 2);
    let out = tempfile::tempdir().expect("a temporary directory");
    let mut window = PeakRss::start();
    let mut peaks = Vec::new();
    train::train(
        &model,
        &data,
        PAD,
        &settings,
        out.path(),
        false,
        &mut |_| peaks.push(window.restart()),
    )
    .expect("training");
    assert_flat(&readings(peaks, "training"), "training");
}
