//! IFBench instruction following: our own verifiers for its instruction ids, scored strictly
//! (the response as written), at prompt level (every instruction of a prompt followed) and
//! instruction level (each instruction on its own).
//!
//! IFBench's reference checkers need spaCy and NLTK data that cannot be had offline, so these
//! are written from each instruction's wording and the reference's documented behaviour, with
//! plain text processing only. Two ids need a language model of English and are not covered:
//! `words:start_verb` (part-of-speech tagging) and `words:odd_even_syllables` (a pronouncing
//! dictionary). A prompt with an uncovered id is *unverifiable*: it is counted separately
//! and never as a pass or a fail.
//!
//! Where the reference's behaviour contradicts its instruction text we follow the text, and
//! say so on the verifier (for example, keywords are counted as whole words, and person
//! names must appear as words, not inside other words).
//!
//! The verifiers live one file per IFBench family (the part of the id before the colon):
//! `count.rs`, `custom.rs`, `format.rs`, `ratio.rs`, `repeat.rs`, `sentence.rs` and
//! `words.rs`, with the text processing they share in `text.rs`. This module keeps the public
//! API, the instructions' arguments and the registry mapping each id to its verifier.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

mod count;
mod custom;
mod format;
mod ratio;
mod repeat;
mod sentence;
mod text;
mod words;

/// One IFBench prompt with its verifiable instructions.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IfPrompt {
    /// The prompt's key in the data set.
    pub key: String,
    /// The full prompt given to the model (instructions included).
    pub prompt: String,
    /// The instruction ids that apply.
    pub instruction_id_list: Vec<String>,
    /// Arguments of each instruction, in the same order (null values mean "not set").
    pub kwargs: Vec<Map<String, Value>>,
}

/// Whether one instruction was followed; `None` when we have no verifier for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstructionVerdict {
    /// The instruction id.
    pub id: String,
    /// `Some(followed)`, or `None` if the id is not covered.
    pub followed: Option<bool>,
}

/// The verdict on one response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptVerdict {
    /// The prompt's key.
    pub key: String,
    /// One verdict per instruction.
    pub instructions: Vec<InstructionVerdict>,
    /// `Some(all followed)`, or `None` when some instruction is not covered (unverifiable).
    pub followed_all: Option<bool>,
}

/// Accuracy over many responses.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct InstructScore {
    /// Fraction of verifiable prompts whose every instruction was followed.
    pub prompt_level_strict: f64,
    /// Fraction of the instructions of verifiable prompts that were followed.
    pub instruction_level_strict: f64,
    /// Verifiable prompts scored.
    pub prompts: usize,
    /// Instructions scored (in verifiable prompts).
    pub instructions: usize,
    /// Prompts left out because one of their ids is not covered.
    pub unverifiable_prompts: usize,
}

/// An instruction's arguments are missing or malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("instruction {id}: argument {name:?} {problem}")]
pub struct KwargError {
    /// The instruction id.
    pub id: String,
    /// The argument.
    pub name: String,
    /// What is wrong with it.
    pub problem: String,
}

/// What can go wrong reading or scoring IFBench data.
#[derive(Debug, thiserror::Error)]
pub enum InstructError {
    /// A file could not be read.
    #[error("reading {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not what it should be.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// The 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file holds no records.
    #[error("{path}: no records")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A prompt's instruction has bad arguments.
    #[error("prompt {key}")]
    Kwargs {
        /// The prompt's key.
        key: String,
        /// The problem.
        #[source]
        source: KwargError,
    },
}

type Verifier = fn(&Args<'_>, &str) -> Result<bool, KwargError>;

/// Every instruction id IFBench defines, with our verifier where we have one.
const REGISTRY: &[(&str, Option<Verifier>)] = &[
    ("count:conjunctions", Some(count::conjunctions)),
    ("count:keywords_multiple", Some(count::keywords_multiple)),
    ("count:numbers", Some(count::numbers)),
    ("count:person_names", Some(count::person_names)),
    ("count:pronouns", Some(count::pronouns)),
    ("count:punctuation", Some(count::punctuation)),
    ("count:unique_word_count", Some(count::unique_word_count)),
    ("count:word_count_range", Some(count::word_count_range)),
    ("count:words_japanese", Some(count::words_japanese)),
    ("custom:character_reverse", Some(custom::character_reverse)),
    ("custom:csv_city", Some(custom::csv_city)),
    ("custom:csv_quotes", Some(custom::csv_quotes)),
    (
        "custom:csv_special_character",
        Some(custom::csv_special_character),
    ),
    ("custom:date_format_list", Some(custom::date_format_list)),
    (
        "custom:european_capitals_sort",
        Some(custom::european_capitals_sort),
    ),
    ("custom:mcq_count_length", Some(custom::mcq_count_length)),
    ("custom:multiples", Some(custom::multiples)),
    ("custom:reverse_newline", Some(custom::reverse_newline)),
    ("custom:sentence_alphabet", Some(custom::sentence_alphabet)),
    ("custom:word_reverse", Some(custom::word_reverse)),
    ("format:emoji", Some(format::emoji)),
    ("format:line_indent", Some(format::line_indent)),
    ("format:list", Some(format::list)),
    ("format:newline", Some(format::newline)),
    (
        "format:no_bullets_bullets",
        Some(format::no_bullets_bullets),
    ),
    ("format:no_whitespace", Some(format::no_whitespace)),
    ("format:options", Some(format::options)),
    ("format:output_template", Some(format::output_template)),
    ("format:parentheses", Some(format::parentheses)),
    ("format:quote_unquote", Some(format::quote_unquote)),
    ("format:quotes", Some(format::quotes)),
    ("format:sub-bullets", Some(format::sub_bullets)),
    ("format:thesis", Some(format::thesis)),
    ("format:title_case", Some(format::title_case)),
    ("ratio:overlap", Some(ratio::overlap)),
    ("ratio:sentence_balance", Some(ratio::sentence_balance)),
    ("ratio:sentence_type", Some(ratio::sentence_type)),
    ("ratio:sentence_words", Some(ratio::sentence_words)),
    ("ratio:stop_words", Some(ratio::stop_words)),
    ("repeat:repeat_change", Some(repeat::repeat_change)),
    ("repeat:repeat_simple", Some(repeat::repeat_simple)),
    ("repeat:repeat_span", Some(repeat::repeat_span)),
    (
        "sentence:alliteration_increment",
        Some(sentence::alliteration_increment),
    ),
    ("sentence:increment", Some(sentence::increment)),
    ("sentence:keyword", Some(sentence::sentence_keyword)),
    ("words:alphabet", Some(words::alphabet)),
    ("words:consonants", Some(words::consonants)),
    (
        "words:keywords_specific_position",
        Some(words::keywords_specific_position),
    ),
    ("words:last_first", Some(words::last_first)),
    ("words:no_consecutive", Some(words::no_consecutive)),
    // Needs the number of syllables of every English word: a pronouncing dictionary.
    ("words:odd_even_syllables", None),
    ("words:palindrome", Some(words::palindrome)),
    (
        "words:paragraph_last_first",
        Some(words::paragraph_last_first),
    ),
    ("words:prime_lengths", Some(words::prime_lengths)),
    ("words:repeats", Some(words::repeats)),
    // Needs a part-of-speech tagger.
    ("words:start_verb", None),
    ("words:vowel", Some(words::vowel)),
    ("words:words_position", Some(words::words_position)),
];

fn verifier(id: &str) -> Option<Verifier> {
    REGISTRY
        .iter()
        .find(|(known, _)| *known == id)
        .and_then(|(_, verifier)| *verifier)
}

/// Every instruction id IFBench defines (covered or not).
pub fn known_ids() -> Vec<&'static str> {
    REGISTRY.iter().map(|(id, _)| *id).collect()
}

/// The instruction ids we can verify.
pub fn covered_ids() -> Vec<&'static str> {
    REGISTRY
        .iter()
        .filter(|(_, verifier)| verifier.is_some())
        .map(|(id, _)| *id)
        .collect()
}

/// Whether we can verify `id`.
pub fn is_covered(id: &str) -> bool {
    verifier(id).is_some()
}

/// The distinct instruction ids used by `prompts`.
pub fn distinct_ids(prompts: &[IfPrompt]) -> BTreeSet<String> {
    prompts
        .iter()
        .flat_map(|prompt| prompt.instruction_id_list.iter().cloned())
        .collect()
}

/// Checks one instruction; `Ok(None)` when the id is not covered. Strict: an empty (or
/// all-whitespace) response follows nothing.
pub fn check_instruction(
    id: &str,
    kwargs: &Map<String, Value>,
    response: &str,
) -> Result<Option<bool>, KwargError> {
    let Some(verifier) = verifier(id) else {
        return Ok(None);
    };
    if response.trim().is_empty() {
        return Ok(Some(false));
    }
    let args = Args { id, map: kwargs };
    verifier(&args, response).map(Some)
}

/// Scores one response to one prompt.
pub fn score_response(prompt: &IfPrompt, response: &str) -> Result<PromptVerdict, InstructError> {
    let empty = Map::new();
    let mut instructions = Vec::with_capacity(prompt.instruction_id_list.len());
    for (index, id) in prompt.instruction_id_list.iter().enumerate() {
        let kwargs = prompt.kwargs.get(index).unwrap_or(&empty);
        let followed =
            check_instruction(id, kwargs, response).map_err(|source| InstructError::Kwargs {
                key: prompt.key.clone(),
                source,
            })?;
        instructions.push(InstructionVerdict {
            id: id.clone(),
            followed,
        });
    }
    let followed_all = instructions
        .iter()
        .map(|verdict| verdict.followed)
        .collect::<Option<Vec<bool>>>()
        .map(|all| all.iter().all(|&followed| followed));
    Ok(PromptVerdict {
        key: prompt.key.clone(),
        instructions,
        followed_all,
    })
}

/// Prompt-level and instruction-level accuracy over verifiable prompts; `None` when no
/// prompt was verifiable.
pub fn aggregate(verdicts: &[PromptVerdict]) -> Option<InstructScore> {
    let mut prompts = 0;
    let mut prompts_followed = 0;
    let mut instructions = 0;
    let mut instructions_followed = 0;
    let mut unverifiable_prompts = 0;
    for verdict in verdicts {
        let Some(followed_all) = verdict.followed_all else {
            unverifiable_prompts += 1;
            continue;
        };
        prompts += 1;
        prompts_followed += usize::from(followed_all);
        for instruction in &verdict.instructions {
            instructions += 1;
            instructions_followed += usize::from(instruction.followed == Some(true));
        }
    }
    (prompts > 0).then(|| InstructScore {
        prompt_level_strict: prompts_followed as f64 / prompts as f64,
        instruction_level_strict: instructions_followed as f64 / instructions.max(1) as f64,
        prompts,
        instructions,
        unverifiable_prompts,
    })
}

/// JSON objects with the 1-based line they were on.
type NumberedObjects = Vec<(usize, Map<String, Value>)>;

fn read_json_lines(path: &Path) -> Result<NumberedObjects, InstructError> {
    let file = std::fs::File::open(path).map_err(|source| InstructError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut records = Vec::new();
    for (index, line) in BufReader::new(file).lines().enumerate() {
        let line_number = index + 1;
        let line = line.map_err(|source| InstructError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        if line.trim().is_empty() {
            continue;
        }
        let bad = |message: String| InstructError::Line {
            path: path.to_path_buf(),
            line: line_number,
            message,
        };
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(map)) => records.push((line_number, map)),
            Ok(_) => return Err(bad("expected a JSON object".into())),
            Err(error) => return Err(bad(format!("not valid JSON: {error}"))),
        }
    }
    if records.is_empty() {
        return Err(InstructError::Empty {
            path: path.to_path_buf(),
        });
    }
    Ok(records)
}

/// Reads IFBench prompts (`IFBench_test.jsonl`: `key`, `prompt`, `instruction_id_list`,
/// `kwargs` per line).
pub fn read_prompts(path: &Path) -> Result<Vec<IfPrompt>, InstructError> {
    let mut prompts = Vec::new();
    for (line, record) in read_json_lines(path)? {
        let bad = |message: String| InstructError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let key = match record.get("key") {
            Some(Value::String(key)) => key.clone(),
            Some(Value::Number(key)) => key.to_string(),
            Some(_) => return Err(bad("field \"key\" must be a string or a number".into())),
            None => return Err(bad("missing field \"key\"".into())),
        };
        let prompt = match record.get("prompt") {
            Some(Value::String(prompt)) => prompt.clone(),
            _ => return Err(bad("missing or non-string field \"prompt\"".into())),
        };
        let ids = match record.get("instruction_id_list") {
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|id| id.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("field \"instruction_id_list\" must hold strings".into()))?,
            _ => {
                return Err(bad(
                    "missing or non-array field \"instruction_id_list\"".into()
                ))
            }
        };
        let kwargs = match record.get("kwargs") {
            Some(Value::Array(kwargs)) => kwargs
                .iter()
                .map(|entry| match entry {
                    Value::Object(map) => Some(map.clone()),
                    Value::Null => Some(Map::new()),
                    _ => None,
                })
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad("field \"kwargs\" must hold objects".into()))?,
            None => vec![Map::new(); ids.len()],
            _ => return Err(bad("field \"kwargs\" must be an array".into())),
        };
        if kwargs.len() != ids.len() {
            return Err(bad(format!(
                "{} instruction ids but {} kwargs entries",
                ids.len(),
                kwargs.len()
            )));
        }
        prompts.push(IfPrompt {
            key,
            prompt,
            instruction_id_list: ids,
            kwargs,
        });
    }
    Ok(prompts)
}

/// Reads responses (`{"key" or "prompt", "response"}` per line, IFBench's output format) and
/// pairs each with its prompt, by key when the line has one, else by the exact prompt text.
pub fn read_responses(
    path: &Path,
    prompts: &[IfPrompt],
) -> Result<Vec<(usize, String)>, InstructError> {
    let by_key: HashMap<&str, usize> = prompts
        .iter()
        .enumerate()
        .map(|(index, p)| (p.key.as_str(), index))
        .collect();
    let by_text: HashMap<&str, usize> = prompts
        .iter()
        .enumerate()
        .map(|(index, p)| (p.prompt.as_str(), index))
        .collect();
    let mut pairs = Vec::new();
    for (line, record) in read_json_lines(path)? {
        let bad = |message: String| InstructError::Line {
            path: path.to_path_buf(),
            line,
            message,
        };
        let response = match record.get("response") {
            Some(Value::String(response)) => response.clone(),
            _ => return Err(bad("missing or non-string field \"response\"".into())),
        };
        let index = match (record.get("key"), record.get("prompt")) {
            (Some(key), _) => {
                let key = match key {
                    Value::String(key) => key.clone(),
                    Value::Number(key) => key.to_string(),
                    _ => return Err(bad("field \"key\" must be a string or a number".into())),
                };
                *by_key
                    .get(key.as_str())
                    .ok_or_else(|| bad(format!("no prompt has key {key:?}")))?
            }
            (None, Some(Value::String(text))) => *by_text.get(text.as_str()).ok_or_else(|| {
                let start: String = text.chars().take(60).collect();
                bad(format!("no prompt has the text {start:?}…"))
            })?,
            _ => return Err(bad("needs a \"key\" or a \"prompt\" field".into())),
        };
        pairs.push((index, response));
    }
    Ok(pairs)
}

/// An instruction's arguments, with typed access and errors naming the argument.
struct Args<'a> {
    id: &'a str,
    map: &'a Map<String, Value>,
}

impl Args<'_> {
    fn error(&self, name: &str, problem: &str) -> KwargError {
        KwargError {
            id: self.id.to_string(),
            name: name.to_string(),
            problem: problem.to_string(),
        }
    }

    fn value(&self, name: &str) -> Result<&Value, KwargError> {
        match self.map.get(name) {
            Some(Value::Null) | None => Err(self.error(name, "is missing")),
            Some(value) => Ok(value),
        }
    }

    fn count(&self, name: &str) -> Result<usize, KwargError> {
        let value = self.value(name)?;
        if let Some(count) = value.as_u64() {
            return usize::try_from(count).map_err(|_| self.error(name, "is too large"));
        }
        match value.as_f64() {
            Some(number) if number >= 0.0 && number.fract() == 0.0 && number < 1e15 => {
                Ok(number as usize)
            }
            _ => Err(self.error(name, "must be a non-negative whole number")),
        }
    }

    fn number(&self, name: &str) -> Result<f64, KwargError> {
        self.value(name)?
            .as_f64()
            .ok_or_else(|| self.error(name, "must be a number"))
    }

    fn text(&self, name: &str) -> Result<&str, KwargError> {
        self.value(name)?
            .as_str()
            .ok_or_else(|| self.error(name, "must be a string"))
    }
}

/// Summarises coverage of a data set: (distinct ids used, of which covered).
pub fn coverage(prompts: &[IfPrompt]) -> (usize, usize) {
    let ids = distinct_ids(prompts);
    let covered = ids.iter().filter(|id| is_covered(id)).count();
    (ids.len(), covered)
}

/// Counts of each id's verdicts over many responses, for diagnosis: id → (followed, scored).
pub fn per_instruction(verdicts: &[PromptVerdict]) -> BTreeMap<String, (usize, usize)> {
    let mut table: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for instruction in verdicts.iter().flat_map(|v| &v.instructions) {
        if let Some(followed) = instruction.followed {
            let entry = table.entry(instruction.id.clone()).or_default();
            entry.0 += usize::from(followed);
            entry.1 += 1;
        }
    }
    table
}

#[cfg(test)]
mod tests;
