//! The placement rules besides PAGE agree with an independent computation on a tiny model:
//! `grad` and `grad-rank` with the weight gradient from candle's dense autograd (each frozen
//! weight made a variable and multiplied by the generic matmul, which computes its gradient)
//! and nalgebra's SVD of it; `act` with the inputs the capturing adapters record and the
//! weights' norms; `kappa` with nalgebra's SVD of every weight; and every rule writes the same
//! probe file as PAGE.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::{synthetic_examples, tiny_model, TinySpec};
use lorasweep_engine::adapter::{AInit, Adapter};
use lorasweep_engine::data::{collate, Collated};
use lorasweep_engine::jobs::{self, DataSource};
use lorasweep_engine::model::Transformer;
use lorasweep_engine::probe::{Estimator, ProbeSettings};
use lorasweep_engine::rules::{self, kappa, Rule};
use nalgebra::DMatrix;

fn settings(rule: Rule, rank: usize) -> ProbeSettings {
    ProbeSettings {
        batches: 1,
        batch_size: 4,
        max_len: 64,
        rank,
        alpha: 2.0 * rank as f64,
        estimator: Estimator::Sample,
        a_init: AInit::Kaiming,
        seed: 3,
        rule,
    }
}

fn tensors(batch: &Collated) -> (Tensor, Tensor, Tensor) {
    let shape = (batch.batch, batch.seq_len);
    (
        Tensor::from_slice(&batch.ids, shape, &Device::Cpu).unwrap(),
        Tensor::from_slice(&batch.targets, shape, &Device::Cpu).unwrap(),
        Tensor::from_slice(&batch.weights, shape, &Device::Cpu).unwrap(),
    )
}

fn host(matrix: &Tensor) -> DMatrix<f64> {
    let (rows, columns) = matrix.dims2().unwrap();
    let values = matrix
        .to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    DMatrix::from_row_slice(rows, columns, &values)
}

/// Squared singular values of a matrix, largest first, by nalgebra's SVD.
fn squared_singular_values(matrix: &DMatrix<f64>) -> Vec<f64> {
    let mut values: Vec<f64> = matrix.singular_values().iter().map(|s| s * s).collect();
    values.sort_by(|a, b| b.total_cmp(a));
    values
}

/// ∂L/∂W of every module by dense autograd: each weight becomes a variable (attached as the
/// "residual" base of an adapter whose B is zero) and every projection runs candle's generic
/// matmul, whose backward computes the weight's gradient.
fn dense_weight_gradients(spec: &TinySpec, batch: &Collated) -> Vec<DMatrix<f64>> {
    let mut model = tiny_model(spec);
    let modules = model.config().all_modules();
    let settings = common::adapter_settings(lorasweep_engine::adapter::Variant::Lora, 1, 1.0, 0);
    let mut variables = Vec::new();
    for &module in &modules {
        let weight = model.projection(module).weight().clone();
        let variable = Var::from_tensor(&weight).unwrap();
        let (adapter, _) = Adapter::init(module, &weight, 1, &settings).unwrap();
        model
            .projection_mut(module)
            .attach(adapter, Some(variable.as_tensor().clone()));
        variables.push(variable);
    }
    let (ids, targets, weights) = tensors(batch);
    lorasweep_engine::ops::use_generic_matmul(true);
    let grads = model
        .loss(&ids, &targets, &weights)
        .and_then(|loss| loss.backward());
    lorasweep_engine::ops::use_generic_matmul(false);
    let grads = grads.unwrap();
    variables
        .iter()
        .map(|variable| host(grads.get(variable.as_tensor()).expect("a weight gradient")))
        .collect()
}

fn rule_scores(spec: &TinySpec, batch: &Collated, settings: &ProbeSettings) -> rules::RuleBatch {
    let mut model = tiny_model(spec);
    let prepared = rules::prepare(&mut model, settings).unwrap();
    prepared.score_batch(&model, batch, settings, 0).unwrap()
}

fn assert_close(got: f64, expected: f64, tolerance: f64, what: &str) {
    assert!(
        (got - expected).abs() <= tolerance * expected.abs().max(1e-12),
        "{what}: {got} vs {expected}"
    );
}

#[test]
fn grad_is_the_energy_of_the_dense_weight_gradient() {
    for arch in ["llama", "qwen2"] {
        let spec = TinySpec::new(arch, 21);
        let batch = collate(&synthetic_examples(4, 4, 6, spec.vocab, 5), 0);
        let dense = dense_weight_gradients(&spec, &batch);
        let scored = rule_scores(&spec, &batch, &settings(Rule::Grad, 4));
        assert_eq!(scored.scores.len(), 14);
        assert!(scored.tokens > 0 && scored.energies.is_none());
        for (index, (score, gradient)) in scored.scores.iter().zip(&dense).enumerate() {
            let energy = gradient.norm_squared();
            assert!(energy > 0.0, "{arch}: module {index} has no gradient");
            assert_close(*score, energy, 1e-4, &format!("{arch} module {index}"));
        }
    }
}

#[test]
fn grad_rank_is_the_top_r_energy_of_the_dense_weight_gradient() {
    let spec = TinySpec::new("llama", 22);
    let batch = collate(&synthetic_examples(4, 4, 6, spec.vocab, 6), 0);
    let dense = dense_weight_gradients(&spec, &batch);
    let rank = 3;
    let scored = rule_scores(&spec, &batch, &settings(Rule::GradRank, rank));
    let energies = scored
        .energies
        .clone()
        .expect("grad-rank keeps the energies");
    let shares = rules::top_r_shares(std::slice::from_ref(&scored)).unwrap();
    for (index, gradient) in dense.iter().enumerate() {
        let values = squared_singular_values(gradient);
        let total: f64 = values.iter().sum();
        let top: f64 = values.iter().take(rank).sum();
        assert_close(energies[index], total, 1e-4, &format!("energy {index}"));
        assert_close(scored.scores[index], top, 1e-4, &format!("top-r {index}"));
        assert_close(shares[index], top / total, 1e-4, &format!("share {index}"));
        assert!(
            shares[index] < 1.0,
            "rank {rank} holds all of module {index}"
        );
    }
}

#[test]
fn act_is_the_mean_squared_input_norm_times_the_weight_energy() {
    let spec = TinySpec::new("qwen2", 23);
    let batch = collate(&synthetic_examples(3, 5, 4, spec.vocab, 7), 0);
    let scored = rule_scores(&spec, &batch, &settings(Rule::Act, 4));
    // The inputs as the capturing adapters of the gradient rules record them.
    let mut model = tiny_model(&spec);
    rules::prepare(&mut model, &settings(Rule::Grad, 4)).unwrap();
    let (ids, targets, weights) = tensors(&batch);
    let loss = model.loss(&ids, &targets, &weights).unwrap();
    let mask = batch.weights.clone();
    let tokens = mask.iter().filter(|w| **w > 0.0).count() as f64;
    assert_eq!(scored.tokens as f64, tokens);
    for (index, module) in model.config().all_modules().into_iter().enumerate() {
        let projection = model.projection(module);
        let input = projection.adapter().unwrap().take_captured().unwrap().input;
        let d_in = input.dim(2).unwrap();
        let rows = input.reshape(((), d_in)).unwrap().to_vec2::<f32>().unwrap();
        let mean: f64 = rows
            .iter()
            .zip(&mask)
            .map(|(row, w)| f64::from(*w) * row.iter().map(|v| f64::from(*v).powi(2)).sum::<f64>())
            .sum::<f64>()
            / tokens;
        let weight_energy = host(projection.weight()).norm_squared();
        assert_close(
            scored.scores[index],
            mean * weight_energy,
            1e-5,
            &format!("{module}"),
        );
    }
    // Observing changes nothing: the loss is the plain model's.
    let plain = tiny_model(&spec).loss(&ids, &targets, &weights).unwrap();
    let (a, b) = (
        loss.to_scalar::<f32>().unwrap(),
        plain.to_scalar::<f32>().unwrap(),
    );
    assert!((a - b).abs() < 1e-6, "{a} vs {b}");
}

#[test]
fn kappa_is_the_inverse_condition_number_of_a_full_svd_and_is_cached() {
    let spec = TinySpec::new("llama", 24);
    let model: Transformer = tiny_model(&spec);
    let cache = tempfile::tempdir().unwrap();
    let scores = rules::data_free_scores(
        &model,
        &settings(Rule::Kappa, 4),
        "digest-24",
        Some(cache.path()),
    )
    .unwrap();
    for (index, module) in model.config().all_modules().into_iter().enumerate() {
        let weight = host(model.projection(module).weight());
        let values = weight.singular_values();
        let largest = values.iter().copied().fold(0.0, f64::max);
        let smallest = values.iter().copied().fold(f64::INFINITY, f64::min);
        assert_eq!(values.len(), weight.nrows().min(weight.ncols()));
        assert_close(
            scores[index],
            smallest / largest,
            1e-6,
            &format!("{module}"),
        );
        assert!(scores[index] > 0.0 && scores[index] <= 1.0);
    }
    // A known spectrum: diag(4, 2, 0.5) between rotations has κ = 8.
    let rotation = |angle: f64| {
        let (s, c) = angle.sin_cos();
        DMatrix::from_row_slice(3, 3, &[c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0])
    };
    let matrix = rotation(0.3)
        * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(vec![4.0, 2.0, 0.5]))
        * rotation(1.1).transpose();
    let values: Vec<f32> = matrix.transpose().iter().map(|v| *v as f32).collect();
    let extremes =
        kappa::extremes(&Tensor::from_vec(values, (3, 3), &Device::Cpu).unwrap()).unwrap();
    assert_close(extremes.sigma_max, 4.0, 1e-6, "σ_max");
    assert_close(extremes.sigma_min, 0.5, 1e-6, "σ_min");
    assert_close(extremes.inverse_condition(), 1.0 / 8.0, 1e-6, "1/κ");
    // The second probe of the same model reads the cache: a tampered file shows it.
    let files: Vec<_> = std::fs::read_dir(cache.path()).unwrap().collect();
    assert_eq!(files.len(), 1, "one cache file per model");
    let path = files[0].as_ref().unwrap().path();
    let mut cached: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cached["extremes"][0]["sigma_min"] = serde_json::json!(0.0);
    std::fs::write(&path, cached.to_string()).unwrap();
    let again = rules::data_free_scores(
        &model,
        &settings(Rule::Kappa, 4),
        "digest-24",
        Some(cache.path()),
    )
    .unwrap();
    assert_eq!(again[0], 0.0);
    assert_eq!(&again[1..], &scores[1..]);
}

#[test]
fn random_scores_are_seeded_draws() {
    let spec = TinySpec::new("llama", 25);
    let model = tiny_model(&spec);
    let draw = |seed: u64| {
        let settings = ProbeSettings {
            seed,
            ..settings(Rule::Random, 4)
        };
        rules::data_free_scores(&model, &settings, "", None).unwrap()
    };
    let first = draw(1);
    assert_eq!(first, draw(1));
    assert_ne!(first, draw(2));
    assert!(first.iter().all(|v| *v > 0.0 && *v <= 1.0));
}

#[test]
fn every_rule_writes_the_probe_file_of_page() {
    let dir = tempfile::tempdir().unwrap();
    let spec = common::files::hf_spec("llama", 2);
    common::files::write_hf_dir(dir.path(), &spec);
    let data = DataSource::Jsonl(common::fixture("engine/chat.jsonl"));
    let model = dir.path().to_str().unwrap();
    let names = |result: &lorasweep_engine::probe::ProbeResult| -> Vec<String> {
        result.modules.iter().map(|m| m.name.clone()).collect()
    };
    let page = jobs::probe(
        model,
        &data,
        &ProbeSettings {
            batches: 2,
            batch_size: 2,
            ..settings(Rule::Page, 4)
        },
        &Device::Cpu,
    )
    .unwrap();
    let page_json = serde_json::to_value(&page).unwrap();
    assert!(page_json["settings"].get("rule").is_none(), "{page_json}");
    assert!(page_json["modules"][0].get("top_r_share").is_none());
    for rule in [
        Rule::Grad,
        Rule::GradRank,
        Rule::Act,
        Rule::Kappa,
        Rule::Random,
    ] {
        let s = ProbeSettings {
            batches: 2,
            batch_size: 2,
            ..settings(rule, 4)
        };
        let result = jobs::probe(model, &data, &s, &Device::Cpu).unwrap();
        let json = serde_json::to_value(&result).unwrap();
        assert_eq!(json["settings"]["rule"], rule.name());
        assert_eq!(names(&result), names(&page), "{rule}");
        let total: f64 = result.modules.iter().map(|m| m.share).sum();
        assert!((total - 1.0).abs() < 1e-9, "{rule}: shares sum to {total}");
        let best = &result.ranking()[0];
        assert_eq!(result.dominant, best.name(), "{rule}");
        assert!(result.modules.iter().all(|m| m.score >= 0.0), "{rule}");
        assert_eq!(
            result.modules[0].top_r_share.is_some(),
            rule == Rule::GradRank,
            "{rule}"
        );
        if rule.reads_data() {
            assert_eq!(result.batch_argmax.len(), 2, "{rule}");
            assert!(result.tokens > 0, "{rule}");
            assert_eq!(result.data_digest, page.data_digest, "{rule}");
        } else {
            assert_eq!(result.data, jobs::NO_DATA, "{rule}");
            assert_eq!(result.tokens, 0, "{rule}");
        }
        let back: lorasweep_engine::probe::ProbeResult = serde_json::from_value(json).unwrap();
        assert_eq!(back.settings.rule, rule);
    }
}
