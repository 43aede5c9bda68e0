//! Chat templates: the Jinja program that turns a list of messages into the model's prompt.
//!
//! Templates are rendered with minijinja set up the way Hugging Face transformers sets up
//! Jinja for `apply_chat_template`: `trim_blocks` and `lstrip_blocks` on, Python string
//! methods (`.strip()`, `.startswith()`, …) available through minijinja-contrib's pycompat,
//! `raise_exception(message)` failing the render with that message, and `bos_token` /
//! `eos_token` defined when the tokenizer has them.

use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file;
use minijinja::{Environment, ErrorKind, Value};
use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Instructions that frame the conversation.
    System,
    /// The person talking to the model.
    User,
    /// The model; its turns are what training teaches.
    Assistant,
}

impl Role {
    pub(crate) fn parse(text: &str) -> Option<Self> {
        match text {
            "system" => Some(Self::System),
            "user" => Some(Self::User),
            "assistant" => Some(Self::Assistant),
            _ => None,
        }
    }
}

/// One turn of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Message {
    /// Who wrote it.
    pub role: Role,
    /// What was written.
    pub content: String,
}

/// The name the template is registered under; no extension, so nothing is auto-escaped.
const TEMPLATE_NAME: &str = "chat";

/// Errors from loading or rendering a [`ChatTemplate`].
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    /// The model carries no chat template.
    #[error("no chat template in {origin}")]
    Missing {
        /// Where we looked (a GGUF key, a directory).
        origin: String,
    },
    /// The template does not parse.
    #[error("chat template does not parse: {0}")]
    Syntax(String),
    /// Rendering failed (including a `raise_exception` call by the template).
    #[error("chat template failed to render: {0}")]
    Render(String),
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
}

/// A compiled chat template with the special token strings it may refer to.
#[derive(Clone)]
pub struct ChatTemplate {
    env: Environment<'static>,
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate")
            .field("source", &self.source)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles a template. `bos_token` and `eos_token` are the strings the template sees as
    /// the variables of those names (undefined when `None`).
    pub fn new(
        source: &str,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self, ChatError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_template_owned(TEMPLATE_NAME, source.to_string())
            .map_err(|error| ChatError::Syntax(describe(&error)))?;
        Ok(Self {
            env,
            source: source.to_string(),
            bos_token,
            eos_token,
        })
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), with the bos and eos token
    /// strings looked up from `tokenizer.ggml.{bos,eos}_token_id`.
    pub fn from_gguf(content: &gguf_file::Content) -> Result<Self, ChatError> {
        let metadata = &content.metadata;
        let key = "tokenizer.chat_template";
        let source = match metadata.get(key) {
            Some(gguf_file::Value::String(source)) => source,
            Some(_) => {
                return Err(ChatError::Syntax(format!(
                    "gguf metadata `{key}` is not a string"
                )))
            }
            None => {
                return Err(ChatError::Missing {
                    origin: format!("gguf metadata `{key}`"),
                })
            }
        };
        let token_string = |id_key: &str| -> Option<String> {
            let id = metadata.get(id_key)?.to_u32().ok()?;
            let gguf_file::Value::Array(tokens) = metadata.get("tokenizer.ggml.tokens")? else {
                return None;
            };
            match tokens.get(id as usize)? {
                gguf_file::Value::String(token) => Some(token.clone()),
                _ => None,
            }
        };
        Self::new(
            source,
            token_string("tokenizer.ggml.bos_token_id"),
            token_string("tokenizer.ggml.eos_token_id"),
        )
    }

    /// The template of a Hugging Face model directory: `chat_template` of
    /// `tokenizer_config.json` (a string, or a list of named templates of which `default` is
    /// taken), else `chat_template.jinja`, else `chat_template` of `chat_template.json`. The
    /// bos and eos token strings come from `tokenizer_config.json`.
    pub fn from_hf_dir(dir: &Path) -> Result<Self, ChatError> {
        let config_path = dir.join("tokenizer_config.json");
        let config = read_optional_json(&config_path)?;
        let from_config = match &config {
            Some(config) => template_field(config, &config_path)?,
            None => None,
        };
        let source = match from_config {
            Some(source) => source,
            None => {
                let jinja_path = dir.join("chat_template.jinja");
                match std::fs::read_to_string(&jinja_path) {
                    Ok(source) => source,
                    Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                        let json_path = dir.join("chat_template.json");
                        let json = read_optional_json(&json_path)?;
                        match json {
                            Some(json) => template_field(&json, &json_path)?,
                            None => None,
                        }
                        .ok_or_else(|| ChatError::Missing {
                            origin: dir.display().to_string(),
                        })?
                    }
                    Err(source) => {
                        return Err(ChatError::Io {
                            path: jinja_path,
                            source,
                        })
                    }
                }
            }
        };
        let token = |field: &str| -> Result<Option<String>, ChatError> {
            let Some(config) = &config else {
                return Ok(None);
            };
            match config.get(field) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(token)) => Ok(Some(token.clone())),
                Some(serde_json::Value::Object(object)) => match object.get("content") {
                    Some(serde_json::Value::String(token)) => Ok(Some(token.clone())),
                    _ => Err(ChatError::InvalidFile {
                        path: config_path.clone(),
                        reason: format!("`{field}.content` should be a string"),
                    }),
                },
                Some(_) => Err(ChatError::InvalidFile {
                    path: config_path.clone(),
                    reason: format!("`{field}` should be a string or an object with `content`"),
                }),
            }
        };
        Self::new(&source, token("bos_token")?, token("eos_token")?)
    }

    /// Renders `messages`; with `add_generation_prompt` the text ends with the header of an
    /// assistant turn (`<|im_start|>assistant\n`), ready for the model to answer.
    pub fn render(
        &self,
        messages: &[Message],
        add_generation_prompt: bool,
    ) -> Result<String, ChatError> {
        let template = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|error| ChatError::Render(describe(&error)))?;
        let context = minijinja::context! {
            messages => Value::from_serialize(messages),
            add_generation_prompt => add_generation_prompt,
            bos_token => self.bos_token.clone(),
            eos_token => self.eos_token.clone(),
        };
        template
            .render(context)
            .map_err(|error| ChatError::Render(describe(&error)))
    }

    /// The Jinja source of the template.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The string the template sees as `bos_token`, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The string the template sees as `eos_token`, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }
}

/// `raise_exception(message)`: templates call it to reject a conversation they cannot format.
fn raise_exception(message: String) -> Result<Value, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
}

/// A one-line description of a minijinja error: kind, detail and template line.
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.kind().to_string();
    if let Some(detail) = error.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    if let Some(line) = error.line() {
        text.push_str(&format!(" (template line {line})"));
    }
    text
}

fn read_optional_json(path: &Path) -> Result<Option<serde_json::Value>, ChatError> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ChatError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    serde_json::from_str(&text)
        .map(Some)
        .map_err(|error| ChatError::InvalidFile {
            path: path.to_path_buf(),
            reason: error.to_string(),
        })
}

/// The `chat_template` field of a JSON object: a string, or a list of `{name, template}` of
/// which the one named `default` is taken.
fn template_field(json: &serde_json::Value, path: &Path) -> Result<Option<String>, ChatError> {
    let invalid = |reason: &str| ChatError::InvalidFile {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    match json.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
        Some(serde_json::Value::Array(named)) => {
            for entry in named {
                if entry.get("name").and_then(|name| name.as_str()) == Some("default") {
                    return match entry.get("template") {
                        Some(serde_json::Value::String(source)) => Ok(Some(source.clone())),
                        _ => Err(invalid(
                            "`chat_template[default].template` should be a string",
                        )),
                    };
                }
            }
            Err(invalid("`chat_template` lists no template named `default`"))
        }
        Some(_) => Err(invalid("`chat_template` should be a string or a list")),
    }
}
