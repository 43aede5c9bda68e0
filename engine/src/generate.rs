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
    /// A prompt leaves no room to generate within the model's positions.
    #[error("a prompt of {tokens} tokens leaves no room to generate: the model runs at most {limit} positions")]
    PromptTooLong {
        /// The prompt's length.
        tokens: usize,
        /// The model's positions.
        limit: usize,
    },
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

/// Continues many token sequences at once: one left-padded batch sharing a KV cache, each
/// row with its own RoPE positions and an attention mask that hides the padding, so every
/// row decodes as if it ran alone (greedy outputs equal [`complete`]'s, up to float rounding
/// in near-ties). Each row stops on its own (end-of-turn token, a stop string,
/// `max_new_tokens`, or the model's last position); finished rows leave the batch. Sampling
/// gives every row its own generator seeded with `settings.seed`, as [`complete`] does.
/// Results are in the order of `prompts`; each row's `tokens_per_s` counts its own tokens
/// over the decoding time until it finished.
pub fn complete_batch(
    model: &Transformer,
    tokenizer: &Tokenizer,
    prompts: &[Vec<u32>],
    settings: &GenerationSettings,
) -> Result<Vec<Generation>, GenerateError> {
    if prompts.is_empty() {
        return Ok(Vec::new());
    }
    if prompts.iter().any(Vec::is_empty) {
        return Err(GenerateError::EmptyPrompt);
    }
    let limit = model.max_positions();
    if let Some(prompt) = prompts.iter().find(|prompt| prompt.len() >= limit) {
        return Err(GenerateError::PromptTooLong {
            tokens: prompt.len(),
            limit,
        });
    }
    let device = model.device();
    let eos = tokenizer.eos_token_ids();
    let longest = prompts.iter().map(Vec::len).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(prompts.len() * longest);
    let mut padding = Vec::with_capacity(prompts.len());
    for prompt in prompts {
        let pad = longest - prompt.len();
        ids.extend(std::iter::repeat_n(tokenizer.pad_token_id(), pad));
        ids.extend_from_slice(prompt);
        padding.push(pad);
    }
    let mut rows: Vec<BatchRow> = prompts
        .iter()
        .map(|prompt| BatchRow {
            prompt_tokens: prompt.len(),
            tokens: Vec::new(),
            text: String::new(),
            finish: None,
            decode_s: 0.0,
            rng: rand::rngs::StdRng::seed_from_u64(settings.seed),
        })
        .collect();
    // Batch position → index into `rows`, for the rows still decoding.
    let mut active: Vec<usize> = (0..prompts.len()).collect();
    let mut cache = KvCache::new();
    let input = Tensor::from_vec(ids, (prompts.len(), longest), device)?;
    let greedy_on_device = settings.temperature <= 0.0 && !device.is_cpu();
    let mut logits = batch_last_scores(model, &input, 0, &mut cache, &padding, greedy_on_device)?;
    let started = Instant::now();
    loop {
        let mut next_tokens = Vec::with_capacity(active.len());
        let mut still_active = Vec::with_capacity(active.len());
        for (position, &index) in active.iter().enumerate() {
            let row = &mut rows[index];
            let next = match &logits {
                RowScores::Logits(rows) => pick(&rows[position], settings, &mut row.rng)?,
                RowScores::Argmax(ids) => ids[position],
            };
            if let Some(finish) = row.advance(next, eos, tokenizer, settings, limit)? {
                row.finish = Some(finish);
                row.decode_s = started.elapsed().as_secs_f64();
            } else {
                next_tokens.push(next);
                still_active.push(position);
            }
        }
        if still_active.is_empty() {
            break;
        }
        if still_active.len() < active.len() {
            cache.select_rows(&still_active)?;
            padding = still_active.iter().map(|&p| padding[p]).collect();
            active = still_active.iter().map(|&p| active[p]).collect();
            let shared = padding.iter().copied().min().unwrap_or(0);
            cache.drop_leading(shared)?;
            padding.iter_mut().for_each(|pad| *pad -= shared);
        }
        let start = cache.len();
        let input = Tensor::from_vec(next_tokens, (active.len(), 1), device)?;
        logits = batch_last_scores(model, &input, start, &mut cache, &padding, greedy_on_device)?;
    }
    rows.into_iter()
        .map(|row| {
            let text = match row.finish {
                Some("stop") => row.text,
                _ => tokenizer.decode(&row.tokens)?,
            };
            Ok(Generation {
                text,
                tokens_per_s: row.tokens.len() as f64 / row.decode_s.max(1e-9),
                finish: row.finish.unwrap_or("length").to_string(),
                prompt_tokens: row.prompt_tokens,
                tokens: row.tokens,
            })
        })
        .collect()
}

/// The decoding state of one row of [`complete_batch`].
struct BatchRow {
    prompt_tokens: usize,
    tokens: Vec<u32>,
    /// The decoded text, kept up to date only when there are stop strings.
    text: String,
    finish: Option<&'static str>,
    decode_s: f64,
    rng: rand::rngs::StdRng,
}

impl BatchRow {
    /// Takes the picked token; returns why the row is finished, or `None` when `next` must
    /// be fed to the model.
    fn advance(
        &mut self,
        next: u32,
        eos: &[u32],
        tokenizer: &Tokenizer,
        settings: &GenerationSettings,
        limit: usize,
    ) -> Result<Option<&'static str>, GenerateError> {
        if self.tokens.len() >= settings.max_new_tokens {
            return Ok(Some("length"));
        }
        if eos.contains(&next) {
            return Ok(Some("eos"));
        }
        self.tokens.push(next);
        if !settings.stop.is_empty() {
            self.text = tokenizer.decode(&self.tokens)?;
            if let Some(cut) = settings
                .stop
                .iter()
                .filter_map(|stop| self.text.find(stop.as_str()))
                .min()
            {
                self.text.truncate(cut);
                return Ok(Some("stop"));
            }
        }
        // `next` would sit at position prompt + generated − 1.
        let full = self.tokens.len() >= settings.max_new_tokens
            || self.prompt_tokens + self.tokens.len() > limit;
        Ok(full.then_some("length"))
    }
}

/// What comes back to the host for each row's last position.
enum RowScores {
    /// The whole vocabulary's logits (sampling, or greedy on the CPU, where [`pick`]'s
    /// first-maximum rule keeps outputs reproducible).
    Logits(Vec<Vec<f32>>),
    /// Only the argmax id (greedy on a GPU): a few bytes per row instead of the vocabulary's
    /// logits, and no host-side scan of them, at every decoding step.
    Argmax(Vec<u32>),
}

/// The scores of each row's last position after feeding `input` (padded rows, see
/// [`Transformer::hidden_states_padded`]).
fn batch_last_scores(
    model: &Transformer,
    input: &Tensor,
    start: usize,
    cache: &mut KvCache,
    padding: &[usize],
    argmax_only: bool,
) -> candle_core::Result<RowScores> {
    let hidden = model.hidden_states_padded(input, start, Some(cache), Some(padding))?;
    let last = hidden.narrow(1, hidden.dim(1)? - 1, 1)?;
    let logits = model.logits(&last)?.squeeze(1)?;
    if argmax_only {
        return Ok(RowScores::Argmax(
            logits.argmax(D::Minus1)?.to_vec1::<u32>()?,
        ));
    }
    Ok(RowScores::Logits(
        logits.to_dtype(DType::F32)?.to_vec2::<f32>()?,
    ))
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
