//! Text processing shared by the verifiers: words, sentences, tokens, punctuation, emoji,
//! a small CSV reader and English stop words.

use std::collections::HashSet;
use std::sync::OnceLock;

use regex::Regex;

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

/// The response lowercased, without ASCII punctuation, split at whitespace.
pub fn lower_words_without_punct(response: &str) -> Vec<String> {
    remove_punct(&response.to_lowercase())
        .split_whitespace()
        .map(str::to_string)
        .collect()
}
