//! Byte-level BPE tokenizers, built from GGUF metadata or a Hugging Face model directory.
//!
//! A GGUF file carries everything a GPT-2-style tokenizer needs: the token strings
//! (`tokenizer.ggml.tokens`, already in byte-level form such as `Ġthe`), the ranked merges
//! (`tokenizer.ggml.merges`, `"Ġ t"`), the token types (`tokenizer.ggml.token_type`), the
//! special ids, and the name of the pre-tokenizer (`tokenizer.ggml.pre`). The name of the
//! pre-tokenizer stands for a regular expression that splits text into words before BPE;
//! each supported name maps to the same split the model's original `tokenizer.json` uses.
//!
//! Token types follow llama.cpp's numbering: 1 normal, 2 unknown, 3 control, 4 user-defined,
//! 5 unused, 6 byte. Control tokens (`<|im_start|>`) become special added tokens, user-defined
//! ones (`<tool_call>`) plain added tokens; both are matched whole in the input text.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PreTokenizerWrapper, SplitDelimiterBehavior};

/// Token type of a control token (`<|im_start|>`) in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_CONTROL: i32 = 3;
/// Token type of a user-defined token (`<tool_call>`) in `tokenizer.ggml.token_type`.
const TOKEN_TYPE_USER_DEFINED: i32 = 4;

/// Token strings that end a chat turn or a document in the model families we know. Those
/// present as special tokens join the eos id in [`Tokenizer::eos_token_ids`].
const END_OF_TURN_TOKENS: &[&str] = &[
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|endoftext|>",
];

/// Split used by Qwen2 (and Qwen2.5): case-insensitive contractions, letters with at most one
/// leading non-letter, single digits, punctuation runs with trailing newlines, newline runs,
/// then other whitespace.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Errors from building or using a [`Tokenizer`].
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// A GGUF metadata key the tokenizer needs is absent.
    #[error("gguf metadata has no `{key}`")]
    MissingKey {
        /// The metadata key.
        key: &'static str,
    },
    /// A GGUF metadata value has the wrong type or an impossible value.
    #[error("gguf metadata `{key}` is invalid: {reason}")]
    InvalidKey {
        /// The metadata key.
        key: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizer model is not byte-level BPE (`tokenizer.ggml.model` other than `gpt2`).
    #[error("tokenizer model `{0}` is not supported (only `gpt2`, byte-level bpe)")]
    UnsupportedModel(String),
    /// The pre-tokenizer name in `tokenizer.ggml.pre` is not one we know.
    #[error("pre-tokenizer `{0}` is not supported (known: gpt-2, smollm, starcoder, qwen2)")]
    UnsupportedPreTokenizer(String),
    /// No end-of-sequence token is defined.
    #[error("the tokenizer defines no end-of-sequence token")]
    MissingEos,
    /// A special token named in the configuration is not in the vocabulary.
    #[error("{what} token `{token}` is not in the vocabulary")]
    UnknownSpecialToken {
        /// Which role the token has (`bos`, `eos`, `pad`).
        what: &'static str,
        /// The token string.
        token: String,
    },
    /// A special id in the configuration is outside the vocabulary.
    #[error("{what} token id {id} is outside the vocabulary of {vocab_size} tokens")]
    IdOutOfRange {
        /// Which role the id has (`bos`, `eos`, `pad`).
        what: &'static str,
        /// The id.
        id: u32,
        /// The vocabulary size.
        vocab_size: usize,
    },
    /// A file of a Hugging Face model directory could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A file of a Hugging Face model directory is not what we expect.
    #[error("invalid {path}: {reason}")]
    InvalidFile {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The tokenizers library failed to build, encode or decode.
    #[error("tokenizer: {0}")]
    Library(String),
}

/// A byte-level BPE tokenizer with its special ids.
///
/// Encoding never adds a BOS token and recognises special tokens written in the text
/// (`<|im_start|>` becomes its single id); decoding keeps every token, special ones included.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    bos_token_id: Option<u32>,
    eos_token_ids: Vec<u32>,
    pad_token_id: u32,
    vocab_size: usize,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token_id", &self.bos_token_id)
            .field("eos_token_ids", &self.eos_token_ids)
            .field("pad_token_id", &self.pad_token_id)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Builds the tokenizer described by the metadata of a GGUF file.
    ///
    /// Reads `tokenizer.ggml.{model, pre, tokens, merges, token_type, bos_token_id,
    /// eos_token_id, padding_token_id}`. The model must be `gpt2` (byte-level BPE); the
    /// padding id falls back to the eos id when absent.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, TokenizerError> {
        let metadata = &content.metadata;
        let model_name = gguf_string(metadata, "tokenizer.ggml.model")?;
        if model_name != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model_name.to_string()));
        }
        let pre = gguf_string(metadata, "tokenizer.ggml.pre")?;
        let tokens = gguf_string_array(metadata, "tokenizer.ggml.tokens")?;
        let merges = gguf_string_array(metadata, "tokenizer.ggml.merges")?;
        let token_types = match metadata.get("tokenizer.ggml.token_type") {
            Some(value) => gguf_i32_array(value, "tokenizer.ggml.token_type")?,
            None => vec![1; tokens.len()],
        };
        if token_types.len() != tokens.len() {
            return Err(TokenizerError::InvalidKey {
                key: "tokenizer.ggml.token_type",
                reason: format!(
                    "has {} entries but there are {} tokens",
                    token_types.len(),
                    tokens.len()
                ),
            });
        }

        let mut vocab = Vocab::with_capacity(tokens.len());
        for (id, token) in tokens.iter().enumerate() {
            if vocab.insert(token.to_string(), id as u32).is_some() {
                return Err(TokenizerError::InvalidKey {
                    key: "tokenizer.ggml.tokens",
                    reason: format!("token `{token}` appears more than once"),
                });
            }
        }
        let mut merge_pairs = Vec::with_capacity(merges.len());
        for (rank, merge) in merges.iter().enumerate() {
            let Some((left, right)) = merge.split_once(' ') else {
                return Err(TokenizerError::InvalidKey {
                    key: "tokenizer.ggml.merges",
                    reason: format!("merge {rank} `{merge}` is not two tokens joined by a space"),
                });
            };
            merge_pairs.push((left.to_string(), right.to_string()));
        }

        let mut added = Vec::new();
        for (id, (token, kind)) in tokens.iter().zip(&token_types).enumerate() {
            let special = match *kind {
                TOKEN_TYPE_CONTROL => true,
                TOKEN_TYPE_USER_DEFINED => false,
                _ => continue,
            };
            debug_assert_eq!(vocab.get(*token), Some(&(id as u32)));
            added.push(AddedToken::from(token.to_string(), special).normalized(false));
        }

        let inner = build_byte_level_bpe(pre, vocab, merge_pairs, &added)?;
        let vocab_size = tokens.len();
        let bos = optional_gguf_id(metadata, "tokenizer.ggml.bos_token_id")?;
        let eos = optional_gguf_id(metadata, "tokenizer.ggml.eos_token_id")?
            .ok_or(TokenizerError::MissingEos)?;
        let pad = optional_gguf_id(metadata, "tokenizer.ggml.padding_token_id")?;
        Self::assemble(inner, vocab_size, bos, eos, pad)
    }

    /// Builds the tokenizer of a Hugging Face model directory: `tokenizer.json`, plus the
    /// bos, eos and pad tokens of `tokenizer_config.json` when that file exists (without it,
    /// `<|endoftext|>` or `</s>` is taken as eos when the vocabulary has one).
    pub fn from_hf_dir(dir: &Path) -> Result<Self, TokenizerError> {
        let tokenizer_path = dir.join("tokenizer.json");
        let bytes = std::fs::read(&tokenizer_path).map_err(|source| TokenizerError::Io {
            path: tokenizer_path.clone(),
            source,
        })?;
        let inner = tokenizers::Tokenizer::from_bytes(&bytes).map_err(|error| {
            TokenizerError::InvalidFile {
                path: tokenizer_path.clone(),
                reason: error.to_string(),
            }
        })?;
        let vocab_size = inner.get_vocab_size(true);

        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?;
        let named = |field: &'static str| -> Result<Option<u32>, TokenizerError> {
            let Some(config) = &config else {
                return Ok(None);
            };
            let Some(content) = special_token_content(config, field, &config_path)? else {
                return Ok(None);
            };
            let what = field.trim_end_matches("_token");
            match inner.token_to_id(&content) {
                Some(id) => Ok(Some(id)),
                None => Err(TokenizerError::UnknownSpecialToken {
                    what,
                    token: content,
                }),
            }
        };
        let bos = named("bos_token")?;
        let pad = named("pad_token")?;
        let eos = match named("eos_token")? {
            Some(id) => id,
            None => ["<|endoftext|>", "</s>"]
                .iter()
                .find_map(|token| inner.token_to_id(token))
                .ok_or(TokenizerError::MissingEos)?,
        };
        Self::assemble(inner, vocab_size, bos, eos, pad)
    }

    fn assemble(
        inner: tokenizers::Tokenizer,
        vocab_size: usize,
        bos: Option<u32>,
        eos: u32,
        pad: Option<u32>,
    ) -> Result<Self, TokenizerError> {
        let check = |what: &'static str, id: u32| {
            if (id as usize) < vocab_size {
                Ok(id)
            } else {
                Err(TokenizerError::IdOutOfRange {
                    what,
                    id,
                    vocab_size,
                })
            }
        };
        let bos_token_id = bos.map(|id| check("bos", id)).transpose()?;
        let eos = check("eos", eos)?;
        let pad_token_id = check("pad", pad.unwrap_or(eos))?;

        let special_ids: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, token)| token.special)
            .map(|(id, _)| id)
            .collect();
        let mut eos_token_ids = vec![eos];
        for token in END_OF_TURN_TOKENS {
            if let Some(id) = inner.token_to_id(token) {
                if special_ids.contains(&id) && !eos_token_ids.contains(&id) {
                    eos_token_ids.push(id);
                }
            }
        }
        Ok(Self {
            inner,
            bos_token_id,
            eos_token_ids,
            pad_token_id,
            vocab_size,
        })
    }

    /// Encodes text to ids. Special tokens written in the text become their single ids;
    /// no BOS or other token is added. Qwen2 tokenizers first normalize the text to Unicode
    /// NFC, as the model's own tokenizer does, so decoding gives back the NFC form.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .inner
            .encode(text, false)
            .map_err(|error| TokenizerError::Library(format!("cannot encode text: {error}")))?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, keeping every token (special tokens included). Byte sequences
    /// that are not valid UTF-8 (a token cut inside a character) become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        if let Some(id) = ids.iter().find(|id| **id as usize >= self.vocab_size) {
            return Err(TokenizerError::IdOutOfRange {
                what: "decoded",
                id: *id,
                vocab_size: self.vocab_size,
            });
        }
        self.inner
            .decode(ids, false)
            .map_err(|error| TokenizerError::Library(format!("cannot decode ids: {error}")))
    }

    /// The ids that end generation: the eos id first, then the other end-of-turn and
    /// end-of-text special tokens the vocabulary has (`<|im_end|>`, `<|eot_id|>`, `<|end|>`,
    /// `<end_of_turn>`, `<|endoftext|>`), without repeats.
    pub fn eos_token_ids(&self) -> &[u32] {
        &self.eos_token_ids
    }

    /// The beginning-of-sequence id, if the tokenizer defines one. It is never added by
    /// [`Tokenizer::encode`]; chat templates write it themselves when the model wants it.
    pub fn bos_token_id(&self) -> Option<u32> {
        self.bos_token_id
    }

    /// The id used to pad batches: the configured padding id, else the eos id.
    pub fn pad_token_id(&self) -> u32 {
        self.pad_token_id
    }

    /// The number of ids the tokenizer knows, added tokens included. For a GGUF file this is
    /// the length of `tokenizer.ggml.tokens`, which matches the embedding rows.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// The whole tokenizer as a Hugging Face `tokenizer.json` document (what
    /// `tokenizers.Tokenizer.from_file` reads back into the same tokenizer).
    pub fn to_json(&self) -> Result<String, TokenizerError> {
        self.inner
            .to_string(true)
            .map_err(|error| TokenizerError::Library(format!("cannot serialise: {error}")))
    }

    /// The id of a token string (special or not), if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// The token string of an id, if the vocabulary has it (byte-level form, e.g. `Ġthe`).
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Builds a byte-level BPE tokenizer with the pre-tokenizer named `pre`.
fn build_byte_level_bpe(
    pre: &str,
    vocab: Vocab,
    merges: Vec<(String, String)>,
    added: &[AddedToken],
) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let library = |error: tokenizers::Error| TokenizerError::Library(error.to_string());
    // What each name stands for comes from the `tokenizer.json` of the models that carry it.
    let (pre_tokenizer, nfc): (PreTokenizerWrapper, bool) = match pre {
        // GPT-2's own split: contractions, letter runs, digit runs, punctuation runs, spaces.
        "gpt-2" => (ByteLevel::new(false, true, true).into(), false),
        // StarCoder and SmolLM: every digit on its own, then GPT-2's split.
        "smollm" | "starcoder" => (
            Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            false,
        ),
        // Qwen2: its own split, then byte-level mapping without GPT-2's regex; NFC first.
        "qwen2" => {
            let split = Split::new(
                SplitPattern::Regex(QWEN2_SPLIT.to_string()),
                SplitDelimiterBehavior::Isolated,
                false,
            )
            .map_err(library)?;
            (
                Sequence::new(vec![
                    split.into(),
                    ByteLevel::new(false, false, false).into(),
                ])
                .into(),
                true,
            )
        }
        other => return Err(TokenizerError::UnsupportedPreTokenizer(other.to_string())),
    };
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(library)?;
    let mut tokenizer = tokenizers::Tokenizer::new(bpe);
    if nfc {
        tokenizer.with_normalizer(Some(NFC));
    }
    tokenizer
        .with_pre_tokenizer(Some(pre_tokenizer))
        .with_decoder(Some(ByteLevelDecoder::default()));
    let special: Vec<AddedToken> = added.iter().filter(|t| t.special).cloned().collect();
    let plain: Vec<AddedToken> = added.iter().filter(|t| !t.special).cloned().collect();
    tokenizer.add_special_tokens(&special);
    tokenizer.add_tokens(&plain);
    Ok(tokenizer)
}

fn gguf_value<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &'static str,
) -> Result<&'a gguf_file::Value, TokenizerError> {
    metadata.get(key).ok_or(TokenizerError::MissingKey { key })
}

fn gguf_string<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &'static str,
) -> Result<&'a str, TokenizerError> {
    match gguf_value(metadata, key)? {
        gguf_file::Value::String(value) => Ok(value),
        other => Err(TokenizerError::InvalidKey {
            key,
            reason: format!("expected a string, found {:?}", other.value_type()),
        }),
    }
}

fn gguf_string_array<'a>(
    metadata: &'a HashMap<String, gguf_file::Value>,
    key: &'static str,
) -> Result<Vec<&'a str>, TokenizerError> {
    let gguf_file::Value::Array(values) = gguf_value(metadata, key)? else {
        return Err(TokenizerError::InvalidKey {
            key,
            reason: "expected an array of strings".to_string(),
        });
    };
    values
        .iter()
        .enumerate()
        .map(|(index, value)| match value {
            gguf_file::Value::String(text) => Ok(text.as_str()),
            other => Err(TokenizerError::InvalidKey {
                key,
                reason: format!(
                    "entry {index} should be a string, found {:?}",
                    other.value_type()
                ),
            }),
        })
        .collect()
}

fn gguf_i32_array(value: &gguf_file::Value, key: &'static str) -> Result<Vec<i32>, TokenizerError> {
    let gguf_file::Value::Array(values) = value else {
        return Err(TokenizerError::InvalidKey {
            key,
            reason: "expected an array of integers".to_string(),
        });
    };
    values
        .iter()
        .enumerate()
        .map(|(index, value)| {
            gguf_integer(value).ok_or_else(|| TokenizerError::InvalidKey {
                key,
                reason: format!(
                    "entry {index} should be an integer, found {:?}",
                    value.value_type()
                ),
            })
        })
        .map(|result| {
            result.and_then(|wide| {
                i32::try_from(wide).map_err(|_| TokenizerError::InvalidKey {
                    key,
                    reason: format!("entry {wide} is out of range"),
                })
            })
        })
        .collect()
}

fn gguf_integer(value: &gguf_file::Value) -> Option<i64> {
    use gguf_file::Value as V;
    match value {
        V::U8(v) => Some(i64::from(*v)),
        V::I8(v) => Some(i64::from(*v)),
        V::U16(v) => Some(i64::from(*v)),
        V::I16(v) => Some(i64::from(*v)),
        V::U32(v) => Some(i64::from(*v)),
        V::I32(v) => Some(i64::from(*v)),
        V::U64(v) => i64::try_from(*v).ok(),
        V::I64(v) => Some(*v),
        _ => None,
    }
}

fn optional_gguf_id(
    metadata: &HashMap<String, gguf_file::Value>,
    key: &'static str,
) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = metadata.get(key) else {
        return Ok(None);
    };
    let id = gguf_integer(value).ok_or_else(|| TokenizerError::InvalidKey {
        key,
        reason: format!("expected an integer, found {:?}", value.value_type()),
    })?;
    u32::try_from(id)
        .map(Some)
        .map_err(|_| TokenizerError::InvalidKey {
            key,
            reason: format!("{id} is not a token id"),
        })
}

/// Reads a JSON file that may be absent.
fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, TokenizerError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(TokenizerError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| TokenizerError::InvalidFile {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })
}

/// The content of a special token field of `tokenizer_config.json`: either a string or an
/// object with a `content` string; `null` or absent means none.
fn special_token_content(
    config: &serde_json::Value,
    field: &str,
    path: &Path,
) -> Result<Option<String>, TokenizerError> {
    match config.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(content)) => Ok(Some(content.clone())),
        Some(serde_json::Value::Object(object)) => match object.get("content") {
            Some(serde_json::Value::String(content)) => Ok(Some(content.clone())),
            _ => Err(TokenizerError::InvalidFile {
                path: path.to_path_buf(),
                reason: format!("`{field}.content` should be a string"),
            }),
        },
        Some(_) => Err(TokenizerError::InvalidFile {
            path: path.to_path_buf(),
            reason: format!("`{field}` should be a string or an object with `content`"),
        }),
    }
}
