//! Placements: which modules get an adapter, and their one grammar.
//!
//! ```text
//! all | dominant | dominant:KIND | top_k:N | random:N | kind:KIND
//!     | explicit:NAME[,NAME…] | budget_matched:PARAMS
//! KIND   = q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj
//! NAME   = layers.L.self_attn.{q,k,v,o}_proj | layers.L.mlp.{gate,up,down}_proj
//! PARAMS = an integer, optionally with a k or M suffix (50k, 1.5M)
//! ```
//!
//! | placement | modules |
//! |---|---|
//! | `all` | every projection of every layer (vanilla LoRA) |
//! | `dominant` | the PAGE argmax (DomLoRA) |
//! | `dominant:KIND` | the PAGE argmax among one kind, e.g. `dominant:down_proj` |
//! | `top_k:N` | the N highest PAGE scores |
//! | `random:N` | N modules drawn uniformly, seeded (the control) |
//! | `kind:KIND` | one kind in every layer |
//! | `explicit:NAME[,NAME…]` | the listed modules, e.g. `layers.3.mlp.down_proj` |
//! | `budget_matched:PARAMS` | the PAGE argmax, at the rank whose trainable parameters come closest to PARAMS |

use std::fmt;
use std::str::FromStr;

use crate::vocab::{ModuleId, ModuleKind};

/// Which modules get an adapter.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Placement {
    /// Every module kind in every layer (vanilla LoRA).
    All,
    /// The PAGE argmax module (DomLoRA).
    Dominant,
    /// The PAGE argmax among modules of one kind.
    DominantKind(ModuleKind),
    /// The N modules with the highest PAGE.
    TopK(usize),
    /// N modules drawn at random with the train seed (the control).
    Random(usize),
    /// One module kind in every layer.
    Kind(ModuleKind),
    /// The listed modules (no repeats, order kept).
    Explicit(Vec<ModuleId>),
    /// The PAGE argmax, at the rank whose trainable parameters come closest to this target.
    BudgetMatched(u64),
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
}

const GRAMMAR: &str = "a placement: all, dominant, dominant:KIND, top_k:N, random:N, kind:KIND, \
                       explicit:NAME[,NAME…] or budget_matched:PARAMS";

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
        }
    }
}

impl std::error::Error for PlacementSyntaxError {}

impl fmt::Display for Placement {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Placement::All => write!(formatter, "all"),
            Placement::Dominant => write!(formatter, "dominant"),
            Placement::DominantKind(kind) => write!(formatter, "dominant:{kind}"),
            Placement::TopK(count) => write!(formatter, "top_k:{count}"),
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
            Placement::BudgetMatched(params) => write!(formatter, "budget_matched:{params}"),
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
            ("dominant", None) => Ok(Placement::Dominant),
            ("dominant", Some(argument)) => Ok(Placement::DominantKind(kind_of(argument)?)),
            ("top_k", Some(argument)) => Ok(Placement::TopK(count_of(argument)?)),
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
                Some(count) if count >= 1 => Ok(Placement::BudgetMatched(count)),
                _ => Err(PlacementSyntaxError::BadBudget),
            },
            ("top_k" | "random" | "kind" | "explicit" | "budget_matched", None) => {
                Err(PlacementSyntaxError::MissingArgument {
                    head: head.to_string(),
                })
            }
            _ => Err(PlacementSyntaxError::Unknown),
        }
    }
}

impl Placement {
    /// Parses the placement grammar; the error says what was expected.
    pub fn parse(text: &str) -> Result<Placement, PlacementSyntaxError> {
        text.parse()
    }

    /// Whether resolving it reads a PAGE probe result.
    pub fn needs_probe(&self) -> bool {
        matches!(
            self,
            Placement::Dominant
                | Placement::DominantKind(_)
                | Placement::TopK(_)
                | Placement::BudgetMatched(_)
        )
    }

    /// The module kinds this placement may put an adapter on (for rank checks); `None` when
    /// ranks are not the user's (budget matched).
    pub fn candidate_kinds(&self) -> Option<Vec<ModuleKind>> {
        match self {
            Placement::All | Placement::Dominant | Placement::TopK(_) | Placement::Random(_) => {
                Some(ModuleKind::ALL.to_vec())
            }
            Placement::DominantKind(kind) | Placement::Kind(kind) => Some(vec![*kind]),
            Placement::Explicit(names) => {
                let mut kinds: Vec<ModuleKind> = names.iter().map(|name| name.kind).collect();
                kinds.sort();
                kinds.dedup();
                Some(kinds)
            }
            Placement::BudgetMatched(_) => None,
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
        ] {
            let placement = Placement::parse(text).unwrap();
            assert_eq!(placement.to_string(), text);
        }
    }

    #[test]
    fn suffixed_budgets_and_spaces_in_lists() {
        assert_eq!(
            Placement::parse("budget_matched:1.5M").unwrap(),
            Placement::BudgetMatched(1_500_000)
        );
        assert_eq!(
            Placement::parse("budget_matched:50k").unwrap(),
            Placement::BudgetMatched(50_000)
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
        ];
        for (text, expected) in cases {
            let error = Placement::parse(text).unwrap_err().to_string();
            assert!(error.contains(expected), "{text}: {error}");
        }
    }

    #[test]
    fn probe_needs() {
        assert!(Placement::Dominant.needs_probe());
        assert!(Placement::DominantKind(ModuleKind::DownProj).needs_probe());
        assert!(Placement::TopK(2).needs_probe());
        assert!(Placement::BudgetMatched(10_000).needs_probe());
        assert!(!Placement::All.needs_probe());
        assert!(!Placement::Random(1).needs_probe());
        assert!(!Placement::Kind(ModuleKind::QProj).needs_probe());
        assert!(!Placement::Explicit(vec![]).needs_probe());
    }
}
