//! Verifiers of IFBench's `count:` instructions: how many words, distinct words, numbers, names,
//! pronouns, conjunctions, keywords and punctuation marks a response uses, and Japanese words in
//! it.

use std::collections::HashSet;
use std::sync::OnceLock;

use regex::Regex;

use super::text::{self, lower_words_without_punct, strip_punct};
use super::{Args, KwargError};

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

/// `count:numbers`: exactly `N` numbers (punctuation removed first, so `3.14` and
/// `1,000` are one number each).
pub fn numbers(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
    static DIGITS: OnceLock<Regex> = OnceLock::new();
    let digits = DIGITS.get_or_init(|| Regex::new(r"\d+").expect("valid pattern"));
    let count = digits.find_iter(&text::remove_punct(response)).count();
    Ok(count == args.count("N")?)
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
