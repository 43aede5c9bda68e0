//! Placements: which modules get an adapter, and their one grammar.
//!
//! ```text
//! all | dominant[@RULE] | dominant:KIND[@RULE] | top_k:N[@RULE] | ranked:N[@RULE]
//!     | random:N | kind:KIND | explicit:NAME[,NAME…] | budget_matched:PARAMS[@RULE]
//! KIND   = q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj
//! NAME   = layers.L.self_attn.{q,k,v,o}_proj | layers.L.mlp.{gate,up,down}_proj
//! PARAMS = an integer, optionally with a k or M suffix (50k, 1.5M)
//! RULE   = page | grad | grad-rank | act | kappa | random      (page when left out)
//! ```
//!
//! | placement | modules |
//! |---|---|
//! | `all` | every projection of every layer (vanilla LoRA) |
//! | `dominant` | the argmax of the rule's score, PAGE by default (DomLoRA) |
//! | `dominant:KIND` | the argmax among one kind, e.g. `dominant:down_proj` |
//! | `top_k:N` | the N highest scores |
//! | `ranked:N` | the one module the rule ranks N-th (`ranked:1` is the argmax) |
//! | `random:N` | N modules drawn uniformly, seeded (the control) |
//! | `kind:KIND` | one kind in every layer |
//! | `explicit:NAME[,NAME…]` | the listed modules, e.g. `layers.3.mlp.down_proj` |
//! | `budget_matched:PARAMS` | the argmax, at the rank whose trainable parameters come closest to PARAMS |
//!
//! The five placements that read a probe take the rule that scores the modules after `@`
//! (`dominant@grad`, `top_k:4@act`, `ranked:3@kappa`, `dominant:down_proj@page`); without it they read PAGE, and
//! a PAGE placement prints without `@page`, so the forms written before rules existed keep
//! their text (and their job keys).

use std::fmt;
use std::str::FromStr;

use crate::vocab::{ModuleId, ModuleKind, Rule};

/// Which modules get an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Every module kind in every layer (vanilla LoRA).
    All,
    /// The argmax of the rule's score (DomLoRA with PAGE).
    Dominant(Rule),
    /// The argmax among modules of one kind.
    DominantKind(ModuleKind, Rule),
    /// The N modules with the highest scores.
    TopK(usize, Rule),
    /// The one module ranked N-th (1 = the argmax): the single-module adapters of a
    /// validity panel.
    Ranked(usize, Rule),
    /// N modules drawn at random with the train seed (the control).
    Random(usize),
    /// One module kind in every layer.
    Kind(ModuleKind),
    /// The listed modules (no repeats, order kept).
    Explicit(Vec<ModuleId>),
    /// The argmax of the rule's score, at the rank whose trainable parameters come closest
    /// to this target.
    BudgetMatched(u64, Rule),
}

/// Why a text is not a placement. [`fmt::Display`] says what was expected there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PlacementSyntaxError {
    /// Not one of the placement names, or a name with a wrong argument.
    Unknown,
    /// `HEAD:` followed by something that is not a module kind.
    UnknownKind {
        /// The placement name before the colon.
        head: String,
    },
    /// `HEAD:` followed by something that is not a count ≥ 1.
    BadCount {
        /// The placement name before the colon.
        head: String,
    },
    /// A placement that needs an argument, without one.
    MissingArgument {
        /// The placement name.
        head: String,
    },
    /// A name in `explicit:` that is not a module name.
    BadModule {
        /// The name as written.
        name: String,
        /// What was expected instead.
        expected: String,
    },
    /// A module listed twice in `explicit:`.
    Repeated {
        /// The module.
        module: ModuleId,
    },
    /// `budget_matched:` with something that is not a parameter count.
    BadBudget,
    /// `@` followed by something that is not a rule.
    UnknownRule {
        /// The text after `@`.
        found: String,
    },
    /// `@RULE` after a placement that reads no probe.
    RuleWithoutProbe {
        /// The placement before `@`.
        placement: String,
    },
}

const GRAMMAR: &str = "a placement: all, dominant, dominant:KIND, top_k:N, ranked:N, random:N, \
                       kind:KIND, explicit:NAME[,NAME…] or budget_matched:PARAMS (the ones \
                       that read a probe optionally followed by @RULE)";

impl fmt::Display for PlacementSyntaxError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown => formatter.write_str(GRAMMAR),
            Self::UnknownKind { head } => write!(
                formatter,
                "a module kind after `{head}:` ({})",
                ModuleKind::names_list()
            ),
            Self::BadCount { head } => write!(formatter, "a module count ≥ 1 after `{head}:`"),
            Self::MissingArgument { head } => match head.as_str() {
                "kind" => formatter.write_str("`kind:KIND` with a module kind"),
                "explicit" => formatter.write_str("`explicit:NAME[,NAME…]` with module names"),
                "budget_matched" => {
                    formatter.write_str("`budget_matched:PARAMS` with a parameter target")
                }
                _ => write!(formatter, "`{head}:N` with a module count N"),
            },
            Self::BadModule { expected, .. } => formatter.write_str(expected),
            Self::Repeated { module } => {
                write!(
                    formatter,
                    "each module once in explicit:, not {module} twice"
                )
            }
            Self::BadBudget => formatter.write_str(
                "a trainable-parameter target after `budget_matched:` (e.g. 50000, 50k or 1.5M)",
            ),
            Self::UnknownRule { found } => write!(
                formatter,
                "a placement rule after `@` ({}), not `{found}`",
                Rule::names_list()
            ),
            Self::RuleWithoutProbe { placement } => write!(
                formatter,
                "`@RULE` only after a placement that reads a probe (dominant, dominant:KIND, \
                 top_k:N, ranked:N, budget_matched:PARAMS), not after `{placement}`"
            ),
        }
    }
}

impl std::error::Error for PlacementSyntaxError {}

impl fmt::Display for Placement {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::All => write!(formatter, "all"),
            Placement::Dominant(_) => write!(formatter, "dominant"),
            Placement::DominantKind(kind, _) => write!(formatter, "dominant:{kind}"),
            Placement::TopK(count, _) => write!(formatter, "top_k:{count}"),
            Placement::Ranked(position, _) => write!(formatter, "ranked:{position}"),
            Placement::Random(count) => write!(formatter, "random:{count}"),
            Placement::Kind(kind) => write!(formatter, "kind:{kind}"),
            Placement::Explicit(names) => {
                write!(formatter, "explicit:")?;
                for (index, name) in names.iter().enumerate() {
                    if index > 0 {
                        write!(formatter, ",")?;
                    }
                    write!(formatter, "{name}")?;
                }
                Ok(())
            }
            Placement::BudgetMatched(params, _) => write!(formatter, "budget_matched:{params}"),
        }?;
        match self.rule() {
            Some(rule) if !rule.is_page() => write!(formatter, "@{rule}"),
            _ => Ok(()),
        }
    }
}

fn parse_decimal(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|byte| byte.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

/// A parameter count: digits, or a decimal with a `k` or `M` suffix.
fn parse_param_count(text: &str) -> Option<u64> {
    let (number, multiplier) = if let Some(number) = text.strip_suffix(['k', 'K']) {
        (number, 1_000.0)
    } else if let Some(number) = text.strip_suffix('M') {
        (number, 1_000_000.0)
    } else {
        return parse_decimal(text);
    };
    let valid = !number.is_empty()
        && number
            .bytes()
            .all(|byte| byte.is_ascii_digit() || byte == b'.')
        && number.bytes().filter(|byte| *byte == b'.').count() <= 1
        && number != ".";
    if !valid {
        return None;
    }
    let value: f64 = number.parse().ok()?;
    let count = (value * multiplier).round();
    (count.is_finite() && count < 1e15).then_some(count as u64)
}

impl FromStr for Placement {
    type Err = PlacementSyntaxError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let Some((body, rule)) = text.split_once('@') else {
            return Self::parse_body(text, Rule::Page);
        };
        let rule = Rule::from_name(rule).ok_or_else(|| PlacementSyntaxError::UnknownRule {
            found: rule.to_string(),
        })?;
        let placement = Self::parse_body(body, rule)?;
        if placement.rule().is_none() {
            return Err(PlacementSyntaxError::RuleWithoutProbe {
                placement: body.to_string(),
            });
        }
        Ok(placement)
    }
}

impl Placement {
    /// The grammar before `@`: the probe-reading placements read `rule`.
    fn parse_body(text: &str, rule: Rule) -> Result<Placement, PlacementSyntaxError> {
        let (head, argument) = match text.split_once(':') {
            Some((head, argument)) => (head, Some(argument)),
            None => (text, None),
        };
        let kind_of = |argument: &str| {
            ModuleKind::from_name(argument).ok_or_else(|| PlacementSyntaxError::UnknownKind {
                head: head.to_string(),
            })
        };
        let count_of = |argument: &str| match parse_decimal(argument) {
            Some(count) if (1..=u64::from(u32::MAX)).contains(&count) => Ok(count as usize),
            _ => Err(PlacementSyntaxError::BadCount {
                head: head.to_string(),
            }),
        };
        match (head, argument) {
            ("all", None) => Ok(Placement::All),
            ("dominant", None) => Ok(Placement::Dominant(rule)),
            ("dominant", Some(argument)) => Ok(Placement::DominantKind(kind_of(argument)?, rule)),
            ("top_k", Some(argument)) => Ok(Placement::TopK(count_of(argument)?, rule)),
            ("ranked", Some(argument)) => Ok(Placement::Ranked(count_of(argument)?, rule)),
            ("random", Some(argument)) => Ok(Placement::Random(count_of(argument)?)),
            ("kind", Some(argument)) => Ok(Placement::Kind(kind_of(argument)?)),
            ("explicit", Some(argument)) => {
                let mut names: Vec<ModuleId> = Vec::new();
                for piece in argument.split(',') {
                    let name = ModuleId::parse_explained(piece.trim()).map_err(|expected| {
                        PlacementSyntaxError::BadModule {
                            name: piece.trim().to_string(),
                            expected,
                        }
                    })?;
                    if names.contains(&name) {
                        return Err(PlacementSyntaxError::Repeated { module: name });
                    }
                    names.push(name);
                }
                Ok(Placement::Explicit(names))
            }
            ("budget_matched", Some(argument)) => match parse_param_count(argument) {
                Some(count) if count >= 1 => Ok(Placement::BudgetMatched(count, rule)),
                _ => Err(PlacementSyntaxError::BadBudget),
            },
            ("top_k" | "ranked" | "random" | "kind" | "explicit" | "budget_matched", None) => {
                Err(PlacementSyntaxError::MissingArgument {
                    head: head.to_string(),
                })
            }
            _ => Err(PlacementSyntaxError::Unknown),
        }
    }

    /// Parses the placement grammar; the error says what was expected.
    pub fn parse(text: &str) -> Result<Placement, PlacementSyntaxError> {
        text.parse()
    }

    /// Whether resolving it reads a probe result.
    pub fn needs_probe(&self) -> bool {
        self.rule().is_some()
    }

    /// The rule whose probe it reads; `None` for the placements that read no probe.
    pub fn rule(&self) -> Option<Rule> {
        match self {
            Placement::Dominant(rule)
            | Placement::DominantKind(_, rule)
            | Placement::TopK(_, rule)
            | Placement::Ranked(_, rule)
            | Placement::BudgetMatched(_, rule) => Some(*rule),
            Placement::All | Placement::Random(_) | Placement::Kind(_) | Placement::Explicit(_) => {
                None
            }
        }
    }

    /// The module kinds this placement may put an adapter on (for rank checks); `None` when
    /// ranks are not the user's (budget matched).
    pub fn candidate_kinds(&self) -> Option<Vec<ModuleKind>> {
        match self {
            Placement::All
            | Placement::Dominant(_)
            | Placement::TopK(..)
            | Placement::Ranked(..)
            | Placement::Random(_) => Some(ModuleKind::ALL.to_vec()),
            Placement::DominantKind(kind, _) | Placement::Kind(kind) => Some(vec![*kind]),
            Placement::Explicit(names) => {
                let mut kinds: Vec<ModuleKind> = names.iter().map(|name| name.kind).collect();
                kinds.sort();
                kinds.dedup();
                Some(kinds)
            }
            Placement::BudgetMatched(..) => None,
        }
    }
}

impl serde::Serialize for Placement {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Placement {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(|error| {
            serde::de::Error::custom(format!("invalid placement {text:?}: expected {error}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_form_round_trips() {
        for text in [
            "all",
            "dominant",
            "dominant:down_proj",
            "top_k:3",
            "random:1",
            "kind:q_proj",
            "explicit:layers.3.mlp.down_proj,layers.0.self_attn.q_proj",
            "budget_matched:50000",
            "dominant@grad",
            "dominant:down_proj@kappa",
            "top_k:4@act",
            "top_k:2@grad-rank",
            "ranked:3",
            "ranked:12@act",
            "budget_matched:50000@random",
        ] {
            let placement = Placement::parse(text).unwrap();
            assert_eq!(placement.to_string(), text);
        }
    }

    #[test]
    fn rules_after_at_and_page_by_default() {
        assert_eq!(
            Placement::parse("dominant@grad").unwrap(),
            Placement::Dominant(Rule::Grad)
        );
        assert_eq!(
            Placement::parse("top_k:4@act").unwrap(),
            Placement::TopK(4, Rule::Act)
        );
        // Today's forms read PAGE, and `@page` is the same placement, printed without it.
        assert_eq!(
            Placement::parse("dominant").unwrap(),
            Placement::Dominant(Rule::Page)
        );
        let explicit_page = Placement::parse("dominant:down_proj@page").unwrap();
        assert_eq!(
            explicit_page,
            Placement::DominantKind(ModuleKind::DownProj, Rule::Page)
        );
        assert_eq!(explicit_page.to_string(), "dominant:down_proj");
        assert_eq!(
            Placement::parse("budget_matched:50k@page").unwrap(),
            Placement::parse("budget_matched:50000").unwrap()
        );
        assert_eq!(Placement::TopK(3, Rule::Kappa).rule(), Some(Rule::Kappa));
        assert_eq!(Placement::Random(3).rule(), None);
    }

    #[test]
    fn suffixed_budgets_and_spaces_in_lists() {
        assert_eq!(
            Placement::parse("budget_matched:1.5M").unwrap(),
            Placement::BudgetMatched(1_500_000, Rule::Page)
        );
        assert_eq!(
            Placement::parse("budget_matched:50k").unwrap(),
            Placement::BudgetMatched(50_000, Rule::Page)
        );
        assert_eq!(
            Placement::parse("explicit:layers.1.mlp.up_proj, layers.2.mlp.up_proj")
                .unwrap()
                .to_string(),
            "explicit:layers.1.mlp.up_proj,layers.2.mlp.up_proj"
        );
    }

    #[test]
    fn bad_forms_say_what_was_expected() {
        let cases = [
            ("everything", "a placement: all"),
            ("top_k:0", "a module count ≥ 1 after `top_k:`"),
            ("random:x", "a module count ≥ 1 after `random:`"),
            ("kind:qproj", "a module kind after `kind:`"),
            ("dominant:mlp", "a module kind after `dominant:`"),
            (
                "explicit:layers.3.self_attn.down_proj",
                "`mlp` in the module name",
            ),
            ("explicit:layer.3.mlp.down_proj", "a module name like"),
            ("explicit:layers.x.mlp.down_proj", "a layer index"),
            (
                "explicit:layers.1.mlp.up_proj,layers.1.mlp.up_proj",
                "each module once",
            ),
            ("budget_matched:lots", "a trainable-parameter target"),
            ("budget_matched:0", "a trainable-parameter target"),
            ("top_k", "`top_k:N`"),
            ("all:3", "a placement: all"),
            (
                "dominant@fisher",
                "a placement rule after `@` (page, grad, grad-rank, act, kappa, random), not `fisher`",
            ),
            ("top_k:4@", "not ``"),
            ("all@grad", "not after `all`"),
            ("random:2@grad", "not after `random:2`"),
            ("kind:q_proj@act", "`@RULE` only after a placement that reads a probe"),
            ("top_k:0@grad", "a module count ≥ 1 after `top_k:`"),
            ("ranked:0", "a module count ≥ 1 after `ranked:`"),
            ("ranked", "`ranked:N` with a module count N"),
            ("dominant@grad@act", "not `grad@act`"),
        ];
        for (text, expected) in cases {
            let error = Placement::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn probe_needs() {
        assert!(Placement::Dominant(Rule::Page).needs_probe());
        assert!(Placement::DominantKind(ModuleKind::DownProj, Rule::Grad).needs_probe());
        assert!(Placement::TopK(2, Rule::Act).needs_probe());
        assert!(Placement::Ranked(2, Rule::Random).needs_probe());
        assert!(Placement::BudgetMatched(10_000, Rule::Kappa).needs_probe());
        assert!(!Placement::All.needs_probe());
        assert!(!Placement::Random(1).needs_probe());
        assert!(!Placement::Kind(ModuleKind::QProj).needs_probe());
        assert!(!Placement::Explicit(vec![]).needs_probe());
    }
}
