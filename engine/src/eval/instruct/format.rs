//! Verifiers of IFBench's `format:` instructions: layout and markup (lists and bullets, newlines,
//! indentation, brackets and quotes, emoji, options, templates, title case, no whitespace).

use std::sync::OnceLock;

use regex::Regex;

use super::text::{self, strip_punct};
use super::{Args, KwargError};

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
    let tail =
        normal.trim_end_matches(|c: char| c.is_ascii_digit() || (text::is_punct(c) && c != '"'));
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

/// `format:title_case`: every word capitalised, except short function words after the
/// first ("capitalize the first letter of every major word").
pub fn title_case(_: &Args<'_>, response: &str) -> Result<bool, KwargError> {
    const MINOR: [&str; 24] = [
        "a", "an", "the", "and", "but", "or", "nor", "for", "so", "yet", "as", "at", "by", "in",
        "of", "off", "on", "per", "to", "up", "via", "from", "with", "into",
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
