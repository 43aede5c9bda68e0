//! Verifiers of IFBench's `sentence:` instructions: how sentences relate to each other (growing
//! word counts and alliteration) and a keyword in a given sentence.

use super::text;
use super::{Args, KwargError};

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
