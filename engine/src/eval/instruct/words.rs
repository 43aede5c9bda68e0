//! Verifiers of IFBench's `words:` instructions: constraints on each word (letters, vowels,
//! consonants, lengths, palindromes, repeats) and on where words stand (positions, first and last
//! words).

use std::collections::{HashMap, HashSet};

use super::text::{self, lower_words_without_punct, strip_punct};
use super::{Args, KwargError};

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

/// `words:repeats`: no word more than `small_n` times.
pub fn repeats(args: &Args<'_>, response: &str) -> Result<bool, KwargError> {
    let limit = args.count("small_n")?;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for word in lower_words_without_punct(response) {
        *counts.entry(word).or_default() += 1;
    }
    Ok(counts.values().all(|&count| count <= limit))
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

/// `words:no_consecutive`: no two neighbouring words start with the same letter.
pub fn no_consecutive(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
    let firsts: Vec<char> = lower_words_without_punct(response)
        .iter()
        .filter_map(|word| word.chars().next())
        .collect();
    Ok(firsts.windows(2).all(|pair| pair[0] != pair[1]))
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
