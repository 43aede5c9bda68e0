//! Verifiers of IFBench's `custom:` instructions: tasks with one fixed answer (multiples, reversed
//! text, sorted countries and capitals, multiple-choice questions, CSV tables, date lists).

use std::sync::OnceLock;

use regex::Regex;

use super::text::{self, lower_words_without_punct, strip_punct};
use super::{Args, KwargError};

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
    let option = OPTION.get_or_init(|| Regex::new(r"^[A-Ea-e][.)]\s*\w+").expect("valid pattern"));
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
