//! Verifiers of IFBench's `ratio:` instructions: proportions within a response (stop words,
//! sentence types, sentence lengths, overlap with a reference text).

use std::collections::HashSet;

use super::text;
use super::{Args, KwargError};

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
