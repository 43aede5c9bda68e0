//! Placements: which (layer, module) pairs get an adapter, and their string grammar.
//!
//! ```text
//! all | dominant | dominant:KIND | top_k:N | random:N | kind:KIND
//!     | explicit:NAME[,NAME…] | budget_matched:PARAMS
//! KIND   = q_proj | k_proj | v_proj | o_proj | gate_proj | up_proj | down_proj
//! NAME   = layers.L.self_attn.{q,k,v,o}_proj | layers.L.mlp.{gate,up,down}_proj
//! PARAMS = an integer, optionally with a k or M suffix (50k, 1.5M)
//! ```

use std::fmt;

use super::models::ModelGeometry;

named_enum! {
    /// One of the seven linear module kinds of a decoder layer.
    ModuleKind {
        /// Attention query projection.
        QProj => "q_proj",
        /// Attention key projection.
        KProj => "k_proj",
        /// Attention value projection.
        VProj => "v_proj",
        /// Attention output projection.
        OProj => "o_proj",
        /// MLP gate projection.
        GateProj => "gate_proj",
        /// MLP up projection.
        UpProj => "up_proj",
        /// MLP down projection.
        DownProj => "down_proj",
    }
}

impl ModuleKind {
    /// The block holding this module in Hugging Face names: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            ModuleKind::QProj | ModuleKind::KProj | ModuleKind::VProj | ModuleKind::OProj => {
                "self_attn"
            }
            ModuleKind::GateProj | ModuleKind::UpProj | ModuleKind::DownProj => "mlp",
        }
    }
}

/// One candidate module: `layers.{layer}.{block}.{kind}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleName {
    /// 0-based decoder layer.
    pub layer: u32,
    /// The module kind.
    pub kind: ModuleKind,
}

impl fmt::Display for ModuleName {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "layers.{}.{}.{}",
            self.layer,
            self.kind.block(),
            self.kind
        )
    }
}

impl ModuleName {
    /// Parses `layers.L.self_attn.q_proj` / `layers.L.mlp.down_proj`.
    pub fn parse(text: &str) -> Result<ModuleName, String> {
        let expected = "a module name like layers.3.mlp.down_proj or layers.0.self_attn.q_proj";
        let parts: Vec<&str> = text.split('.').collect();
        let [layers, layer, block, kind] = parts.as_slice() else {
            return Err(expected.to_string());
        };
        if *layers != "layers" {
            return Err(expected.to_string());
        }
        let layer = parse_decimal(layer).ok_or_else(|| {
            format!("a layer index (a non-negative integer) in a module name, e.g. {expected}")
        })?;
        let layer = u32::try_from(layer).map_err(|_| "a layer index below 2^32".to_string())?;
        let kind = ModuleKind::from_name(kind)
            .ok_or_else(|| format!("a module kind ({})", ModuleKind::names_list()))?;
        if *block != kind.block() {
            return Err(format!(
                "`{}` in the module name of a {kind} (layers.{layer}.{}.{kind})",
                kind.block(),
                kind.block()
            ));
        }
        Ok(ModuleName { layer, kind })
    }
}

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
    TopK(u32),
    /// N modules drawn at random with the train seed (the control).
    Random(u32),
    /// One module kind in every layer.
    Kind(ModuleKind),
    /// The listed modules (no repeats, file order kept).
    Explicit(Vec<ModuleName>),
    /// Ranks chosen from PAGE so the trainable parameters equal this target.
    BudgetMatched(u64),
}

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

impl serde::Serialize for Placement {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
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

const GRAMMAR: &str = "a placement: all, dominant, dominant:KIND, top_k:N, random:N, kind:KIND, \
                       explicit:NAME[,NAME…] or budget_matched:PARAMS";

impl Placement {
    /// Parses the placement grammar. The error says what was expected.
    pub fn parse(text: &str) -> Result<Placement, String> {
        let (head, argument) = match text.split_once(':') {
            Some((head, argument)) => (head, Some(argument)),
            None => (text, None),
        };
        let kind_of = |argument: &str| {
            ModuleKind::from_name(argument).ok_or_else(|| {
                format!(
                    "a module kind after `{head}:` ({})",
                    ModuleKind::names_list()
                )
            })
        };
        let count_of = |argument: &str| match parse_decimal(argument) {
            Some(count) if (1..=u64::from(u32::MAX)).contains(&count) => Ok(count as u32),
            _ => Err(format!("a module count ≥ 1 after `{head}:`")),
        };
        match (head, argument) {
            ("all", None) => Ok(Placement::All),
            ("dominant", None) => Ok(Placement::Dominant),
            ("dominant", Some(argument)) => Ok(Placement::DominantKind(kind_of(argument)?)),
            ("top_k", Some(argument)) => Ok(Placement::TopK(count_of(argument)?)),
            ("random", Some(argument)) => Ok(Placement::Random(count_of(argument)?)),
            ("kind", Some(argument)) => Ok(Placement::Kind(kind_of(argument)?)),
            ("explicit", Some(argument)) => {
                let mut names: Vec<ModuleName> = Vec::new();
                for piece in argument.split(',') {
                    let name = ModuleName::parse(piece.trim())?;
                    if names.contains(&name) {
                        return Err(format!("each module once in explicit:, not {name} twice"));
                    }
                    names.push(name);
                }
                Ok(Placement::Explicit(names))
            }
            ("budget_matched", Some(argument)) => match parse_param_count(argument) {
                Some(count) if count >= 1 => Ok(Placement::BudgetMatched(count)),
                _ => Err(
                    "a trainable-parameter target after `budget_matched:` (e.g. 50000, 50k or 1.5M)"
                        .to_string(),
                ),
            },
            ("top_k" | "random", None) => Err(format!("`{head}:N` with a module count N")),
            ("kind", None) => Err("`kind:KIND` with a module kind".to_string()),
            ("explicit", None) => Err("`explicit:NAME[,NAME…]` with module names".to_string()),
            ("budget_matched", None) => {
                Err("`budget_matched:PARAMS` with a parameter target".to_string())
            }
            _ => Err(GRAMMAR.to_string()),
        }
    }

    /// Whether the placement reads a PAGE probe result.
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

    /// Checks the placement against a model's geometry. Each problem is `(expected, found)`.
    pub(crate) fn check_against(
        &self,
        model: &str,
        geometry: &ModelGeometry,
    ) -> Vec<(String, String)> {
        let modules = geometry.layers.saturating_mul(ModuleKind::ALL.len() as u32);
        let mut problems = Vec::new();
        match self {
            Placement::TopK(count) | Placement::Random(count) if *count > modules => {
                problems.push((
                    format!(
                        "at most {modules} modules ({model} has {} layers × 7 kinds)",
                        geometry.layers
                    ),
                    format!("{self}"),
                ));
            }
            Placement::Explicit(names) => {
                for name in names {
                    if name.layer >= geometry.layers {
                        problems.push((
                            format!(
                                "a layer index below {} ({model} has {} layers)",
                                geometry.layers, geometry.layers
                            ),
                            format!("{name}"),
                        ));
                    }
                }
            }
            Placement::BudgetMatched(params) => {
                let smallest = ModuleKind::ALL
                    .iter()
                    .map(|kind| {
                        let (d_in, d_out) = geometry.module_dims(*kind);
                        u64::from(d_in) + u64::from(d_out)
                    })
                    .min()
                    .unwrap_or(0);
                if *params < smallest {
                    problems.push((
                        format!(
                            "a parameter target ≥ {smallest} (one rank-1 adapter on the smallest module of {model})"
                        ),
                        format!("{self}"),
                    ));
                }
            }
            _ => {}
        }
        problems
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
            let error = Placement::parse(text).unwrap_err();
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
