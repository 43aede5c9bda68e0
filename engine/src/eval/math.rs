//! Exact-match scoring of GSM-style answers: the final number of a model's answer against
//! the gold number.
//!
//! The final number is the one after the last `####` marker when there is one, else the
//! last number anywhere in the text. Numbers are compared in a normalised decimal form:
//! thousands separators, currency and percent signs, a leading `+`, leading zeros and
//! trailing fractional zeros do not matter (`$1,200.50` equals `1200.5`, `42.0` equals `42`).

use std::sync::OnceLock;

use regex::Regex;

/// The marker GSM8K-style solutions put before their final answer.
pub const ANSWER_MARKER: &str = "####";

fn number_pattern() -> &'static Regex {
    static PATTERN: OnceLock<Regex> = OnceLock::new();
    PATTERN.get_or_init(|| {
        // Optional sign, optional currency sign, then either digits grouped by commas in
        // threes or a plain run of digits, an optional fraction, and an optional percent.
        Regex::new(r"[-+−]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?%?|[-+−]?\$?\.\d+%?")
            .expect("the number pattern is valid")
    })
}

/// The final number of an answer, as written (not normalised), or `None` if it has none.
pub fn extract_final_number(answer: &str) -> Option<&str> {
    let region = match answer.rfind(ANSWER_MARKER) {
        Some(at) => {
            let after = &answer[at + ANSWER_MARKER.len()..];
            // After the marker the first number is the answer ("#### 42 apples, 3 left").
            if let Some(found) = number_pattern().find(after) {
                return Some(found.as_str());
            }
            // A marker with no number after it: fall back to the whole text.
            answer
        }
        None => answer,
    };
    number_pattern()
        .find_iter(region)
        .last()
        .map(|m| m.as_str())
}

/// Normalises a written number to a canonical decimal string: `"$1,200.50"` → `"1200.5"`,
/// `"-0.0"` → `"0"`, `"007"` → `"7"`, `"25%"` → `"25"`. `None` if it is not a number.
pub fn normalise_number(written: &str) -> Option<String> {
    let mut text = written.trim();
    let mut negative = false;
    if let Some(rest) = text.strip_prefix('-').or_else(|| text.strip_prefix('−')) {
        negative = true;
        text = rest;
    } else if let Some(rest) = text.strip_prefix('+') {
        text = rest;
    }
    let text = text.trim_start_matches('$').trim_end_matches('%');
    let digits: String = text.chars().filter(|&c| c != ',').collect();
    let (integer, fraction) = match digits.split_once('.') {
        Some((integer, fraction)) => (integer, fraction),
        None => (digits.as_str(), ""),
    };
    let all_digits = |part: &str| part.chars().all(|c| c.is_ascii_digit());
    if (integer.is_empty() && fraction.is_empty()) || !all_digits(integer) || !all_digits(fraction)
    {
        return None;
    }
    let integer = integer.trim_start_matches('0');
    let fraction = fraction.trim_end_matches('0');
    let integer = if integer.is_empty() { "0" } else { integer };
    let magnitude = if fraction.is_empty() {
        integer.to_string()
    } else {
        format!("{integer}.{fraction}")
    };
    if negative && magnitude != "0" {
        Some(format!("-{magnitude}"))
    } else {
        Some(magnitude)
    }
}

/// The normalised final number of an answer.
pub fn final_answer(answer: &str) -> Option<String> {
    extract_final_number(answer).and_then(normalise_number)
}

/// The verdict on one answer.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MathVerdict {
    /// The normalised number found in the model's answer, if any.
    pub predicted: Option<String>,
    /// The normalised gold number.
    pub gold: String,
    /// Whether they are equal.
    pub correct: bool,
}

/// The gold answer could not be read as a number.
#[derive(Debug, thiserror::Error)]
#[error("gold answer {gold:?} has no number")]
pub struct GoldError {
    /// The gold answer as given.
    pub gold: String,
}

/// Scores a model's answer against the gold answer (either a bare number or a full solution
/// ending in `#### N`).
pub fn score_answer(model_answer: &str, gold: &str) -> Result<MathVerdict, GoldError> {
    let gold_number = final_answer(gold).ok_or_else(|| GoldError {
        gold: gold.to_string(),
    })?;
    let predicted = final_answer(model_answer);
    let correct = predicted.as_deref() == Some(gold_number.as_str());
    Ok(MathVerdict {
        predicted,
        gold: gold_number,
        correct,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_wins_over_later_numbers() {
        let answer = "She has 3 + 4 = 7 apples.\n#### 7\nThat took 2 steps.";
        assert_eq!(extract_final_number(answer), Some("7"));
        assert_eq!(final_answer(answer).as_deref(), Some("7"));
    }

    #[test]
    fn last_number_without_marker() {
        let answer = "First 12 then 30, so the answer is 42.";
        assert_eq!(extract_final_number(answer), Some("42"));
    }

    #[test]
    fn marker_without_number_falls_back_to_last_number() {
        assert_eq!(final_answer("It is 5.\n####").as_deref(), Some("5"));
    }

    #[test]
    fn no_number_is_none() {
        assert_eq!(final_answer("I cannot tell."), None);
        assert_eq!(final_answer(""), None);
    }

    #[test]
    fn normalisation() {
        assert_eq!(normalise_number("1,234").as_deref(), Some("1234"));
        assert_eq!(normalise_number("$1,200.50").as_deref(), Some("1200.5"));
        assert_eq!(normalise_number("42.0").as_deref(), Some("42"));
        assert_eq!(normalise_number("42.000").as_deref(), Some("42"));
        assert_eq!(normalise_number("25%").as_deref(), Some("25"));
        assert_eq!(normalise_number("-3").as_deref(), Some("-3"));
        assert_eq!(normalise_number("+3").as_deref(), Some("3"));
        assert_eq!(normalise_number("-0.0").as_deref(), Some("0"));
        assert_eq!(normalise_number("007").as_deref(), Some("7"));
        assert_eq!(normalise_number(".5").as_deref(), Some("0.5"));
        assert_eq!(normalise_number("abc"), None);
        assert_eq!(normalise_number("1.2.3"), None);
    }

    #[test]
    fn thousands_and_money_in_text() {
        let answer = "The total cost is $1,250.00 for the year.";
        assert_eq!(final_answer(answer).as_deref(), Some("1250"));
        // A comma that separates items is not a thousands separator.
        assert_eq!(final_answer("The values are 3, 45").as_deref(), Some("45"));
    }

    #[test]
    fn negative_and_sentence_final_period() {
        assert_eq!(
            final_answer("The temperature fell to -12.").as_deref(),
            Some("-12")
        );
        assert_eq!(final_answer("#### −4").as_deref(), Some("-4"));
    }

    #[test]
    fn scoring_against_gold() {
        let verdict = score_answer("so 6 * 7 = 42\n#### 42", "#### 42").unwrap();
        assert!(verdict.correct);
        assert_eq!(verdict.gold, "42");
        let verdict = score_answer("The answer is 41.", "42").unwrap();
        assert!(!verdict.correct);
        assert_eq!(verdict.predicted.as_deref(), Some("41"));
        let verdict = score_answer("The answer is 1,000.0", "1000").unwrap();
        assert!(verdict.correct);
        let verdict = score_answer("no idea", "7").unwrap();
        assert!(!verdict.correct);
        assert_eq!(verdict.predicted, None);
    }

    #[test]
    fn gold_without_number_is_an_error() {
        let error = score_answer("7", "seven").unwrap_err();
        assert!(error.to_string().contains("seven"));
    }
}
