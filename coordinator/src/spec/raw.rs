//! YAML text to a tree of located nodes, and the small readers the validator uses on it.
//!
//! saphyr parses the text (YAML 1.2 core schema, duplicate keys rejected) into marked nodes;
//! we copy them into [`Node`], a plain tree where every node and every mapping key carries
//! its 1-based line and column, and where tags and odd keys are already reported. All errors
//! go to a [`Context`], which collects them (deduplicated) with the file name.

use std::collections::HashSet;

use saphyr::{LoadableYamlNode, MarkedYamlOwned, ScalarOwned, YamlDataOwned};

use super::SpecError;

/// Nesting deeper than this is refused (no sweep file needs more than a handful of levels).
const MAX_DEPTH: usize = 32;

/// A place in the file: 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct Loc {
    pub line: usize,
    pub column: usize,
}

impl Loc {
    const START: Loc = Loc { line: 1, column: 1 };

    fn of(marker: &saphyr::Marker) -> Loc {
        Loc {
            line: marker.line().max(1),
            column: marker.col() + 1,
        }
    }
}

/// A YAML value; `Invalid` marks a node whose error was already reported.
#[derive(Debug, Clone)]
pub(crate) enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    Seq(Vec<Node>),
    Map(Vec<Entry>),
    Invalid,
}

/// A located YAML node.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    pub loc: Loc,
    pub value: Value,
}

/// One `key: value` of a mapping.
#[derive(Debug, Clone)]
pub(crate) struct Entry {
    pub key: String,
    pub key_loc: Loc,
    pub value: Node,
}

/// Where errors go: the file's name and every error found so far.
pub(crate) struct Context {
    file: String,
    errors: Vec<SpecError>,
    seen: HashSet<String>,
    check_paths: bool,
}

impl Context {
    pub fn new(file: &str) -> Context {
        Context {
            file: file.to_string(),
            errors: Vec::new(),
            seen: HashSet::new(),
            check_paths: true,
        }
    }

    /// Resolves relative paths but does not look for them on disk (the text came from
    /// another machine).
    pub fn without_path_checks(mut self) -> Context {
        self.check_paths = false;
        self
    }

    /// The file named in errors.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// Whether paths are checked on disk.
    pub fn checks_paths(&self) -> bool {
        self.check_paths
    }

    /// Records an error (once: the same message at the same place is kept only once).
    pub fn error(
        &mut self,
        loc: Loc,
        path: &str,
        expected: impl Into<String>,
        found: impl Into<String>,
    ) {
        let error = SpecError {
            file: self.file.clone(),
            line: loc.line,
            column: loc.column,
            path: if path.is_empty() {
                "(root)".to_string()
            } else {
                path.to_string()
            },
            expected: expected.into(),
            found: found.into(),
        };
        if self.seen.insert(error.to_string()) {
            self.errors.push(error);
        }
    }

    pub fn error_count(&self) -> usize {
        self.errors.len()
    }

    pub fn into_errors(self) -> Vec<SpecError> {
        self.errors
    }
}

/// Parses the text into its single document. `None` after reporting an error.
pub(crate) fn load(text: &str, context: &mut Context) -> Option<Node> {
    let documents = match MarkedYamlOwned::load_from_str(text) {
        Ok(documents) => documents,
        Err(scan_error) => {
            context.error(
                Loc::of(scan_error.marker()),
                "(yaml)",
                "well-formed YAML",
                scan_error.info().to_string(),
            );
            return None;
        }
    };
    let mut documents = documents.into_iter();
    let Some(first) = documents.next() else {
        context.error(
            Loc::START,
            "",
            "a mapping of sweep settings",
            "an empty document",
        );
        return None;
    };
    if let Some(second) = documents.next() {
        let count = 2 + documents.count();
        context.error(
            Loc::of(&second.span.start),
            "",
            "a single YAML document",
            format!("{count} documents"),
        );
        return None;
    }
    Some(convert(first, "", 0, context))
}

fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

/// The path of a mapping entry.
pub(crate) fn key_path(parent: &str, key: &str) -> String {
    join_key(parent, key)
}

/// The path of a list element.
pub(crate) fn index_path(parent: &str, index: usize) -> String {
    format!("{parent}[{index}]")
}

fn convert(node: MarkedYamlOwned, path: &str, depth: usize, context: &mut Context) -> Node {
    let loc = Loc::of(&node.span.start);
    if depth > MAX_DEPTH {
        context.error(
            loc,
            path,
            format!("at most {MAX_DEPTH} levels of nesting"),
            "deeper nesting",
        );
        return Node {
            loc,
            value: Value::Invalid,
        };
    }
    let value = match node.data {
        YamlDataOwned::Value(scalar) => match scalar {
            ScalarOwned::Null => Value::Null,
            ScalarOwned::Boolean(value) => Value::Bool(value),
            ScalarOwned::Integer(value) => Value::Int(value),
            ScalarOwned::FloatingPoint(value) => Value::Float(value.into_inner()),
            ScalarOwned::String(value) => Value::Str(value),
        },
        YamlDataOwned::Representation(text, _, _) => Value::Str(text),
        YamlDataOwned::Sequence(items) => Value::Seq(
            items
                .into_iter()
                .enumerate()
                .map(|(index, item)| convert(item, &index_path(path, index), depth + 1, context))
                .collect(),
        ),
        YamlDataOwned::Mapping(mapping) => {
            let mut entries = Vec::with_capacity(mapping.len());
            for (key, value) in mapping {
                let key_loc = Loc::of(&key.span.start);
                let key_text = match key.data {
                    YamlDataOwned::Value(ScalarOwned::String(text)) => Some(text),
                    YamlDataOwned::Value(ScalarOwned::Integer(number)) => Some(number.to_string()),
                    YamlDataOwned::Value(ScalarOwned::Boolean(flag)) => Some(flag.to_string()),
                    YamlDataOwned::Value(ScalarOwned::FloatingPoint(number)) => {
                        Some(number.into_inner().to_string())
                    }
                    _ => None,
                };
                let Some(key_text) = key_text else {
                    context.error(
                        key_loc,
                        path,
                        "a plain name as mapping key",
                        "a complex key",
                    );
                    continue;
                };
                let child_path = join_key(path, &key_text);
                entries.push(Entry {
                    value: convert(value, &child_path, depth + 1, context),
                    key: key_text,
                    key_loc,
                });
            }
            Value::Map(entries)
        }
        YamlDataOwned::Tagged(tag, _) => {
            context.error(loc, path, "a plain value", format!("the YAML tag `{tag}`"));
            Value::Invalid
        }
        YamlDataOwned::Alias(_) | YamlDataOwned::BadValue => {
            context.error(
                loc,
                path,
                "a value",
                "something that is not one (a bad tag or an unknown alias)",
            );
            Value::Invalid
        }
    };
    Node { loc, value }
}

/// A short description of a node for "found …".
pub(crate) fn describe(node: &Node) -> String {
    match &node.value {
        Value::Null => "nothing (null)".to_string(),
        Value::Bool(value) => format!("boolean {value}"),
        Value::Int(value) => format!("integer {value}"),
        Value::Float(value) => format!("number {value}"),
        Value::Str(text) => {
            let shown: String = text.chars().take(60).collect();
            if shown.len() < text.len() {
                format!("string \"{shown}…\"")
            } else {
                format!("string \"{shown}\"")
            }
        }
        Value::Seq(items) if items.is_empty() => "an empty list".to_string(),
        Value::Seq(items) => format!("a list of {}", items.len()),
        Value::Map(_) => "a mapping".to_string(),
        Value::Invalid => "an invalid value".to_string(),
    }
}

/// The levenshtein distance, for "did you mean" hints.
fn edit_distance(left: &str, right: &str) -> usize {
    let right: Vec<char> = right.chars().collect();
    let mut previous: Vec<usize> = (0..=right.len()).collect();
    for (i, left_char) in left.chars().enumerate() {
        let mut current = vec![i + 1; right.len() + 1];
        for (j, right_char) in right.iter().enumerate() {
            let substitution = previous[j] + usize::from(left_char != *right_char);
            current[j + 1] = substitution.min(previous[j + 1] + 1).min(current[j] + 1);
        }
        previous = current;
    }
    previous[right.len()]
}

/// The closest allowed name, if close enough to be a likely typo.
pub(crate) fn suggestion<'a>(name: &str, allowed: &[&'a str]) -> Option<&'a str> {
    allowed
        .iter()
        .map(|candidate| (edit_distance(name, candidate), *candidate))
        .filter(|(distance, candidate)| {
            *distance <= 2.max(candidate.len() / 4)
                || (name.len() >= 4 && candidate.starts_with(name))
        })
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// The entries of a mapping node, with every key not in `allowed` reported. `None` (after
/// an error) when the node is not a mapping. `what` describes the mapping for the error.
pub(crate) fn mapping<'n>(
    context: &mut Context,
    node: &'n Node,
    path: &str,
    what: &str,
    allowed: &[&str],
) -> Option<&'n [Entry]> {
    let entries = match &node.value {
        Value::Map(entries) => entries,
        Value::Invalid => return None,
        _ => {
            context.error(node.loc, path, what, describe(node));
            return None;
        }
    };
    for entry in entries {
        if allowed.contains(&entry.key.as_str()) {
            continue;
        }
        let hint = match suggestion(&entry.key, allowed) {
            Some(close) => format!(" (did you mean `{close}`?)"),
            None => String::new(),
        };
        context.error(
            entry.key_loc,
            &join_key(path, &entry.key),
            format!("one of the keys {}", allowed.join(", ")),
            format!("unknown key `{}`{hint}", entry.key),
        );
    }
    Some(entries)
}

/// The entry of a key, if present.
pub(crate) fn find<'n>(entries: &'n [Entry], key: &str) -> Option<&'n Entry> {
    entries.iter().find(|entry| entry.key == key)
}

/// The items of a list node. `None` (after an error) when it is not a list, or when it is
/// empty and `non_empty` is asked.
pub(crate) fn list<'n>(
    context: &mut Context,
    node: &'n Node,
    path: &str,
    what: &str,
    non_empty: bool,
) -> Option<&'n [Node]> {
    match &node.value {
        Value::Seq(items) if items.is_empty() && non_empty => {
            context.error(
                node.loc,
                path,
                format!("a non-empty {what}"),
                "an empty list",
            );
            None
        }
        Value::Seq(items) => Some(items),
        Value::Invalid => None,
        _ => {
            context.error(node.loc, path, what, describe(node));
            None
        }
    }
}

/// A whole number in `min..=max`.
pub(crate) fn integer(
    context: &mut Context,
    node: &Node,
    path: &str,
    min: u64,
    max: u64,
) -> Option<u64> {
    let expected = if max == u64::MAX || max >= i64::MAX as u64 {
        format!("an integer ≥ {min}")
    } else {
        format!("an integer from {min} to {max}")
    };
    match node.value {
        Value::Int(value) => match u64::try_from(value) {
            Ok(value) if (min..=max).contains(&value) => Some(value),
            _ => {
                context.error(node.loc, path, expected, describe(node));
                None
            }
        },
        Value::Invalid => None,
        _ => {
            context.error(node.loc, path, expected, describe(node));
            None
        }
    }
}

/// The bounds of a number field.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct FloatRange {
    pub min: f64,
    pub min_inclusive: bool,
    pub max: f64,
    pub max_inclusive: bool,
}

impl FloatRange {
    pub fn contains(&self, value: f64) -> bool {
        let above = if self.min_inclusive {
            value >= self.min
        } else {
            value > self.min
        };
        let below = if self.max_inclusive {
            value <= self.max
        } else {
            value < self.max
        };
        value.is_finite() && above && below
    }

    pub fn describe(&self) -> String {
        let low = if self.min_inclusive { "≥" } else { ">" };
        let high = if self.max_inclusive { "≤" } else { "<" };
        format!("a number {low} {} and {high} {}", self.min, self.max)
    }
}

/// A number (integers are accepted) within `range`.
pub(crate) fn number(
    context: &mut Context,
    node: &Node,
    path: &str,
    range: FloatRange,
) -> Option<f64> {
    let value = match node.value {
        Value::Int(value) => value as f64,
        Value::Float(value) => value,
        Value::Invalid => return None,
        _ => {
            context.error(node.loc, path, range.describe(), describe(node));
            return None;
        }
    };
    if range.contains(value) {
        Some(value)
    } else {
        context.error(node.loc, path, range.describe(), describe(node));
        None
    }
}

/// A string; `what` describes what it should be.
pub(crate) fn string<'n>(
    context: &mut Context,
    node: &'n Node,
    path: &str,
    what: &str,
) -> Option<&'n str> {
    match &node.value {
        Value::Str(text) => Some(text),
        Value::Invalid => None,
        _ => {
            context.error(node.loc, path, what, describe(node));
            None
        }
    }
}

/// `true` or `false`.
pub(crate) fn boolean(context: &mut Context, node: &Node, path: &str) -> Option<bool> {
    match node.value {
        Value::Bool(value) => Some(value),
        Value::Invalid => None,
        _ => {
            context.error(node.loc, path, "true or false", describe(node));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locations_are_one_based() {
        let mut context = Context::new("t.yaml");
        let root = load("a: 1\nb:\n  c: [x, 2]\n", &mut context).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        assert_eq!(entries[0].key_loc, Loc { line: 1, column: 1 });
        assert_eq!(entries[0].value.loc, Loc { line: 1, column: 4 });
        let Value::Map(inner) = &entries[1].value.value else {
            panic!("not a map")
        };
        assert_eq!(inner[0].key_loc, Loc { line: 3, column: 3 });
        let Value::Seq(items) = &inner[0].value.value else {
            panic!("not a list")
        };
        assert_eq!(
            items[1].loc,
            Loc {
                line: 3,
                column: 10
            }
        );
        assert!(matches!(items[1].value, Value::Int(2)));
    }

    #[test]
    fn quoted_numbers_stay_strings_and_floats_parse() {
        let mut context = Context::new("t.yaml");
        let root = load("a: \"8\"\nb: 2.0e-4\nc: 1e-3\n", &mut context).unwrap();
        let Value::Map(entries) = &root.value else {
            panic!("not a map")
        };
        assert!(matches!(&entries[0].value.value, Value::Str(text) if text == "8"));
        assert!(matches!(entries[1].value.value, Value::Float(value) if value == 2.0e-4));
        assert!(matches!(entries[2].value.value, Value::Float(value) if value == 1e-3));
    }

    #[test]
    fn suggestions_catch_typos_only() {
        assert_eq!(suggestion("rnak", &["rank", "alpha"]), Some("rank"));
        assert_eq!(
            suggestion("warmup", &["warmup_ratio", "lr"]),
            Some("warmup_ratio")
        );
        assert_eq!(suggestion("zzz", &["rank", "alpha"]), None);
        assert_eq!(
            suggestion("smollm2", &["smollm2-135m", "qwen2.5-coder-0.5b"]),
            Some("smollm2-135m")
        );
    }
}
