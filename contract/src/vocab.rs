//! The vocabulary jobs are written in: module kinds and names, LoRA variants, the init of A,
//! PAGE estimators, learning-rate schedules, packaged task names and metrics.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::UnknownName;

named_enum! {
    /// The seven linear projections of a decoder layer that can carry an adapter, in the order
    /// of a layer's forward pass.
    ModuleKind ("module kind") {
        /// Attention query projection.
        QProj => "q_proj",
        /// Attention key projection.
        KProj => "k_proj",
        /// Attention value projection.
        VProj => "v_proj",
        /// Attention output projection.
        OProj => "o_proj",
        /// FFN gate projection.
        GateProj => "gate_proj",
        /// FFN up projection.
        UpProj => "up_proj",
        /// FFN down projection.
        DownProj => "down_proj",
    }
}

impl ModuleKind {
    /// The submodule that holds it in Hugging Face names: `self_attn` or `mlp`.
    pub fn block(self) -> &'static str {
        match self {
            Self::QProj | Self::KProj | Self::VProj | Self::OProj => "self_attn",
            Self::GateProj | Self::UpProj | Self::DownProj => "mlp",
        }
    }

    /// Parses `q_proj` … `down_proj`; `None` otherwise.
    pub fn parse(name: &str) -> Option<Self> {
        Self::from_name(name)
    }
}

/// One candidate module: a projection kind in one layer, written
/// `layers.{layer}.{block}.{kind}` (e.g. `layers.3.mlp.down_proj`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModuleId {
    /// Decoder layer index, from 0.
    pub layer: usize,
    /// Projection kind.
    pub kind: ModuleKind,
}

impl ModuleId {
    /// The Hugging Face module path without the leading `model.`: `layers.3.mlp.down_proj`.
    pub fn name(&self) -> String {
        self.to_string()
    }

    /// Parses `layers.N.self_attn.q_proj` / `layers.N.mlp.down_proj` (a leading `model.` is
    /// accepted); `None` when it is not one.
    pub fn parse(name: &str) -> Option<Self> {
        Self::parse_explained(name).ok()
    }

    /// Parses like [`ModuleId::parse`]; the error says what was expected.
    pub fn parse_explained(text: &str) -> Result<Self, String> {
        let expected = "a module name like layers.3.mlp.down_proj or layers.0.self_attn.q_proj";
        let name = text.strip_prefix("model.").unwrap_or(text);
        let parts: Vec<&str> = name.split('.').collect();
        let [layers, layer, block, kind] = parts.as_slice() else {
            return Err(expected.to_string());
        };
        if *layers != "layers" {
            return Err(expected.to_string());
        }
        if layer.is_empty() || !layer.bytes().all(|byte| byte.is_ascii_digit()) {
            return Err(format!(
                "a layer index (a non-negative integer) in a module name, e.g. {expected}"
            ));
        }
        let layer: usize = layer
            .parse()
            .map_err(|_| "a layer index below 2^32".to_string())?;
        if u32::try_from(layer).is_err() {
            return Err("a layer index below 2^32".to_string());
        }
        let kind = ModuleKind::from_name(kind)
            .ok_or_else(|| format!("a module kind ({})", ModuleKind::names_list()))?;
        if *block != kind.block() {
            return Err(format!(
                "`{}` in the module name of a {kind} (layers.{layer}.{}.{kind})",
                kind.block(),
                kind.block()
            ));
        }
        Ok(Self { layer, kind })
    }
}

impl fmt::Display for ModuleId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            formatter,
            "layers.{}.{}.{}",
            self.layer,
            self.kind.block(),
            self.kind.name()
        )
    }
}

impl FromStr for ModuleId {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse_explained(text)
    }
}

impl Serialize for ModuleId {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ModuleId {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let name = String::deserialize(deserializer)?;
        Self::parse(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("not a module path: {name:?}")))
    }
}

named_enum! {
    /// The adapter variants lorasweep trains (each as PEFT defines it).
    Variant ("variant") {
        /// Vanilla LoRA (Hu et al., 2021): scale α/r.
        Lora => "lora",
        /// Rank-stabilised LoRA (Kalajdzievski, 2023): scale α/√r.
        RsLora => "rslora",
        /// Weight-decomposed LoRA (Liu et al., 2024): magnitude times direction.
        Dora => "dora",
        /// Principal singular values and vectors adaptation (Meng et al., 2024): principal
        /// SVD init, residual base.
        Pissa => "pissa",
        /// LoRA with a larger learning rate for B (Hayou et al., 2024): B's rate is
        /// `loraplus_ratio` times A's.
        LoraPlus => "loraplus",
        /// Minor singular components adaptation (Wang et al., 2024), residual base.
        Milora => "milora",
    }
}

named_enum! {
    /// How A is initialised for the lora-style variants (and sampled by the PAGE probe).
    #[derive(Default)]
    AInit ("A init") {
        /// PEFT's default, kaiming-uniform with a=√5: U(−1/√d_in, 1/√d_in), variance
        /// 1/(3·d_in).
        #[default]
        Kaiming => "kaiming",
        /// PEFT's `init_lora_weights="gaussian"`: N(0, 1/r²).
        Gaussian => "gaussian",
    }
}

impl AInit {
    /// The variance σ_A² of one entry of A.
    pub fn variance(self, d_in: usize, rank: usize) -> f64 {
        match self {
            Self::Kaiming => 1.0 / (3.0 * d_in as f64),
            Self::Gaussian => 1.0 / (rank as f64 * rank as f64),
        }
    }
}

named_enum! {
    /// How the PAGE probe measures the projected gradient energy.
    #[derive(Default)]
    Estimator ("estimator") {
        /// ‖s·G·Aᵀ‖² with A sampled from its init.
        #[default]
        Sample => "sample",
        /// s²·r·σ_A²·‖G‖², the expectation over A.
        Expected => "expected",
    }
}

named_enum! {
    /// How a probe scores every candidate module, and so which module a placement reading
    /// the probe chooses. Every rule writes the same probe file (module, score, share), with
    /// a higher score better, so placements, heatmaps and concentration statistics read
    /// every rule alike.
    #[derive(Default)]
    Rule ("placement rule") {
        /// PAGE: the projected adapter gradient energy ‖s·G·Aᵀ‖² (its estimator and init of A
        /// are the probe's `estimator` and `a_init`).
        #[default]
        Page => "page",
        /// The energy of the full frozen-weight gradient, ‖∂L/∂W‖²_F (no adapter involved):
        /// what full fine-tuning would move most.
        Grad => "grad",
        /// The part of that energy a rank-r update can hold: ‖∂L/∂W‖²_F times the share of it
        /// in the top-r singular values (r = the probe's rank).
        GradRank => "grad-rank",
        /// Forward only: the mean squared norm of the module's input activations times
        /// ‖W‖²_F.
        Act => "act",
        /// Data-free: the inverse condition number σ_min/σ_max of W, so the best-conditioned
        /// module (lowest κ) scores highest.
        Kappa => "kappa",
        /// A seeded uniform draw per module (the control).
        Random => "random",
    }
}

impl Rule {
    /// Whether it is PAGE (the rule a placement without `@RULE` reads).
    pub fn is_page(&self) -> bool {
        *self == Rule::Page
    }

    /// Whether it reads the task's conversations (probe batches); `kappa` and `random` do not.
    pub fn reads_data(self) -> bool {
        matches!(self, Rule::Page | Rule::Grad | Rule::GradRank | Rule::Act)
    }

    /// Whether it reads the probe's rank `r` (PAGE's adapter, grad-rank's top r).
    pub fn reads_rank(self) -> bool {
        matches!(self, Rule::Page | Rule::GradRank)
    }

    /// Whether it reads the probe adapter's alpha, estimator and init of A (PAGE only).
    pub fn reads_adapter(self) -> bool {
        self == Rule::Page
    }

    /// Whether the probe seed changes its scores: the batches drawn (data rules), A (PAGE),
    /// the draw (`random`); not `kappa`, a function of the weights alone.
    pub fn reads_seed(self) -> bool {
        self != Rule::Kappa
    }
}

named_enum! {
    /// The learning-rate decay after warmup.
    #[derive(Default)]
    Schedule ("schedule") {
        /// Half-cosine from the peak to 0.
        #[default]
        Cosine => "cosine",
        /// Straight line from the peak to 0.
        Linear => "linear",
        /// The peak throughout.
        Constant => "constant",
    }
}

named_enum! {
    /// A task packaged with lorasweep.
    NamedTask ("task") {
        /// GSM-style math word problems; exact final answer.
        Math => "math",
        /// Python from docstrings, HumanEval pass@1.
        Code => "code",
        /// Instruction following with verifiable constraints.
        Instruct => "instruct",
        /// Multi-turn conversation; held-out response loss.
        Chat => "chat",
    }
}

named_enum! {
    /// How a task's outputs are scored.
    Metric ("metric") {
        /// The final number of the answer (`#### N`, else the last number) equals the gold
        /// number after normalisation.
        NumberMatch => "number_match",
        /// The completion passes the problem's tests (greedy, one sample).
        PassAt1 => "pass@1",
        /// Every verifiable instruction of the prompt is followed (strict), at prompt and
        /// instruction level.
        InstructionFollowing => "instruction_following",
        /// Mean loss (and perplexity) of the response tokens of every assistant turn.
        Loss => "loss",
        /// The reply equals the reference (surrounding whitespace ignored).
        Exact => "exact",
        /// The reply contains the reference.
        Contains => "contains",
    }
}

impl NamedTask {
    /// How the task's outputs are scored.
    pub fn metric(self) -> Metric {
        match self {
            NamedTask::Math => Metric::NumberMatch,
            NamedTask::Code => Metric::PassAt1,
            NamedTask::Instruct => Metric::InstructionFollowing,
            NamedTask::Chat => Metric::Loss,
        }
    }
}

impl Metric {
    /// The metrics a user JSONL task may be scored with.
    pub const USER: &'static [Metric] = &[Metric::Exact, Metric::Contains, Metric::Loss];

    /// The names of the metrics a user task may use, comma separated, for error messages.
    pub fn user_names_list() -> String {
        Self::USER
            .iter()
            .map(|metric| metric.name())
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Parses a metric a user task may use (`exact`, `contains`, `loss`).
    pub fn parse_user(text: &str) -> Result<Self, UnknownName> {
        Self::USER
            .iter()
            .copied()
            .find(|metric| metric.name() == text)
            .ok_or_else(|| UnknownName {
                what: "user-task metric",
                found: text.to_string(),
                expected: Self::user_names_list(),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_through_from_str_display_and_serde() {
        for variant in Variant::ALL {
            assert_eq!(variant.to_string().parse::<Variant>().unwrap(), variant);
            let json = serde_json::to_string(&variant).unwrap();
            assert_eq!(json, format!("\"{}\"", variant.name()));
            assert_eq!(serde_json::from_str::<Variant>(&json).unwrap(), variant);
        }
        assert_eq!(Metric::PassAt1.to_string(), "pass@1");
        assert_eq!("pass@1".parse::<Metric>().unwrap(), Metric::PassAt1);
    }

    #[test]
    fn unknown_names_say_what_was_expected() {
        let error = "lorax".parse::<Variant>().unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown variant \"lorax\" (expected one of: lora, rslora, dora, pissa, loraplus, milora)"
        );
        assert!(serde_json::from_str::<Schedule>("\"step\"")
            .unwrap_err()
            .to_string()
            .contains("unknown schedule \"step\""));
        assert!(Metric::parse_user("pass@1").is_err());
        assert_eq!(Metric::parse_user("loss").unwrap(), Metric::Loss);
    }

    #[test]
    fn rules_have_one_name_each_and_page_is_the_default() {
        assert_eq!(Rule::default(), Rule::Page);
        assert_eq!(
            Rule::names_list(),
            "page, grad, grad-rank, act, kappa, random"
        );
        assert_eq!("grad-rank".parse::<Rule>().unwrap(), Rule::GradRank);
        let error = "fisher".parse::<Rule>().unwrap_err().to_string();
        assert!(
            error.starts_with("unknown placement rule \"fisher\""),
            "{error}"
        );
        assert!(!Rule::Kappa.reads_data() && !Rule::Random.reads_data());
        assert!(Rule::Act.reads_data() && !Rule::Act.reads_rank());
        assert!(Rule::GradRank.reads_rank() && !Rule::GradRank.reads_adapter());
        assert!(!Rule::Kappa.reads_seed() && Rule::Random.reads_seed());
    }

    #[test]
    fn module_ids_parse_and_print_the_hugging_face_path() {
        let id = ModuleId::parse("model.layers.3.mlp.down_proj").unwrap();
        assert_eq!(
            id,
            ModuleId {
                layer: 3,
                kind: ModuleKind::DownProj
            }
        );
        assert_eq!(id.to_string(), "layers.3.mlp.down_proj");
        assert!(ModuleId::parse("layers.3.self_attn.down_proj").is_none());
        assert!(ModuleId::parse("layers.x.mlp.down_proj").is_none());
        assert!(ModuleId::parse("layers.3.mlp.down_proj.extra").is_none());
    }
}
