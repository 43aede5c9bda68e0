//! Frozen weights get no gradient: backward through a model with adapters stores gradients
//! for the adapters and activations only, never for a base weight, bias, norm or embedding,
//! and the layers below the shallowest adapter cost no backward work at all.

mod common;

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor};
use common::{attach, module, synthetic_examples, tiny_model, tiny_model_and_tensors, TinySpec};
use lorasweep_engine::adapter::Variant;
use lorasweep_engine::data::collate;
use lorasweep_engine::model::{ModuleId, Transformer};

/// The response-only loss of a fixed batch, backpropagated, as a training step does it.
fn backward(model: &Transformer) -> GradStore {
    let examples = synthetic_examples(3, 5, 4, model.config().vocab_size, 11);
    let batch = collate(&examples, 0);
    let shape = (batch.batch, batch.seq_len);
    let ids = Tensor::from_slice(&batch.ids, shape, &Device::Cpu).unwrap();
    let targets = Tensor::from_slice(&batch.targets, shape, &Device::Cpu).unwrap();
    let weights = Tensor::from_slice(&batch.weights, shape, &Device::Cpu).unwrap();
    model
        .loss(&ids, &targets, &weights)
        .unwrap()
        .backward()
        .unwrap()
}

/// Moves every B off zero so that A has a gradient too.
fn perturb_b(model: &Transformer) {
    for (_, adapter) in model.adapters() {
        let shape = adapter.b().as_tensor().shape().clone();
        adapter
            .b()
            .set(&Tensor::randn(0f32, 0.1, shape, &Device::Cpu).unwrap())
            .unwrap();
    }
}

/// Sizes of every gradient the store holds.
fn grad_sizes(grads: &GradStore) -> Vec<usize> {
    grads
        .get_ids()
        .map(|&id| grads.get_id(id).unwrap().elem_count())
        .collect()
}

#[test]
fn candle_computes_a_weight_gradient_for_a_plain_matmul() {
    // The control for the tests below: with a plain matmul, a weight that is no Var still gets
    // a full weight-sized gradient computed and stored (under the id of its transposed view);
    // with the frozen-linear op it gets none.
    let x = candle_core::Var::randn(0f32, 1.0, (3, 5), &Device::Cpu).unwrap();
    let w = Tensor::randn(0f32, 1.0, (4, 5), &Device::Cpu).unwrap();
    let plain = x.as_tensor().matmul(&w.t().unwrap()).unwrap();
    let grads = plain.sum_all().unwrap().backward().unwrap();
    assert!(grad_sizes(&grads).contains(&20));
    let frozen = lorasweep_engine::ops::frozen_linear(x.as_tensor(), &w).unwrap();
    let grads = frozen.sum_all().unwrap().backward().unwrap();
    assert!(
        !grad_sizes(&grads).contains(&20),
        "{:?}",
        grad_sizes(&grads)
    );
    assert!(grads.get(&w).is_none());
}

#[test]
fn base_weights_never_appear_in_the_gradient_store() {
    for arch in ["llama", "qwen2"] {
        for variant in [Variant::Lora, Variant::Dora, Variant::Pissa] {
            let spec = TinySpec::new(arch, 5);
            let (mut model, base) = tiny_model_and_tensors(&spec);
            let all = model.config().all_modules();
            attach(
                &mut model,
                &all,
                &common::adapter_settings(variant, 4, 8.0, 1),
            );
            perturb_b(&model);
            let grads = backward(&model);
            for (name, tensor) in &base {
                assert!(
                    grads.get(tensor).is_none(),
                    "{arch}/{variant:?}: frozen {name} got a gradient"
                );
            }
            // No gradient anywhere in the store has the size of a frozen matrix (the batch is
            // 3 × 10 positions, so no activation gradient has such a size either).
            let config = model.config();
            let mut frozen_sizes: Vec<usize> = all
                .iter()
                .map(|m| {
                    let (d_in, d_out) = config.module_dims(m.kind);
                    d_in * d_out
                })
                .collect();
            frozen_sizes.push(config.vocab_size * config.hidden_size);
            for size in grad_sizes(&grads) {
                assert!(
                    !frozen_sizes.contains(&size),
                    "{arch}/{variant:?}: a weight-sized gradient ({size} elements) was computed"
                );
            }
            // PiSSA replaced the frozen weights with residuals: those are frozen too.
            for &m in &all {
                let weight = model.projection(m).weight();
                assert!(
                    grads.get(weight).is_none(),
                    "{arch}/{variant:?}: frozen weight of {m} got a gradient"
                );
            }
            for (m, adapter) in model.adapters() {
                for (group, var) in adapter.parameters() {
                    let grad = grads.get(var.as_tensor()).unwrap_or_else(|| {
                        panic!("{arch}/{variant:?}: {m} {group:?} has no gradient")
                    });
                    let energy = grad
                        .sqr()
                        .unwrap()
                        .sum_all()
                        .unwrap()
                        .to_scalar::<f32>()
                        .unwrap();
                    assert!(
                        energy > 0.0,
                        "{arch}/{variant:?}: {m} {group:?} gradient is zero"
                    );
                }
            }
        }
    }
}

/// How many tensors the backward pass stored a gradient for, and their total size.
fn grad_work(layers: usize, adapter_at: ModuleId) -> (usize, usize) {
    let spec = TinySpec {
        layers,
        ..TinySpec::new("llama", 5)
    };
    let mut model = tiny_model(&spec);
    attach(
        &mut model,
        &[adapter_at],
        &common::adapter_settings(Variant::Lora, 4, 8.0, 1),
    );
    perturb_b(&model);
    let grads = backward(&model);
    let ids: Vec<_> = grads.get_ids().copied().collect();
    let elements = ids
        .iter()
        .map(|&id| grads.get_id(id).unwrap().elem_count())
        .sum();
    (ids.len(), elements)
}

#[test]
fn layers_below_the_adapter_cost_no_backward() {
    // The same single adapter on the top layer's down_proj: stacking more frozen layers under
    // it must not add one gradient to the store.
    let two = grad_work(2, module("layers.1.mlp.down_proj"));
    let four = grad_work(4, module("layers.3.mlp.down_proj"));
    assert_eq!(
        two, four,
        "frozen layers below the adapter were differentiated"
    );
    // Moving the adapter down makes the layers above it part of the backward pass.
    let deep = grad_work(4, module("layers.0.mlp.down_proj"));
    assert!(
        deep.0 > four.0 && deep.1 > four.1,
        "an adapter at layer 0 must backpropagate through the layers above it: {deep:?} vs {four:?}"
    );
    // And the work grows with the number of layers above the adapter, not below it.
    let deep_two = grad_work(2, module("layers.0.mlp.down_proj"));
    assert!(deep.0 > deep_two.0, "{deep:?} vs {deep_two:?}");
}
