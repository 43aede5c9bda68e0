//! Model files written at test time, with nothing but the standard library and serde_json, so
//! the root package's CLI tests can include this file too (`#[path]`).
//!
//! - [`write_hf_dir`]: a tiny Hugging Face model directory (config.json, model.safetensors,
//!   tokenizer.json with a byte-level BPE over all 256 bytes, tokenizer_config.json with a
//!   ChatML template) whose weights are seeded random numbers;
//! - [`write_gguf_header`]: a GGUF file holding only string metadata (e.g. an architecture
//!   lorasweep does not implement).
#![allow(dead_code)]

use std::io::Write;
use std::path::Path;

/// Geometry of a tiny synthetic model.
#[derive(Debug, Clone, PartialEq)]
pub struct TinySpec {
    /// `llama` or `qwen2` (written to config.json as `model_type`).
    pub arch: &'static str,
    /// Embedding rows.
    pub vocab: usize,
    /// Residual width.
    pub hidden: usize,
    /// FFN width.
    pub ffn: usize,
    /// Decoder layers.
    pub layers: usize,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
    /// Whether the LM head is the embedding.
    pub tie: bool,
    /// Seed of the weights.
    pub seed: u64,
}

impl TinySpec {
    /// 2 layers, hidden 32, ffn 48, 4 heads, 2 kv heads, vocab 64; llama ties its embedding,
    /// qwen2 has its own LM head and q/k/v biases.
    pub fn new(arch: &'static str, seed: u64) -> Self {
        Self {
            arch,
            vocab: 64,
            hidden: 32,
            ffn: 48,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            tie: arch == "llama",
            seed,
        }
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The Hugging Face `config.json`.
    pub fn config_json(&self) -> serde_json::Value {
        let architectures = match self.arch {
            "qwen2" => "Qwen2ForCausalLM",
            "llama" => "LlamaForCausalLM",
            other => other,
        };
        serde_json::json!({
            "architectures": [architectures],
            "model_type": self.arch,
            "vocab_size": self.vocab,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-5,
            "tie_word_embeddings": self.tie,
            "max_position_embeddings": 256,
            "torch_dtype": "float32",
        })
    }

    /// Every weight, Hugging Face–named, as `(name, shape, row-major values)`, drawn from a
    /// seeded generator: projections ~ N(0, 0.5²/d_in), embeddings ~ N(0, 0.5²), norm gains
    /// near 1, biases small.
    pub fn weights(&self) -> Vec<(String, Vec<usize>, Vec<f32>)> {
        let mut rng = SplitMix::new(self.seed);
        let mut out = Vec::new();
        let mut normal = |name: String, shape: Vec<usize>, mean: f32, std: f32| {
            let n: usize = shape.iter().product();
            let values = (0..n).map(|_| mean + std * rng.normal()).collect();
            out.push((name, shape, values));
        };
        let (h, f, d) = (self.hidden, self.ffn, self.head_dim());
        let (q, kv) = (self.heads * d, self.kv_heads * d);
        normal(
            "model.embed_tokens.weight".into(),
            vec![self.vocab, h],
            0.0,
            0.5,
        );
        for layer in 0..self.layers {
            let p = format!("model.layers.{layer}");
            normal(format!("{p}.input_layernorm.weight"), vec![h], 1.0, 0.1);
            normal(
                format!("{p}.post_attention_layernorm.weight"),
                vec![h],
                1.0,
                0.1,
            );
            let modules = [
                ("self_attn.q_proj", h, q),
                ("self_attn.k_proj", h, kv),
                ("self_attn.v_proj", h, kv),
                ("self_attn.o_proj", q, h),
                ("mlp.gate_proj", h, f),
                ("mlp.up_proj", h, f),
                ("mlp.down_proj", f, h),
            ];
            for (module, d_in, d_out) in modules {
                let std = 0.5 / (d_in as f32).sqrt();
                normal(format!("{p}.{module}.weight"), vec![d_out, d_in], 0.0, std);
                if self.arch == "qwen2"
                    && module.starts_with("self_attn.")
                    && module != "self_attn.o_proj"
                {
                    normal(format!("{p}.{module}.bias"), vec![d_out], 0.0, 0.05);
                }
            }
        }
        normal("model.norm.weight".into(), vec![h], 1.0, 0.1);
        if !self.tie {
            normal("lm_head.weight".into(), vec![self.vocab, h], 0.0, 0.5);
        }
        out
    }
}

/// A seeded generator (SplitMix64) with Box–Muller normals: no dependency, same numbers on
/// every machine.
pub struct SplitMix {
    state: u64,
    spare: Option<f32>,
}

impl SplitMix {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed ^ 0x1234_5678_9ABC_DEF0,
            spare: None,
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in (0, 1).
    pub fn uniform(&mut self) -> f64 {
        ((self.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    /// Standard normal.
    pub fn normal(&mut self) -> f32 {
        if let Some(value) = self.spare.take() {
            return value;
        }
        let (u1, u2) = (self.uniform(), self.uniform());
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = 2.0 * std::f64::consts::PI * u2;
        self.spare = Some((radius * angle.sin()) as f32);
        (radius * angle.cos()) as f32
    }

    /// Uniform integer in `0..n`.
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Writes f32 tensors as a safetensors file (8-byte header length, JSON header, data).
pub fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>, Vec<f32>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0usize;
    for (name, shape, values) in tensors {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let end = offset + 4 * values.len();
        header.insert(
            name.clone(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, end]}),
        );
        offset = end;
    }
    let mut header = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    let mut bytes = Vec::with_capacity(8 + header.len() + offset);
    bytes.extend((header.len() as u64).to_le_bytes());
    bytes.extend(&header);
    for (_, _, values) in tensors {
        for value in values {
            bytes.extend(value.to_le_bytes());
        }
    }
    std::fs::write(path, bytes).unwrap();
}

/// Special tokens of the tiny tokenizer, at ids 0, 1, 2.
pub const SPECIAL_TOKENS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// Merges of the tiny tokenizer, in rank order (`Ġ` is the byte-level space).
pub const MERGES: [&str; 6] = ["Ġ t", "h e", "Ġt he", "i s", "Ġ a", "i n"];

/// Number of tokens of the tiny tokenizer: 3 special, 256 bytes, the merges.
pub const TOKENIZER_SIZE: usize = 3 + 256 + MERGES.len();

/// ChatML, as SmolLM2 and Qwen write it.
pub const CHATML: &str = "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

/// GPT-2's reversible byte → printable character map.
fn byte_chars() -> Vec<char> {
    let keeps =
        |b: u32| (33..=126).contains(&b) || (161..=172).contains(&b) || (174..=255).contains(&b);
    let mut next = 256;
    (0u32..256)
        .map(|b| {
            if keeps(b) {
                char::from_u32(b).unwrap()
            } else {
                let c = char::from_u32(next).unwrap();
                next += 1;
                c
            }
        })
        .collect()
}

/// `tokenizer.json` of a byte-level BPE over all 256 bytes (any text encodes).
pub fn tokenizer_json() -> serde_json::Value {
    let mut vocab = serde_json::Map::new();
    for (id, token) in SPECIAL_TOKENS.iter().enumerate() {
        vocab.insert((*token).into(), id.into());
    }
    for (offset, c) in byte_chars().into_iter().enumerate() {
        vocab.insert(c.to_string(), (3 + offset).into());
    }
    for (rank, merge) in MERGES.iter().enumerate() {
        vocab.insert(merge.replace(' ', ""), (3 + 256 + rank).into());
    }
    let added: Vec<_> = SPECIAL_TOKENS
        .iter()
        .enumerate()
        .map(|(id, token)| {
            serde_json::json!({"id": id, "content": token, "single_word": false, "lstrip": false,
                "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": added,
        "normalizer": null,
        "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true},
        "post_processor": null,
        "decoder": {"type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true},
        "model": {
            "type": "BPE", "dropout": null, "unk_token": null, "continuing_subword_prefix": null,
            "end_of_word_suffix": null, "fuse_unk": false, "byte_fallback": false,
            "vocab": vocab, "merges": MERGES,
        }
    })
}

/// Writes a complete tiny Hugging Face model directory. The spec's vocabulary must hold the
/// tokenizer (`spec.vocab ≥ TOKENIZER_SIZE`).
pub fn write_hf_dir(dir: &Path, spec: &TinySpec) {
    assert!(
        spec.vocab >= TOKENIZER_SIZE,
        "the tokenizer needs {TOKENIZER_SIZE} rows"
    );
    std::fs::create_dir_all(dir).unwrap();
    let json = |name: &str, value: &serde_json::Value| {
        std::fs::write(dir.join(name), serde_json::to_string_pretty(value).unwrap()).unwrap()
    };
    json("config.json", &spec.config_json());
    json("tokenizer.json", &tokenizer_json());
    json(
        "tokenizer_config.json",
        &serde_json::json!({
            "bos_token": null,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": CHATML,
        }),
    );
    write_safetensors(&dir.join("model.safetensors"), &spec.weights());
}

/// The spec of the tiny model written by [`write_hf_dir`]: vocab large enough for the
/// tokenizer.
pub fn hf_spec(arch: &'static str, seed: u64) -> TinySpec {
    TinySpec {
        vocab: 272,
        ..TinySpec::new(arch, seed)
    }
}

/// Writes a GGUF v3 file with the given string metadata and no tensors.
pub fn write_gguf_header(path: &Path, metadata: &[(&str, &str)]) {
    let mut bytes = Vec::new();
    bytes.extend(b"GGUF");
    bytes.extend(3u32.to_le_bytes());
    bytes.extend(0u64.to_le_bytes());
    bytes.extend((metadata.len() as u64).to_le_bytes());
    for (key, value) in metadata {
        bytes.extend((key.len() as u64).to_le_bytes());
        bytes.extend(key.as_bytes());
        bytes.extend(8u32.to_le_bytes()); // string
        bytes.extend((value.len() as u64).to_le_bytes());
        bytes.extend(value.as_bytes());
    }
    let mut file = std::fs::File::create(path).unwrap();
    file.write_all(&bytes).unwrap();
}

/// Writes chat-messages JSONL: one conversation per `(user, assistant)` pair.
pub fn write_jsonl(path: &Path, pairs: &[(&str, &str)]) {
    let lines: Vec<String> = pairs
        .iter()
        .map(|(user, assistant)| {
            serde_json::json!({"messages": [
                {"role": "user", "content": user},
                {"role": "assistant", "content": assistant},
            ]})
            .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}
