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

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

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
    ("count:conjunctions", Some(verify::conjunctions)),
    ("count:keywords_multiple", Some(verify::keywords_multiple)),
    ("count:numbers", Some(verify::numbers)),
    ("count:person_names", Some(verify::person_names)),
    ("count:pronouns", Some(verify::pronouns)),
    ("count:punctuation", Some(verify::punctuation)),
    ("count:unique_word_count", Some(verify::unique_word_count)),
    ("count:word_count_range", Some(verify::word_count_range)),
    ("count:words_japanese", Some(verify::words_japanese)),
    ("custom:character_reverse", Some(verify::character_reverse)),
    ("custom:csv_city", Some(verify::csv_city)),
    ("custom:csv_quotes", Some(verify::csv_quotes)),
    (
        "custom:csv_special_character",
        Some(verify::csv_special_character),
    ),
    ("custom:date_format_list", Some(verify::date_format_list)),
    (
        "custom:european_capitals_sort",
        Some(verify::european_capitals_sort),
    ),
    ("custom:mcq_count_length", Some(verify::mcq_count_length)),
    ("custom:multiples", Some(verify::multiples)),
    ("custom:reverse_newline", Some(verify::reverse_newline)),
    ("custom:sentence_alphabet", Some(verify::sentence_alphabet)),
    ("custom:word_reverse", Some(verify::word_reverse)),
    ("format:emoji", Some(verify::emoji)),
    ("format:line_indent", Some(verify::line_indent)),
    ("format:list", Some(verify::list)),
    ("format:newline", Some(verify::newline)),
    (
        "format:no_bullets_bullets",
        Some(verify::no_bullets_bullets),
    ),
    ("format:no_whitespace", Some(verify::no_whitespace)),
    ("format:options", Some(verify::options)),
    ("format:output_template", Some(verify::output_template)),
    ("format:parentheses", Some(verify::parentheses)),
    ("format:quote_unquote", Some(verify::quote_unquote)),
    ("format:quotes", Some(verify::quotes)),
    ("format:sub-bullets", Some(verify::sub_bullets)),
    ("format:thesis", Some(verify::thesis)),
    ("format:title_case", Some(verify::title_case)),
    ("ratio:overlap", Some(verify::overlap)),
    ("ratio:sentence_balance", Some(verify::sentence_balance)),
    ("ratio:sentence_type", Some(verify::sentence_type)),
    ("ratio:sentence_words", Some(verify::sentence_words)),
    ("ratio:stop_words", Some(verify::stop_words)),
    ("repeat:repeat_change", Some(verify::repeat_change)),
    ("repeat:repeat_simple", Some(verify::repeat_simple)),
    ("repeat:repeat_span", Some(verify::repeat_span)),
    (
        "sentence:alliteration_increment",
        Some(verify::alliteration_increment),
    ),
    ("sentence:increment", Some(verify::increment)),
    ("sentence:keyword", Some(verify::sentence_keyword)),
    ("words:alphabet", Some(verify::alphabet)),
    ("words:consonants", Some(verify::consonants)),
    (
        "words:keywords_specific_position",
        Some(verify::keywords_specific_position),
    ),
    ("words:last_first", Some(verify::last_first)),
    ("words:no_consecutive", Some(verify::no_consecutive)),
    // Needs the number of syllables of every English word: a pronouncing dictionary.
    ("words:odd_even_syllables", None),
    ("words:palindrome", Some(verify::palindrome)),
    (
        "words:paragraph_last_first",
        Some(verify::paragraph_last_first),
    ),
    ("words:prime_lengths", Some(verify::prime_lengths)),
    ("words:repeats", Some(verify::repeats)),
    // Needs a part-of-speech tagger.
    ("words:start_verb", None),
    ("words:vowel", Some(verify::vowel)),
    ("words:words_position", Some(verify::words_position)),
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

/// Text processing shared by the verifiers.
mod text {
    use super::*;

    /// ASCII punctuation, as Python's `string.punctuation`.
    pub fn is_punct(c: char) -> bool {
        c.is_ascii_punctuation()
    }

    /// Strips ASCII punctuation and spaces from both ends.
    pub fn strip_punct(word: &str) -> &str {
        word.trim_matches(|c: char| is_punct(c) || c == ' ')
    }

    /// Deletes every ASCII punctuation character.
    pub fn remove_punct(text: &str) -> String {
        text.chars().filter(|&c| !is_punct(c)).collect()
    }

    fn word_pattern() -> &'static Regex {
        static PATTERN: OnceLock<Regex> = OnceLock::new();
        PATTERN.get_or_init(|| Regex::new(r"\w+").expect("valid pattern"))
    }

    /// Runs of word characters (letters, digits, underscore), the unit of word counts.
    pub fn words(text: &str) -> Vec<&str> {
        word_pattern().find_iter(text).map(|m| m.as_str()).collect()
    }

    /// How many times `keyword` occurs as a whole word (or phrase), ignoring case: a word
    /// boundary is required on each side that starts or ends with a word character.
    pub fn count_whole_word(text: &str, keyword: &str) -> usize {
        let keyword = keyword.trim();
        if keyword.is_empty() {
            return 0;
        }
        let is_word_char = |c: char| c.is_alphanumeric() || c == '_';
        let boundary_before = if keyword.starts_with(is_word_char) {
            r"\b"
        } else {
            ""
        };
        let boundary_after = if keyword.ends_with(is_word_char) {
            r"\b"
        } else {
            ""
        };
        let pattern = format!(
            "(?i){boundary_before}{}{boundary_after}",
            regex::escape(keyword)
        );
        Regex::new(&pattern).map_or(0, |regex| regex.find_iter(text).count())
    }

    const ABBREVIATIONS: &[&str] = &[
        "mr", "mrs", "ms", "dr", "st", "prof", "jr", "sr", "inc", "ltd", "co", "vs", "etc", "capt",
        "lt", "no", "fig", "approx",
    ];

    const CLOSERS: &[char] = &['"', '\'', '”', '’', ')', ']', '»'];

    /// Splits text into sentences. A sentence ends at a run of `.`, `!`, `?` (and any
    /// closing quotes or brackets right after it), except a `.` that is part of a number
    /// (`3.14`), a domain or file name (`example.com`), an initial (`J. Smith`), a dotted
    /// abbreviation (`e.g.`, `U.S.`) or a common abbreviation (`Dr.`, `etc.`). Newlines are
    /// spaces. Sentences are trimmed; empty ones are dropped.
    pub fn sentences(text: &str) -> Vec<String> {
        let chars: Vec<char> = text
            .chars()
            .map(|c| if c == '\n' || c == '\r' { ' ' } else { c })
            .collect();
        let mut sentences = Vec::new();
        let mut start = 0;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if !matches!(c, '.' | '!' | '?' | '…') {
                i += 1;
                continue;
            }
            let mut end = i;
            while end + 1 < chars.len() && matches!(chars[end + 1], '.' | '!' | '?' | '…') {
                end += 1;
            }
            let run_is_single_dot = end == i && c == '.';
            if run_is_single_dot && !ends_sentence_at_dot(&chars, i) {
                i += 1;
                continue;
            }
            while end + 1 < chars.len() && CLOSERS.contains(&chars[end + 1]) {
                end += 1;
            }
            let sentence: String = chars[start..=end].iter().collect();
            let sentence = sentence.trim();
            if !sentence.is_empty() {
                sentences.push(sentence.to_string());
            }
            start = end + 1;
            i = end + 1;
        }
        let rest: String = chars[start.min(chars.len())..].iter().collect();
        let rest = rest.trim();
        if !rest.is_empty() {
            sentences.push(rest.to_string());
        }
        sentences
    }

    fn ends_sentence_at_dot(chars: &[char], dot: usize) -> bool {
        let next = chars.get(dot + 1).copied();
        // "3.14", "example.com", "main.py", "U.S": something sticks to the dot.
        if next.is_some_and(|c| c.is_alphanumeric()) {
            return false;
        }
        let mut word_start = dot;
        while word_start > 0
            && (chars[word_start - 1].is_alphanumeric() || chars[word_start - 1] == '.')
        {
            word_start -= 1;
        }
        let word: String = chars[word_start..dot].iter().collect();
        if word.is_empty() {
            return true;
        }
        // An initial ("J.") or a dotted abbreviation ("e.g", "U.S").
        if word.chars().count() == 1 && word.chars().all(char::is_alphabetic) {
            return false;
        }
        if word.contains('.') && word.split('.').all(|part| part.chars().count() <= 1) {
            return false;
        }
        !ABBREVIATIONS.contains(&word.to_lowercase().as_str())
    }

    /// The sentence's last character that is not a closing quote or bracket.
    pub fn terminal(sentence: &str) -> Option<char> {
        sentence.trim_end_matches(CLOSERS).chars().last()
    }

    /// Word tokens with leading and trailing punctuation split off as tokens of their own
    /// (`"Hello, world."` → `Hello` `,` `world` `.`), close to a treebank tokenizer.
    pub fn tokens(text: &str) -> Vec<String> {
        let mut tokens = Vec::new();
        for chunk in text.split_whitespace() {
            let chars: Vec<char> = chunk.chars().collect();
            let mut start = 0;
            let mut end = chars.len();
            while start < end && is_punct(chars[start]) {
                tokens.push(chars[start].to_string());
                start += 1;
            }
            let mut trailing = Vec::new();
            while end > start && is_punct(chars[end - 1]) {
                trailing.push(chars[end - 1].to_string());
                end -= 1;
            }
            if start < end {
                tokens.push(chars[start..end].iter().collect());
            }
            tokens.extend(trailing.into_iter().rev());
        }
        tokens
    }

    /// Decomposes accented letters and drops what is not ASCII: `São Tomé` → `Sao Tome`.
    pub fn ascii_fold(text: &str) -> String {
        use unicode_normalization::UnicodeNormalization;
        text.nfkd().filter(char::is_ascii).collect()
    }

    /// Whether `c` is an emoji (pictographs, emoticons, symbols and flags).
    pub fn is_emoji(c: char) -> bool {
        matches!(
            c as u32,
            0x1F000..=0x1FAFF
                | 0x2600..=0x27BF
                | 0x2300..=0x23FF
                | 0x2B00..=0x2BFF
                | 0x2190..=0x21FF
                | 0x25A0..=0x25FF
                | 0x2934..=0x2935
                | 0x3030
                | 0x303D
                | 0x3297
                | 0x3299
                | 0x00A9
                | 0x00AE
                | 0x203C
                | 0x2049
                | 0x2122
                | 0x2139
                | 0x24C2
        )
    }

    /// Characters that modify or join emoji without being one.
    pub fn is_emoji_modifier(c: char) -> bool {
        matches!(c as u32, 0xFE0E | 0xFE0F | 0x200D | 0x20E3)
    }

    /// A very small CSV reader: records separated by newlines outside quotes, fields by
    /// `delimiter`; a field in double quotes may hold delimiters, newlines and doubled
    /// quotes. A blank line is an empty record. Each field keeps whether it was quoted.
    pub fn csv_records(text: &str, delimiter: char) -> Vec<Vec<CsvField>> {
        let mut records = Vec::new();
        let mut record: Vec<CsvField> = Vec::new();
        let mut field = CsvField::default();
        let mut in_quotes = false;
        let mut field_started = false;
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            if in_quotes {
                if c == '"' {
                    if chars.peek() == Some(&'"') {
                        chars.next();
                        field.value.push('"');
                    } else {
                        in_quotes = false;
                    }
                } else {
                    field.value.push(c);
                }
                continue;
            }
            match c {
                '"' if !field_started || field.value.trim().is_empty() => {
                    field.value.clear();
                    field.quoted = true;
                    in_quotes = true;
                    field_started = true;
                }
                '\r' => {}
                '\n' => {
                    if field_started || !record.is_empty() {
                        record.push(std::mem::take(&mut field));
                    }
                    records.push(std::mem::take(&mut record));
                    field_started = false;
                }
                c if c == delimiter => {
                    record.push(std::mem::take(&mut field));
                    field_started = false;
                }
                c => {
                    field.value.push(c);
                    field_started = true;
                }
            }
        }
        if field_started || !record.is_empty() {
            record.push(field);
            records.push(record);
        }
        records
    }

    /// One CSV field.
    #[derive(Clone, Debug, Default, PartialEq, Eq)]
    pub struct CsvField {
        /// Its text, quotes removed.
        pub value: String,
        /// Whether it was enclosed in double quotes.
        pub quoted: bool,
    }

    /// English stop words (function words) for the stop-word ratio.
    pub fn is_stop_word(word: &str) -> bool {
        static WORDS: OnceLock<HashSet<&'static str>> = OnceLock::new();
        WORDS
            .get_or_init(|| {
                "i me my myself we our ours ourselves you your yours yourself yourselves he \
                 him his himself she her hers herself it its itself they them their theirs \
                 themselves what which who whom this that these those am is are was were be \
                 been being have has had having do does did doing a an the and but if or \
                 because as until while of at by for with about against between into through \
                 during before after above below to from up down in out on off over under \
                 again further then once here there when where why how all any both each few \
                 more most other some such no nor not only own same so than too very s t can \
                 will just don should now d ll m o re ve y ain aren couldn didn doesn hadn \
                 hasn haven isn ma mightn mustn needn shan shouldn wasn weren won wouldn"
                    .split_whitespace()
                    .collect()
            })
            .contains(word)
    }
}

/// One function per covered instruction id.
mod verify {
    use super::text::{self, strip_punct};
    use super::*;

    fn lower_words_without_punct(response: &str) -> Vec<String> {
        text::remove_punct(&response.to_lowercase())
            .split_whitespace()
            .map(str::to_string)
            .collect()
    }

    /// `count:word_count_range`: between `min_words` and `max_words` words, inclusive.
    pub fn word_count_range(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let count = text::words(response).len();
        Ok(args.count("min_words")? <= count && count <= args.count("max_words")?)
    }

    /// `count:unique_word_count`: at least `N` distinct words (case-insensitive).
    pub fn unique_word_count(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let lower = response.to_lowercase();
        let unique: HashSet<&str> = lower
            .split_whitespace()
            .map(strip_punct)
            .filter(|word| !word.is_empty())
            .collect();
        Ok(unique.len() >= args.count("N")?)
    }

    /// `ratio:stop_words`: stop words are at most `percentage`% of the words.
    pub fn stop_words(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let limit = args.number("percentage")?;
        let words = text::words(response);
        if words.is_empty() {
            return Ok(false);
        }
        let stop = words
            .iter()
            .filter(|word| text::is_stop_word(&word.to_lowercase()))
            .count();
        Ok(stop as f64 * 100.0 / words.len() as f64 <= limit)
    }

    fn sentence_kinds(response: &str) -> (usize, usize, usize) {
        let mut kinds = (0, 0, 0);
        for sentence in text::sentences(response) {
            match text::terminal(&sentence) {
                Some('.') => kinds.0 += 1,
                Some('?') => kinds.1 += 1,
                Some('!') => kinds.2 += 1,
                _ => {}
            }
        }
        kinds
    }

    /// `ratio:sentence_type`: twice as many declarative (`.`) as interrogative (`?`)
    /// sentences. Unlike the reference, a response with no question fails: 0:0 is no ratio.
    pub fn sentence_type(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let (declarative, interrogative, _) = sentence_kinds(response);
        Ok(interrogative > 0 && declarative == 2 * interrogative)
    }

    /// `ratio:sentence_balance`: as many declarative as interrogative as exclamatory
    /// sentences, at least one of each.
    pub fn sentence_balance(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let (declarative, interrogative, exclamatory) = sentence_kinds(response);
        Ok(declarative > 0 && declarative == interrogative && interrogative == exclamatory)
    }

    /// `count:conjunctions`: at least `small_n` different coordinating conjunctions.
    pub fn conjunctions(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        const FANBOYS: [&str; 7] = ["for", "and", "nor", "but", "or", "yet", "so"];
        let lower = response.to_lowercase();
        let used: HashSet<&str> = lower
            .split_whitespace()
            .map(strip_punct)
            .filter(|word| FANBOYS.contains(word))
            .collect();
        Ok(used.len() >= args.count("small_n")?)
    }

    /// `count:person_names`: at least `N` different names from the instruction's list,
    /// each as a whole word ("Mia" in "Miami" does not count).
    pub fn person_names(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        const NAMES: [&str; 50] = [
            "Emma",
            "Liam",
            "Sophia",
            "Jackson",
            "Olivia",
            "Noah",
            "Ava",
            "Lucas",
            "Isabella",
            "Mason",
            "Mia",
            "Ethan",
            "Charlotte",
            "Alexander",
            "Amelia",
            "Benjamin",
            "Harper",
            "Leo",
            "Zoe",
            "Daniel",
            "Chloe",
            "Samuel",
            "Lily",
            "Matthew",
            "Grace",
            "Owen",
            "Abigail",
            "Gabriel",
            "Ella",
            "Jacob",
            "Scarlett",
            "Nathan",
            "Victoria",
            "Elijah",
            "Layla",
            "Nicholas",
            "Audrey",
            "David",
            "Hannah",
            "Christopher",
            "Penelope",
            "Thomas",
            "Nora",
            "Andrew",
            "Aria",
            "Joseph",
            "Claire",
            "Ryan",
            "Stella",
            "Jonathan",
        ];
        let words: HashSet<&str> = text::words(response).into_iter().collect();
        let found = NAMES.iter().filter(|name| words.contains(*name)).count();
        Ok(found >= args.count("N")?)
    }

    /// `ratio:overlap`: the share of the response's character trigrams that also occur in
    /// `reference_text` is within 2 points of `percentage`.
    pub fn overlap(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        fn trigrams(text: &str) -> HashSet<[char; 3]> {
            let chars: Vec<char> = text.chars().collect();
            chars.windows(3).map(|w| [w[0], w[1], w[2]]).collect()
        }
        let target = args.number("percentage")?;
        let reference = trigrams(args.text("reference_text")?);
        let own = trigrams(response);
        if own.is_empty() {
            return Ok(false);
        }
        let shared = own.intersection(&reference).count();
        let percent = shared as f64 * 100.0 / own.len() as f64;
        Ok((target - 2.0..=target + 2.0).contains(&percent))
    }

    /// `count:numbers`: exactly `N` numbers (punctuation removed first, so `3.14` and
    /// `1,000` are one number each).
    pub fn numbers(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        static DIGITS: OnceLock<Regex> = OnceLock::new();
        let digits = DIGITS.get_or_init(|| Regex::new(r"\d+").expect("valid pattern"));
        let count = digits.find_iter(&text::remove_punct(response)).count();
        Ok(count == args.count("N")?)
    }

    /// `words:alphabet`: each word starts with the letter after the previous word's,
    /// wrapping from `z` to `a`.
    pub fn alphabet(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let cleaned = text::remove_punct(response).to_lowercase();
        let mut expected: Option<u8> = None;
        for word in cleaned.split_whitespace() {
            let first = word.chars().next().unwrap_or(' ');
            if !first.is_ascii_lowercase() {
                return Ok(false);
            }
            let first = first as u8;
            if let Some(expected) = expected {
                if first != expected {
                    return Ok(false);
                }
            }
            expected = Some(if first == b'z' { b'a' } else { first + 1 });
        }
        Ok(expected.is_some())
    }

    /// `words:vowel`: one paragraph using at most three of the vowels a, e, i, o, u.
    pub fn vowel(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let paragraph = response.trim();
        if paragraph.contains('\n') {
            return Ok(false);
        }
        let vowels: HashSet<char> = paragraph
            .to_lowercase()
            .chars()
            .filter(|c| "aeiou".contains(*c))
            .collect();
        Ok(vowels.len() <= 3)
    }

    /// `words:consonants`: every word has two consonants in a row.
    pub fn consonants(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let is_consonant = |c: char| "bcdfghjklmnpqrstvwxyz".contains(c);
        Ok(response.to_lowercase().split_whitespace().all(|word| {
            let chars: Vec<char> = word.chars().collect();
            chars
                .windows(2)
                .any(|pair| is_consonant(pair[0]) && is_consonant(pair[1]))
        }))
    }

    /// `sentence:alliteration_increment`: every sentence has more alliterative words (words
    /// in runs of two or more sharing a first letter) than the one before.
    pub fn alliteration_increment(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let mut previous: Option<usize> = None;
        for sentence in text::sentences(response) {
            let lower = sentence.to_lowercase();
            let firsts: Vec<char> = lower
                .split_whitespace()
                .filter_map(|word| {
                    word.trim_start_matches(|c: char| text::is_punct(c))
                        .chars()
                        .next()
                })
                .collect();
            let mut alliterative = 0;
            let mut run = 1;
            for i in 1..=firsts.len() {
                if i < firsts.len() && firsts[i] == firsts[i - 1] {
                    run += 1;
                } else {
                    if run >= 2 {
                        alliterative += run;
                    }
                    run = 1;
                }
            }
            if previous.is_some_and(|previous| alliterative <= previous) {
                return Ok(false);
            }
            previous = Some(alliterative);
        }
        Ok(previous.is_some())
    }

    /// `words:palindrome`: at least 10 palindromic words of five or more letters.
    pub fn palindrome(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let count = lower_words_without_punct(response)
            .iter()
            .filter(|word| {
                let chars: Vec<char> = word.chars().collect();
                chars.len() >= 5 && chars.iter().eq(chars.iter().rev())
            })
            .count();
        Ok(count >= 10)
    }

    /// `count:punctuation`: an interrobang (`?!`, `!?` or `‽`) and every one of `. , ! ? ; :`
    /// besides it.
    pub fn punctuation(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let rest = if let Some(at) = response.find("?!").or_else(|| response.find("!?")) {
            format!("{}{}", &response[..at], &response[at + 2..])
        } else if response.contains('‽') {
            response.replacen('‽', "", 1)
        } else {
            return Ok(false);
        };
        Ok(['.', ',', '!', '?', ';', ':']
            .iter()
            .all(|mark| rest.contains(*mark)))
    }

    /// `format:parentheses`: brackets `()`, `[]`, `{}` nested at least five deep and
    /// properly closed.
    pub fn parentheses(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let mut open: Vec<char> = Vec::new();
        for c in response.chars() {
            match c {
                '(' | '[' | '{' => open.push(c),
                ')' | ']' | '}' => {
                    let matching = match c {
                        ')' => '(',
                        ']' => '[',
                        _ => '{',
                    };
                    if open.last() == Some(&matching) {
                        if open.len() >= 5 {
                            return Ok(true);
                        }
                        open.pop();
                    } else {
                        open.clear();
                    }
                }
                _ => {}
            }
        }
        Ok(false)
    }

    /// `format:quotes`: quotes within quotes within quotes, alternating `"` and `'`, three
    /// levels deep and closed.
    pub fn quotes(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let mut open: Vec<char> = Vec::new();
        let mut deepest = 0;
        for c in response.chars() {
            if c != '"' && c != '\'' {
                continue;
            }
            if open.last() == Some(&c) {
                open.pop();
                if deepest - open.len() >= 3 {
                    return Ok(true);
                }
            } else {
                open.push(c);
                deepest = deepest.max(open.len());
            }
        }
        Ok(false)
    }

    /// `words:prime_lengths`: every word's length is a prime number.
    pub fn prime_lengths(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let is_prime = |n: usize| {
            n >= 2
                && (2..n)
                    .take_while(|d| d * d <= n)
                    .all(|d| !n.is_multiple_of(d))
        };
        Ok(text::remove_punct(response)
            .split_whitespace()
            .all(|word| is_prime(word.chars().count())))
    }

    /// `format:options`: the response is one of the options. Lettered options (`a), b),
    /// c)`) must be answered exactly as written; word options ignore case and punctuation.
    pub fn options(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        static LETTERED: OnceLock<Regex> = OnceLock::new();
        let lettered =
            LETTERED.get_or_init(|| Regex::new(r"^\W*[aA]\W*[bB]\W*[cC]").expect("valid pattern"));
        let options_text = args.text("options")?;
        let options: Vec<&str> = if options_text.contains('/') {
            options_text.split('/').collect()
        } else if options_text.contains(" or ") {
            options_text.split(" or ").collect()
        } else {
            options_text.split(',').collect()
        };
        let options: Vec<&str> = options.into_iter().map(str::trim).collect();
        if lettered.is_match(options_text) {
            return Ok(options.contains(&response.trim()));
        }
        let normal = |text: &str| strip_punct(text.trim()).to_lowercase();
        let answer = normal(response);
        Ok(options.iter().any(|option| normal(option) == answer))
    }

    /// `format:newline`: every word on a line of its own.
    pub fn newline(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let cleaned = text::remove_punct(response);
        let mut lines = cleaned
            .lines()
            .filter(|line| !line.trim().is_empty())
            .peekable();
        if lines.peek().is_none() {
            return Ok(false);
        }
        Ok(lines.all(|line| line.split_whitespace().count() == 1))
    }

    /// `format:emoji`: every sentence ends with an emoji (one that the sentence splitter
    /// put at the start of the next sentence counts).
    pub fn emoji(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let sentences = text::sentences(response);
        if sentences.is_empty() {
            return Ok(false);
        }
        let clean = |sentence: &str| -> String {
            sentence
                .chars()
                .filter(|&c| !text::is_punct(c) && !text::is_emoji_modifier(c))
                .collect::<String>()
                .trim()
                .to_string()
        };
        for (index, sentence) in sentences.iter().enumerate() {
            let stripped = clean(sentence);
            let Some(last) = stripped.chars().last() else {
                return Ok(false);
            };
            if text::is_emoji(last) {
                continue;
            }
            let next_starts_with_emoji = sentences
                .get(index + 1)
                .and_then(|next| clean(next).chars().next())
                .is_some_and(text::is_emoji);
            if !next_starts_with_emoji {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `ratio:sentence_words`: exactly three sentences of the same number of characters,
    /// with no word used twice (the instruction's "all different words"; the reference
    /// checks only the lengths).
    pub fn sentence_words(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let sentences = text::sentences(response);
        if sentences.len() != 3 {
            return Ok(false);
        }
        let length = sentences[0].chars().count();
        if sentences
            .iter()
            .any(|sentence| sentence.chars().count() != length)
        {
            return Ok(false);
        }
        let mut seen = HashSet::new();
        Ok(text::words(&response.to_lowercase())
            .into_iter()
            .all(|word| seen.insert(word.to_string())))
    }

    /// `count:words_japanese`: every `N`th word is Japanese (kana or kanji); numbers are
    /// exempt.
    pub fn words_japanese(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let every = args.count("N")?;
        if every == 0 {
            return Err(args.error("N", "must be at least 1"));
        }
        let is_japanese = |c: char| matches!(c as u32, 0x3040..=0x30FF | 0x4E00..=0x9FFF);
        Ok(response
            .split_whitespace()
            .enumerate()
            .filter(|(index, _)| (index + 1) % every == 0)
            .map(|(_, word)| strip_punct(word))
            .filter(|word| !word.is_empty() && !word.chars().all(|c| c.is_ascii_digit()))
            .all(|word| word.chars().any(is_japanese)))
    }

    /// `words:repeats`: no word more than `small_n` times.
    pub fn repeats(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let limit = args.count("small_n")?;
        let mut counts: HashMap<String, usize> = HashMap::new();
        for word in lower_words_without_punct(response) {
            *counts.entry(word).or_default() += 1;
        }
        Ok(counts.values().all(|&count| count <= limit))
    }

    /// `sentence:keyword`: the `N`th sentence contains `word` (ignoring case).
    pub fn sentence_keyword(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let word = args.text("word")?.to_lowercase();
        let position = args.count("N")?;
        let sentences = text::sentences(response);
        Ok(position >= 1
            && sentences
                .get(position - 1)
                .is_some_and(|sentence| sentence.to_lowercase().contains(&word)))
    }

    /// `count:pronouns`: at least `N` personal pronouns.
    pub fn pronouns(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        const PRONOUNS: [&str; 31] = [
            "i",
            "me",
            "my",
            "mine",
            "myself",
            "we",
            "us",
            "our",
            "ours",
            "ourselves",
            "you",
            "your",
            "yours",
            "yourself",
            "yourselves",
            "he",
            "him",
            "his",
            "himself",
            "she",
            "her",
            "hers",
            "herself",
            "it",
            "its",
            "itself",
            "they",
            "them",
            "their",
            "theirs",
            "themselves",
        ];
        let count = lower_words_without_punct(&response.replace('/', " "))
            .iter()
            .filter(|word| PRONOUNS.contains(&word.as_str()))
            .count();
        Ok(count >= args.count("N")?)
    }

    /// `words:last_first`: each sentence starts with the word the previous one ended with.
    pub fn last_first(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let sentences = text::sentences(response);
        for pair in sentences.windows(2) {
            let last = pair[0]
                .split_whitespace()
                .map(strip_punct)
                .rfind(|w| !w.is_empty());
            let first = pair[1]
                .split_whitespace()
                .map(strip_punct)
                .find(|w| !w.is_empty());
            match (last, first) {
                (Some(last), Some(first)) if last.to_lowercase() == first.to_lowercase() => {}
                _ => return Ok(false),
            }
        }
        Ok(!sentences.is_empty())
    }

    /// `words:paragraph_last_first`: every paragraph (line) ends with the word it starts
    /// with.
    pub fn paragraph_last_first(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        for line in response.lines() {
            if line.trim().is_empty() {
                continue;
            }
            let lower = line.to_lowercase();
            let words: Vec<&str> = lower
                .split_whitespace()
                .map(strip_punct)
                .filter(|word| !word.is_empty())
                .collect();
            match (words.first(), words.last()) {
                (Some(first), Some(last)) if first == last => {}
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// `sentence:increment`: each sentence has exactly `small_n` more words than the one
    /// before.
    pub fn increment(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let step = args.count("small_n")?;
        let counts: Vec<usize> = text::sentences(response)
            .iter()
            .map(|sentence| text::remove_punct(sentence).split_whitespace().count())
            .collect();
        Ok(!counts.is_empty() && counts.windows(2).all(|pair| pair[1] == pair[0] + step))
    }

    /// `words:no_consecutive`: no two neighbouring words start with the same letter.
    pub fn no_consecutive(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let firsts: Vec<char> = lower_words_without_punct(response)
            .iter()
            .filter_map(|word| word.chars().next())
            .collect();
        Ok(firsts.windows(2).all(|pair| pair[0] != pair[1]))
    }

    /// `format:line_indent`: every non-blank line is indented by more spaces than the one
    /// before (at least two lines: one line is no staircase).
    pub fn line_indent(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let indents: Vec<usize> = response
            .lines()
            .filter(|line| !line.trim().is_empty())
            .map(|line| line.len() - line.trim_start_matches(' ').len())
            .collect();
        Ok(indents.len() >= 2 && indents.windows(2).all(|pair| pair[1] > pair[0]))
    }

    /// `format:quote_unquote`: no quoted phrase directly followed by another, and the
    /// response does not end on a quote.
    pub fn quote_unquote(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let normal: String = response
            .replace(['“', '”'], "\"")
            .replace("'\"'", "")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if normal.contains("\"\"") {
            return Ok(false);
        }
        let tail = normal
            .trim_end_matches(|c: char| c.is_ascii_digit() || (text::is_punct(c) && c != '"'));
        Ok(!tail.ends_with('"'))
    }

    /// `format:list`: a list whose items are marked by `sep` instead of bullets: at least
    /// two occurrences of `sep` standing on their own (at a line start or between spaces).
    /// The reference counts any occurrence, so with `-` every hyphenated word would count.
    pub fn list(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let marker = args.text("sep")?;
        if marker.is_empty() {
            return Err(args.error("sep", "must not be empty"));
        }
        let standalone = response
            .match_indices(marker)
            .filter(|(at, _)| {
                let before = response[..*at].chars().next_back();
                let after = response[at + marker.len()..].chars().next();
                before.is_none_or(char::is_whitespace) && after.is_none_or(char::is_whitespace)
            })
            .count();
        Ok(standalone >= 2)
    }

    /// `format:thesis`: an HTML-italic thesis (`<i>…</i>` or `<em>…</em>`) followed by
    /// more text.
    pub fn thesis(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        for (open, close) in [("<i>", "</i>"), ("<em>", "</em>")] {
            let Some(start) = response.find(open) else {
                continue;
            };
            let after_open = &response[start + open.len()..];
            let Some(end) = after_open.find(close) else {
                continue;
            };
            let thesis = &after_open[..end];
            let rest = &after_open[end + close.len()..];
            if !thesis.trim().is_empty() && !rest.trim().is_empty() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    fn is_star_bullet(line: &str) -> bool {
        let line = line.trim_start();
        line.starts_with('*') && !line.starts_with("**")
    }

    /// `format:sub-bullets`: bullet points (`*`), each followed by at least one
    /// sub-bullet (`-`).
    pub fn sub_bullets(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let mut bullets = 0;
        let mut current_has_sub = true;
        for line in response.lines() {
            if is_star_bullet(line) {
                if !current_has_sub {
                    return Ok(false);
                }
                bullets += 1;
                current_has_sub = false;
            } else if line.trim_start().starts_with('-') && bullets > 0 {
                current_has_sub = true;
            }
        }
        Ok(bullets > 0 && current_has_sub)
    }

    /// `format:no_bullets_bullets`: at least two sentences ending in a period, then at
    /// least two `*` bullet points, and nothing after them.
    pub fn no_bullets_bullets(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let mut intro = String::new();
        let mut bullets = 0;
        for line in response.lines() {
            if line.trim().is_empty() {
                continue;
            }
            if is_star_bullet(line) {
                bullets += 1;
            } else if bullets > 0 {
                return Ok(false);
            } else {
                intro.push_str(line);
                intro.push('\n');
            }
        }
        let periods = text::sentences(&intro)
            .iter()
            .filter(|sentence| text::terminal(sentence) == Some('.'))
            .count();
        Ok(periods >= 2 && bullets >= 2)
    }

    /// `custom:multiples`: exactly the multiples of 7 between 10 and 50, in order.
    pub fn multiples(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        static DIGITS: OnceLock<Regex> = OnceLock::new();
        let digits = DIGITS.get_or_init(|| Regex::new(r"\d+").expect("valid pattern"));
        let found: Vec<&str> = digits.find_iter(response).map(|m| m.as_str()).collect();
        Ok(found == ["14", "21", "28", "35", "42", "49"])
    }

    /// `custom:mcq_count_length`: four questions labelled "Question", five options each
    /// (`A.`/`A)` … `E`), questions growing longer, and nothing before the first.
    pub fn mcq_count_length(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        static LABEL: OnceLock<Regex> = OnceLock::new();
        static OPTION: OnceLock<Regex> = OnceLock::new();
        let label =
            LABEL.get_or_init(|| Regex::new(r"\n*Question \d+[.|):;]?\s*").expect("valid pattern"));
        let option =
            OPTION.get_or_init(|| Regex::new(r"^[A-Ea-e][.)]\s*\w+").expect("valid pattern"));
        let response = response.trim_start();
        if !response.starts_with("Question") {
            return Ok(false);
        }
        let questions: Vec<&str> = label
            .split(response)
            .map(str::trim)
            .filter(|question| !question.is_empty())
            .collect();
        if questions.len() != 4 {
            return Ok(false);
        }
        let mut lengths = Vec::new();
        for question in questions {
            let mut text_length = 0;
            let mut options = 0;
            for line in question.lines() {
                let line = line.trim();
                if option.is_match(line) {
                    options += 1;
                } else if options == 0 {
                    text_length += line.chars().count() + 1;
                }
            }
            if options != 5 {
                return Ok(false);
            }
            lengths.push(text_length);
        }
        Ok(lengths.windows(2).all(|pair| pair[0] < pair[1]))
    }

    /// `custom:reverse_newline`: the countries of Africa in reverse alphabetical order,
    /// one per line, from Zimbabwe (at least 52 lines; accents ignored for the order).
    pub fn reverse_newline(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let lines: Vec<String> = response
            .lines()
            .map(strip_punct)
            .filter(|line| !line.is_empty())
            .map(text::ascii_fold)
            .collect();
        let Some(start) = lines.iter().position(|line| line.contains("Zimbabwe")) else {
            return Ok(false);
        };
        let listed = &lines[start..];
        Ok(listed.len() >= 52 && listed.windows(2).all(|pair| pair[0] >= pair[1]))
    }

    /// `custom:word_reverse`: the answer (the bald eagle) with its words in reverse order.
    pub fn word_reverse(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let words = lower_words_without_punct(response);
        let reversed: Vec<&str> = words.iter().rev().map(String::as_str).collect();
        Ok(reversed.join(" ").contains("bald eagle"))
    }

    /// `custom:character_reverse`: the answer (the bald eagle) spelled backwards.
    pub fn character_reverse(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        Ok(response.to_lowercase().contains("elgae dlab"))
    }

    /// `custom:sentence_alphabet`: 26 sentences whose first words start with a, b, … z.
    pub fn sentence_alphabet(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let sentences = text::sentences(response);
        if sentences.len() != 26 {
            return Ok(false);
        }
        Ok(sentences.iter().zip('a'..='z').all(|(sentence, letter)| {
            sentence
                .chars()
                .find(|c| c.is_alphanumeric())
                .is_some_and(|first| first.to_ascii_lowercase() == letter)
        }))
    }

    /// `custom:european_capitals_sort`: the capitals north of 45° latitude, comma
    /// separated, from north to south. The list is IFBench's answer key (which leaves out
    /// Kyiv, at 50.45° N).
    pub fn european_capitals_sort(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        const NORTH_TO_SOUTH: [&str; 27] = [
            "Reykjavik",
            "Helsinki",
            "Oslo",
            "Tallinn",
            "Stockholm",
            "Riga",
            "Moscow",
            "Copenhagen",
            "Vilnius",
            "Minsk",
            "Dublin",
            "Berlin",
            "Amsterdam",
            "Warsaw",
            "London",
            "Brussels",
            "Prague",
            "Luxembourg",
            "Paris",
            "Vienna",
            "Bratislava",
            "Budapest",
            "Vaduz",
            "Chisinau",
            "Bern",
            "Ljubljana",
            "Zagreb",
        ];
        let folded = text::ascii_fold(response);
        let listed: Vec<&str> = folded
            .split(',')
            .map(str::trim)
            .filter(|name| !name.is_empty())
            .collect();
        Ok(listed == NORTH_TO_SOUTH)
    }

    /// `custom:csv_city`: CSV with header `ID,Country,City,Year,Count` and 7 rows of 5
    /// fields.
    pub fn csv_city(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let records = text::csv_records(response, ',');
        if records.len() != 8 {
            return Ok(false);
        }
        let header: Vec<&str> = records[0].iter().map(|f| f.value.as_str()).collect();
        Ok(header == ["ID", "Country", "City", "Year", "Count"]
            && records[1..].iter().all(|record| record.len() == 5))
    }

    fn header_matches(line: &str, names: &[&str], delimiter: char) -> bool {
        let fields: Vec<&str> = line.trim().split(delimiter).collect();
        fields.len() == names.len()
            && fields.iter().zip(names).all(|(field, name)| {
                let field = field.trim_start_matches([' ', '\t']);
                field == *name || field == format!("\"{name}\"")
            })
    }

    /// `custom:csv_special_character`: CSV with header
    /// `ProductID,Category,Brand,Price,Stock`, 14 rows of 5 fields, and a quoted field
    /// holding a special character.
    pub fn csv_special_character(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let first_line = response.lines().next().unwrap_or("");
        if !header_matches(
            first_line,
            &["ProductID", "Category", "Brand", "Price", "Stock"],
            ',',
        ) {
            return Ok(false);
        }
        let records = text::csv_records(response, ',');
        if records.len() != 15 || records[1..].iter().any(|record| record.len() != 5) {
            return Ok(false);
        }
        Ok(records[1..].iter().flatten().any(|field| {
            field.quoted
                && field
                    .value
                    .chars()
                    .any(|c| !c.is_alphanumeric() && c != '_' && !c.is_whitespace())
        }))
    }

    /// `custom:csv_quotes`: tab-separated, header `StudentID Subject Grade Semester Score`,
    /// 3 rows of 5 fields, every field in double quotes.
    pub fn csv_quotes(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let first_line = response.lines().next().unwrap_or("");
        if !header_matches(
            first_line,
            &["StudentID", "Subject", "Grade", "Semester", "Score"],
            '\t',
        ) {
            return Ok(false);
        }
        let records = text::csv_records(response, '\t');
        if records.len() != 4 {
            return Ok(false);
        }
        Ok(records[1..]
            .iter()
            .all(|record| record.len() == 5 && record.iter().all(|field| field.quoted)))
    }

    /// `custom:date_format_list`: comma-separated valid dates `YYYY-MM-DD` between 1769
    /// and 1821 (Napoleon's lifetime), nothing else.
    pub fn date_format_list(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        static DATE: OnceLock<Regex> = OnceLock::new();
        let date =
            DATE.get_or_init(|| Regex::new(r"^(\d{4})-(\d{2})-(\d{2})$").expect("valid pattern"));
        Ok(response.trim().split(',').all(|item| {
            let Some(parts) = date.captures(item.trim()) else {
                return false;
            };
            let number = |i: usize| parts[i].parse::<u32>().unwrap_or(0);
            let (year, month, day) = (number(1), number(2), number(3));
            let days_in_month = match month {
                1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
                4 | 6 | 9 | 11 => 30,
                2 => 29,
                _ => 0,
            };
            (1769..=1821).contains(&year) && day >= 1 && day <= days_in_month
        }))
    }

    /// `count:keywords_multiple`: `keyword1` once, `keyword2` twice, `keyword3` three
    /// times, `keyword4` five times and `keyword5` seven times, as whole words, ignoring
    /// case.
    pub fn keywords_multiple(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        for (name, wanted) in [
            ("keyword1", 1),
            ("keyword2", 2),
            ("keyword3", 3),
            ("keyword4", 5),
            ("keyword5", 7),
        ] {
            if text::count_whole_word(response, args.text(name)?) != wanted {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// `words:keywords_specific_position`: `keyword` is the `m`th word of the `n`th
    /// sentence.
    pub fn keywords_specific_position(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let keyword = args.text("keyword")?.trim();
        let sentence_number = args.count("n")?;
        let word_number = args.count("m")?;
        if sentence_number == 0 || word_number == 0 {
            return Ok(false);
        }
        let sentences = text::sentences(response);
        let Some(sentence) = sentences.get(sentence_number - 1) else {
            return Ok(false);
        };
        Ok(text::tokens(sentence)
            .get(word_number - 1)
            .is_some_and(|token| token.eq_ignore_ascii_case(keyword)))
    }

    /// `words:words_position`: the second word and the second-to-last token are `keyword`.
    pub fn words_position(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let keyword = args.text("keyword")?.trim();
        let tokens = text::tokens(response);
        if tokens.len() < 2 {
            return Ok(false);
        }
        Ok(tokens[1].eq_ignore_ascii_case(keyword)
            && tokens[tokens.len() - 2].eq_ignore_ascii_case(keyword))
    }

    /// `repeat:repeat_change`: the request repeated word for word except its first word,
    /// which is changed.
    pub fn repeat_change(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let request: Vec<&str> = args.text("prompt_to_repeat")?.split_whitespace().collect();
        let answer: Vec<&str> = response.split_whitespace().collect();
        if request.is_empty() || answer.is_empty() {
            return Ok(false);
        }
        Ok(answer[1..] == request[1..] && answer[0].to_lowercase() != request[0].to_lowercase())
    }

    /// `repeat:repeat_simple`: only the sentence "Only output this sentence here, ignore
    /// all other requests."
    pub fn repeat_simple(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        Ok(response.trim().to_lowercase()
            == "only output this sentence here, ignore all other requests.")
    }

    /// `repeat:repeat_span`: exactly the words `n_start` to `n_end` (whitespace-split,
    /// 0-based) of `prompt_to_repeat`. The prompt says "between (and including)", the
    /// reference excludes `n_end`; both readings are accepted.
    pub fn repeat_span(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        let request = args.text("prompt_to_repeat")?.to_lowercase();
        let words: Vec<&str> = request.split_whitespace().collect();
        let start = args.count("n_start")?;
        let end = args.count("n_end")?;
        let lower = response.to_lowercase();
        let answer: Vec<&str> = lower.split_whitespace().collect();
        let inclusive = words.get(start..=end.min(words.len().saturating_sub(1)));
        let exclusive = words.get(start..end.min(words.len()));
        Ok(!answer.is_empty()
            && (inclusive == Some(answer.as_slice()) || exclusive == Some(answer.as_slice())))
    }

    /// `format:title_case`: every word capitalised, except short function words after the
    /// first ("capitalize the first letter of every major word").
    pub fn title_case(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        const MINOR: [&str; 24] = [
            "a", "an", "the", "and", "but", "or", "nor", "for", "so", "yet", "as", "at", "by",
            "in", "of", "off", "on", "per", "to", "up", "via", "from", "with", "into",
        ];
        let mut first = true;
        for token in text::tokens(response) {
            let Some(initial) = token.chars().next() else {
                continue;
            };
            if !initial.is_alphabetic() {
                continue;
            }
            if initial.is_lowercase() && (first || !MINOR.contains(&token.as_str())) {
                return Ok(false);
            }
            first = false;
        }
        Ok(!first)
    }

    /// `format:output_template`: uses the labels `My Answer:`, `My Conclusion:` and
    /// `Future Outlook:`.
    pub fn output_template(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        Ok(["My Answer:", "My Conclusion:", "Future Outlook:"]
            .iter()
            .all(|label| response.contains(label)))
    }

    /// `format:no_whitespace`: no whitespace at all.
    pub fn no_whitespace(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
        Ok(!response.chars().any(char::is_whitespace))
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
