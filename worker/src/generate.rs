//! Text generation with a KV cache: greedy or sampled decoding, stop strings, the model's chat
//! template.

use std::time::Instant;

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::chat::ChatTemplate;
use crate::data::Message;
use crate::model::{KvCache, Transformer};
use crate::tokenizer::Tokenizer;

/// How to pick each next token.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationSettings {
    /// Most tokens to generate.
    pub max_new_tokens: usize,
    /// 0 for greedy; otherwise softmax temperature.
    pub temperature: f64,
    /// Nucleus sampling mass (1.0 = off).
    pub top_p: f64,
    /// Seed for sampling.
    pub seed: u64,
    /// Generation stops when the decoded text contains one of these (it is cut there).
    pub stop: Vec<String>,
}

impl Default for GenerationSettings {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_p: 1.0,
            seed: 0,
            stop: Vec::new(),
        }
    }
}

/// One generated completion.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Generation {
    /// The decoded text (cut at a stop string, without the end-of-turn token).
    pub text: String,
    /// Generated token ids.
    pub tokens: Vec<u32>,
    /// Why generation ended: `eos`, `stop` or `length`.
    pub finish: String,
    /// Prompt length in tokens.
    pub prompt_tokens: usize,
    /// Generated tokens per second (after the prompt).
    pub tokens_per_s: f64,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// Nothing to continue.
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// The chat template failed.
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    /// Tokenizing or decoding failed.
    #[error(transparent)]
    Tokenizer(#[from] crate::tokenizer::TokenizerError),
    /// A tensor operation failed.
    #[error("{0}")]
    Tensor(#[from] candle_core::Error),
}

/// Generates a reply to a conversation with the model's chat template.
pub fn chat(
    model: &Transformer,
    tokenizer: &Tokenizer,
    template: &ChatTemplate,
    messages: &[Message],
    settings: &GenerationSettings,
) -> Result<Generation, GenerateError> {
    let prompt = template.render(messages, true)?;
    let ids = tokenizer.encode(&prompt)?;
    complete(model, tokenizer, &ids, settings)
}

/// Continues a token sequence.
pub fn complete(
    model: &Transformer,
    tokenizer: &Tokenizer,
    prompt: &[u32],
    settings: &GenerationSettings,
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let device = model.device();
    let mut cache = KvCache::new();
    let mut rng = rand::rngs::StdRng::seed_from_u64(settings.seed);
    let mut tokens = Vec::new();
    let eos = tokenizer.eos_token_ids();
    let input = Tensor::from_slice(prompt, (1, prompt.len()), device)?;
    let mut logits = last_logits(model, &input, 0, &mut cache)?;
    let started = Instant::now();
    let mut finish = "length";
    let mut text = String::new();
    while tokens.len() < settings.max_new_tokens {
        let next = pick(&logits, settings, &mut rng)?;
        if eos.contains(&next) {
            finish = "eos";
            break;
        }
        tokens.push(next);
        text = tokenizer.decode(&tokens)?;
        if let Some(cut) = settings
            .stop
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            text.truncate(cut);
            finish = "stop";
            break;
        }
        let position = prompt.len() + tokens.len() - 1;
        let input = Tensor::from_slice(&[next], (1, 1), device)?;
        logits = last_logits(model, &input, position, &mut cache)?;
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    Ok(Generation {
        text,
        tokens_per_s: tokens.len() as f64 / elapsed,
        tokens,
        finish: finish.to_string(),
        prompt_tokens: prompt.len(),
    })
}

fn last_logits(
    model: &Transformer,
    input: &Tensor,
    start: usize,
    cache: &mut KvCache,
) -> candle_core::Result<Vec<f32>> {
    let hidden = model.hidden_states(input, start, Some(cache))?;
    let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
    model
        .logits(&last)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

fn pick(
    logits: &[f32],
    settings: &GenerationSettings,
    rng: &mut rand::rngs::StdRng,
) -> candle_core::Result<u32> {
    if settings.temperature <= 0.0 {
        let best = logits
            .iter()
            .enumerate()
            .fold(0, |best, (i, &v)| if v > logits[best] { i } else { best });
        return Ok(best as u32);
    }
    let probs = candle_nn::ops::softmax(
        &(Tensor::new(logits, &candle_core::Device::Cpu)? / settings.temperature)?,
        D::Minus1,
    )?
    .to_vec1::<f32>()?;
    let mut order: Vec<usize> = (0..probs.len()).collect();
    order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
    let mut kept = Vec::new();
    let mut mass = 0.0f64;
    for index in order {
        kept.push(index);
        mass += probs[index] as f64;
        if mass >= settings.top_p {
            break;
        }
    }
    let draw = rng.random::<f64>() * mass;
    let mut acc = 0.0;
    for &index in &kept {
        acc += probs[index] as f64;
        if acc >= draw {
            return Ok(index as u32);
        }
    }
    Ok(*kept.last().expect("at least one token kept") as u32)
}
