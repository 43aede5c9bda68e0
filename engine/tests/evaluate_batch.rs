//! Batched generation: a left-padded batch decodes every row exactly as the row would alone
//! (hidden states, greedy tokens, sampled tokens, stop strings, lengths), on a tiny random
//! model and, when `LORASWEEP_SMOLLM2_GGUF` is set, on the real SmolLM2-135M.

mod evaluate_common;

use std::time::Instant;

use candle_core::{Device, Tensor};
use evaluate_common::{smollm2, tiny_model, tiny_model_with_positions};
use lorasweep_engine::data::{Message, Role};
use lorasweep_engine::generate::{self, GenerateError, GenerationSettings};
use lorasweep_engine::loader::LoadedModel;
use lorasweep_engine::model::KvCache;

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Token ids of a few texts of different lengths.
fn prompts(model: &LoadedModel, texts: &[&str]) -> Vec<Vec<u32>> {
    texts
        .iter()
        .map(|text| model.tokenizer.encode(text).unwrap())
        .collect()
}

const TEXTS: [&str; 4] = [
    "hello world",
    "hi",
    "hello hello world, 12 worlds say hi to the world",
    "'S 12",
];

#[test]
fn padded_rows_have_the_hidden_states_of_lone_rows() {
    let model = tiny_model(7);
    let transformer = &model.transformer;
    let rows = prompts(&model, &TEXTS);
    let longest = rows.iter().map(Vec::len).max().unwrap();
    let pad_id = model.tokenizer.pad_token_id();
    let mut ids = Vec::new();
    let mut padding = Vec::new();
    for row in &rows {
        padding.push(longest - row.len());
        ids.extend(std::iter::repeat_n(pad_id, longest - row.len()));
        ids.extend_from_slice(row);
    }
    let input = Tensor::from_vec(ids, (rows.len(), longest), &Device::Cpu).unwrap();
    let mut batch_cache = KvCache::new();
    let batched = transformer
        .hidden_states_padded(&input, 0, Some(&mut batch_cache), Some(&padding))
        .unwrap();
    // One more step with the cache: token 5 at each row's next position.
    let step = Tensor::from_vec(vec![5u32; rows.len()], (rows.len(), 1), &Device::Cpu).unwrap();
    let batched_step = transformer
        .hidden_states_padded(&step, longest, Some(&mut batch_cache), Some(&padding))
        .unwrap();
    for (index, row) in rows.iter().enumerate() {
        let alone = Tensor::from_slice(row, (1, row.len()), &Device::Cpu).unwrap();
        let mut cache = KvCache::new();
        let expected = transformer
            .hidden_states(&alone, 0, Some(&mut cache))
            .unwrap();
        let got = batched
            .narrow(0, index, 1)
            .unwrap()
            .narrow(1, padding[index], row.len())
            .unwrap();
        let diff = max_abs_diff(&got, &expected);
        assert!(diff < 1e-4, "row {index}: prefill differs by {diff}");
        let step_alone = Tensor::from_slice(&[5u32], (1, 1), &Device::Cpu).unwrap();
        let expected_step = transformer
            .hidden_states(&step_alone, row.len(), Some(&mut cache))
            .unwrap();
        let diff = max_abs_diff(&batched_step.narrow(0, index, 1).unwrap(), &expected_step);
        assert!(diff < 1e-4, "row {index}: cached step differs by {diff}");
    }
}

#[test]
fn padding_must_match_the_batch() {
    let model = tiny_model(7);
    let input = Tensor::from_vec(vec![5u32, 6, 7, 8], (2, 2), &Device::Cpu).unwrap();
    let error = model
        .transformer
        .hidden_states_padded(&input, 0, None, Some(&[0]))
        .unwrap_err();
    assert!(error.to_string().contains("1 rows"), "{error}");
}

fn settings(max_new_tokens: usize) -> GenerationSettings {
    GenerationSettings {
        max_new_tokens,
        ..GenerationSettings::default()
    }
}

fn assert_batch_matches_alone(
    model: &LoadedModel,
    rows: &[Vec<u32>],
    settings: &GenerationSettings,
) {
    let batched =
        generate::complete_batch(&model.transformer, &model.tokenizer, rows, settings).unwrap();
    assert_eq!(batched.len(), rows.len());
    for (index, (row, got)) in rows.iter().zip(&batched).enumerate() {
        let alone =
            generate::complete(&model.transformer, &model.tokenizer, row, settings).unwrap();
        assert_eq!(got.tokens, alone.tokens, "row {index}: tokens differ");
        assert_eq!(got.text, alone.text, "row {index}: text differs");
        assert_eq!(got.finish, alone.finish, "row {index}: finish differs");
        assert_eq!(got.prompt_tokens, row.len());
    }
}

#[test]
fn greedy_batch_equals_each_prompt_alone() {
    for seed in [1, 2, 3] {
        let model = tiny_model(seed);
        let rows = prompts(&model, &TEXTS);
        let batched =
            generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &settings(24))
                .unwrap();
        // Not vacuous: some row must run long enough for padding and row removal to matter.
        assert!(
            batched.iter().any(|g| g.tokens.len() >= 8),
            "seed {seed}: every row stopped early: {:?}",
            batched.iter().map(|g| g.tokens.len()).collect::<Vec<_>>()
        );
        assert_batch_matches_alone(&model, &rows, &settings(24));
    }
}

#[test]
fn rows_stop_on_their_own_stop_strings_and_lengths() {
    let model = tiny_model(2);
    let rows = prompts(&model, &TEXTS);
    // Take a stop string from the middle of one row's free output, so at least that row
    // stops on it while the others continue.
    let free = generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &settings(24))
        .unwrap();
    let (longest_row, longest) = free
        .iter()
        .enumerate()
        .max_by_key(|(_, g)| g.text.chars().count())
        .unwrap();
    let chars: Vec<char> = longest.text.chars().collect();
    assert!(
        chars.len() >= 6,
        "output too short to cut: {:?}",
        longest.text
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let with_stop = GenerationSettings {
        stop: vec![stop.clone(), "\u{1F600}never".into()],
        ..settings(24)
    };
    assert_batch_matches_alone(&model, &rows, &with_stop);
    let stopped =
        generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &with_stop).unwrap();
    assert_eq!(stopped[longest_row].finish, "stop");
    assert!(!stopped[longest_row].text.contains(&stop));

    let short = generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &settings(3))
        .unwrap();
    for generation in &short {
        assert!(generation.tokens.len() <= 3);
        if generation.tokens.len() < 3 {
            assert_eq!(generation.finish, "eos");
        }
    }
    assert_batch_matches_alone(&model, &rows, &settings(3));
    let none = generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &settings(0))
        .unwrap();
    assert!(none
        .iter()
        .all(|g| g.tokens.is_empty() && g.finish == "length"));
}

#[test]
fn sampled_rows_equal_sampling_alone_with_the_same_seed() {
    let model = tiny_model(3);
    let rows = prompts(&model, &TEXTS);
    let sampled = GenerationSettings {
        max_new_tokens: 16,
        temperature: 1.0,
        top_p: 0.9,
        seed: 11,
        stop: Vec::new(),
    };
    assert_batch_matches_alone(&model, &rows, &sampled);
}

#[test]
fn generation_stops_at_the_models_last_position() {
    let model = tiny_model_with_positions(1, 256);
    let limit = model.transformer.max_positions();
    assert_eq!(limit, 256);
    let long: Vec<u32> = (0..limit as u32 - 3).map(|i| 4 + i % 200).collect();
    let rows = vec![long.clone(), vec![5, 6, 7]];
    let out = generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &settings(50))
        .unwrap();
    assert!(out[0].tokens.len() <= 4, "{}", out[0].tokens.len());
    let too_long = vec![(0..limit as u32).map(|i| 4 + i % 200).collect::<Vec<u32>>()];
    let error = generate::complete_batch(
        &model.transformer,
        &model.tokenizer,
        &too_long,
        &settings(5),
    )
    .unwrap_err();
    assert!(
        matches!(error, GenerateError::PromptTooLong { .. }),
        "{error}"
    );
}

#[test]
fn empty_batches_and_prompts() {
    let model = tiny_model(1);
    let none =
        generate::complete_batch(&model.transformer, &model.tokenizer, &[], &settings(5)).unwrap();
    assert!(none.is_empty());
    let error = generate::complete_batch(
        &model.transformer,
        &model.tokenizer,
        &[vec![5, 6], vec![]],
        &settings(5),
    )
    .unwrap_err();
    assert!(matches!(error, GenerateError::EmptyPrompt));
}

#[test]
fn smollm2_greedy_batch_equals_each_prompt_alone() {
    let Some(model) = smollm2() else { return };
    let questions = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "Tom has 3 apples and buys 5 more. How many apples does he have?",
        "List three primary colors.",
    ];
    let rows: Vec<Vec<u32>> = questions
        .iter()
        .map(|question| {
            let text = model
                .chat_template
                .render(
                    &[Message {
                        role: Role::User,
                        content: question.to_string(),
                    }],
                    true,
                )
                .unwrap();
            model.tokenizer.encode(&text).unwrap()
        })
        .collect();
    let settings = settings(32);
    let started = Instant::now();
    let batched =
        generate::complete_batch(&model.transformer, &model.tokenizer, &rows, &settings).unwrap();
    let batch_s = started.elapsed().as_secs_f64();
    let batch_tokens: usize = batched.iter().map(|g| g.tokens.len()).sum();
    let started = Instant::now();
    let mut alone_tokens = 0;
    for (index, (row, got)) in rows.iter().zip(&batched).enumerate() {
        let alone =
            generate::complete(&model.transformer, &model.tokenizer, row, &settings).unwrap();
        alone_tokens += alone.tokens.len();
        assert_eq!(
            got.tokens, alone.tokens,
            "row {index}: {:?} vs {:?}",
            got.text, alone.text
        );
        assert_eq!(got.finish, alone.finish);
    }
    let alone_s = started.elapsed().as_secs_f64();
    assert!(batched[0].text.contains("Paris"), "{:?}", batched[0].text);
    eprintln!(
        "smollm2: batch of {} generated {batch_tokens} tokens in {batch_s:.2} s ({:.1} tokens/s); \
         one at a time {alone_tokens} tokens in {alone_s:.2} s ({:.1} tokens/s)",
        rows.len(),
        batch_tokens as f64 / batch_s,
        alone_tokens as f64 / alone_s
    );
}
