//! The `math` task: GSM-style word problems from reasoning-gym's gsm_symbolic generators.
//!
//! The `gsm-symbolic` asset holds `train.jsonl` (2000 problems, seed 1) and `eval.jsonl`
//! (500 problems, seed 2), generated once by `engine/assets/gsm_symbolic.py`; no question
//! occurs in both. Train conversations are the question as the user turn and the worked
//! solution, ending `#### N`, as the assistant turn. Eval items carry the gold number.

use std::collections::HashSet;
use std::path::Path;

use serde::Deserialize;

use super::{asset_path, read_jsonl, EvalItem, FetchPolicy, MathItem, Metric, Task, TaskError};
use crate::assets::Cache;
use crate::data::{Conversation, Message, Role};

/// A line of the generated files.
#[derive(Debug, Deserialize)]
struct GsmRow {
    id: String,
    question: String,
    answer: String,
    messages: Vec<Message>,
}

/// Normalises a number as written in an answer: drops thousands separators and a `+`,
/// trailing zeros of a decimal part and a bare trailing `.`; `-0` becomes `0`.
pub fn normalize_number(text: &str) -> String {
    let mut number: String = text
        .trim()
        .chars()
        .filter(|c| *c != ',' && *c != '+')
        .collect();
    if number.contains('.') {
        number = number
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string();
    }
    if number.is_empty() || number == "-0" || number == "-" {
        return "0".to_string();
    }
    number
}

/// Loads the math task from the `gsm-symbolic` asset.
pub fn load(cache: &Cache, policy: FetchPolicy) -> Result<Task, TaskError> {
    let dir = asset_path(cache, "gsm-symbolic", policy)?;
    let train_rows = read_split(&dir.join("train.jsonl"))?;
    let eval_rows = read_split(&dir.join("eval.jsonl"))?;
    let eval_questions: HashSet<&str> = eval_rows.iter().map(|row| row.question.as_str()).collect();
    if let Some(shared) = train_rows
        .iter()
        .find(|row| eval_questions.contains(row.question.as_str()))
    {
        return Err(TaskError::Invalid {
            path: dir.join("train.jsonl"),
            detail: format!(
                "{} repeats an eval question; the asset is damaged, remove it and fetch again",
                shared.id
            ),
        });
    }
    let train = train_rows
        .iter()
        .map(|row| Conversation {
            messages: row.messages.clone(),
        })
        .collect();
    let eval = eval_rows
        .into_iter()
        .map(|row| {
            let solution = row
                .messages
                .into_iter()
                .find(|m| m.role == Role::Assistant)
                .map(|m| m.content)
                .unwrap_or_default();
            EvalItem::Math(MathItem {
                id: row.id,
                question: row.question,
                gold: normalize_number(&row.answer),
                solution,
            })
        })
        .collect();
    Ok(Task {
        name: "math".into(),
        description: "grade-school math word problems from gsm_symbolic generators".into(),
        metric: Metric::NumberMatch,
        source: format!("reasoning-gym gsm_symbolic ({})", dir.display()),
        train,
        eval,
        notes: Vec::new(),
    })
}

/// Reads one split, checking each row: a user question and an assistant solution whose last
/// line is `#### answer`.
fn read_split(path: &Path) -> Result<Vec<GsmRow>, TaskError> {
    let rows = read_jsonl::<GsmRow>(path)?;
    if rows.is_empty() {
        return Err(TaskError::Invalid {
            path: path.to_path_buf(),
            detail: "no problems".into(),
        });
    }
    let mut checked = Vec::with_capacity(rows.len());
    for (line, row) in rows {
        let invalid = |detail: String| TaskError::InvalidLine {
            path: path.to_path_buf(),
            line,
            detail,
        };
        let shape_ok = row.messages.len() == 2
            && row.messages[0].role == Role::User
            && row.messages[1].role == Role::Assistant
            && row.messages[0].content == row.question;
        if !shape_ok {
            return Err(invalid(
                "`messages` should be the question as a user turn and one assistant turn".into(),
            ));
        }
        let final_line = row.messages[1].content.lines().last().unwrap_or_default();
        let final_number = final_line.trim().strip_prefix("####").map(normalize_number);
        if final_number.as_deref() != Some(normalize_number(&row.answer).as_str()) {
            return Err(invalid(format!(
                "the solution should end `#### {}`, it ends {final_line:?}",
                row.answer
            )));
        }
        checked.push(row);
    }
    Ok(checked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_normalise() {
        assert_eq!(normalize_number("1,234"), "1234");
        assert_eq!(normalize_number(" 12.50 "), "12.5");
        assert_eq!(normalize_number("12.0"), "12");
        assert_eq!(normalize_number("12."), "12");
        assert_eq!(normalize_number("-0.0"), "0");
        assert_eq!(normalize_number("+7"), "7");
        assert_eq!(normalize_number("-3"), "-3");
        assert_eq!(normalize_number("100"), "100");
    }
}
