//! Verifiers of IFBench's `repeat:` instructions: repeating (part of) the request, or a fixed
//! sentence.

use super::{Args, KwargError};

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
