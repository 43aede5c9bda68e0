//! Where adapters go: the placement grammar and its resolution to modules and ranks.
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
//! | `budget_matched:PARAMS` | the argmax, with the rank whose trainable parameters come closest to PARAMS |
//!
//! The placements that read a probe take the rule whose probe they read after `@`
//! (`dominant@grad`; PAGE without it): the probe result they are given must be that rule's.

use rand::seq::IndexedRandom;
use rand::SeedableRng;

use crate::adapter::{adapter_parameter_count, check_rank, AdapterError, Variant};
use crate::model::{ModelConfig, ModuleId, ModuleKind};
use crate::probe::ProbeResult;

use lorasweep_contract::PlacementSyntaxError;
pub use lorasweep_contract::{Placement, Rule};

/// Errors parsing or resolving a placement.
#[derive(Debug, thiserror::Error)]
pub enum PlacementError {
    /// Not in the grammar.
    #[error("invalid placement {found:?}: {reason} (expected all, dominant, dominant:KIND, top_k:N, ranked:N, random:N, kind:KIND, explicit:NAME[,NAME…] or budget_matched:PARAMS, those that read a probe optionally followed by @RULE)")]
    Syntax {
        /// The text given.
        found: String,
        /// What is wrong.
        reason: String,
    },
    /// A module outside the model.
    #[error("placement names {module}, but the model has {layers} layers (0..{layers})")]
    NoSuchModule {
        /// The module.
        module: String,
        /// Layers the model has.
        layers: usize,
    },
    /// More modules than exist.
    #[error("placement asks for {asked} modules, but the model has only {available}")]
    TooMany {
        /// Requested.
        asked: usize,
        /// Available.
        available: usize,
    },
    /// A placement that reads a probe, without a probe result.
    #[error("placement {placement} needs a {rule} probe result")]
    NeedsProbe {
        /// The placement.
        placement: String,
        /// The rule whose probe it reads.
        rule: Rule,
    },
    /// A probe result of another rule than the placement's.
    #[error("placement {placement} reads a {wanted} probe, but was given a {given} probe result")]
    WrongRule {
        /// The placement.
        placement: String,
        /// The rule it reads.
        wanted: Rule,
        /// The rule of the probe given.
        given: Rule,
    },
    /// A budget no rank can meet.
    #[error("budget_matched:{budget}: {module} needs at least {per_rank} parameters per rank and allows rank ≤ {max_rank}")]
    Budget {
        /// The budget.
        budget: usize,
        /// The module chosen.
        module: String,
        /// Parameters per unit of rank.
        per_rank: usize,
        /// Largest rank.
        max_rank: usize,
    },
    /// A rank the module cannot hold.
    #[error(transparent)]
    Rank(#[from] AdapterError),
}

/// Parses the placement grammar (the job contract's); the error quotes the text and says what
/// is wrong with it.
pub fn parse(text: &str) -> Result<Placement, PlacementError> {
    Placement::parse(text).map_err(|error| {
        let reason = match &error {
            PlacementSyntaxError::Unknown => "unknown placement".to_string(),
            PlacementSyntaxError::UnknownKind { .. } => {
                format!("unknown module kind ({})", ModuleKind::names_list())
            }
            PlacementSyntaxError::BadCount { .. } => {
                "the count must be a positive integer".to_string()
            }
            PlacementSyntaxError::MissingArgument { .. } => "wrong or missing argument".to_string(),
            PlacementSyntaxError::BadModule { name, .. } => {
                format!("{name:?} is not a module path like layers.3.mlp.down_proj")
            }
            PlacementSyntaxError::Repeated { .. }
            | PlacementSyntaxError::BadBudget
            | PlacementSyntaxError::UnknownRule { .. }
            | PlacementSyntaxError::RuleWithoutProbe { .. } => error.to_string(),
        };
        PlacementError::Syntax {
            found: text.to_string(),
            reason,
        }
    })
}

/// Resolution of a placement to modules and ranks for one model.
pub trait Resolve {
    /// The modules and their ranks for a model. `rank` is the run's rank (ignored by
    /// `budget_matched`, which chooses its own); `seed` drives `random`.
    fn resolve(
        &self,
        config: &ModelConfig,
        probe: Option<&ProbeResult>,
        rank: usize,
        variant: Variant,
        seed: u64,
    ) -> Result<Vec<(ModuleId, usize)>, PlacementError>;
}

impl Resolve for Placement {
    fn resolve(
        &self,
        config: &ModelConfig,
        probe: Option<&ProbeResult>,
        rank: usize,
        variant: Variant,
        seed: u64,
    ) -> Result<Vec<(ModuleId, usize)>, PlacementError> {
        let all = config.all_modules();
        let needs_probe = || PlacementError::NeedsProbe {
            placement: self.to_string(),
            rule: self.rule().unwrap_or_default(),
        };
        let ranking = || -> Result<Vec<ModuleId>, PlacementError> {
            let probe = probe.ok_or_else(needs_probe)?;
            let wanted = self.rule().unwrap_or_default();
            if probe.settings.rule != wanted {
                return Err(PlacementError::WrongRule {
                    placement: self.to_string(),
                    wanted,
                    given: probe.settings.rule,
                });
            }
            Ok(probe.ranking())
        };
        let modules: Vec<ModuleId> = match self {
            Placement::All => all.clone(),
            Placement::Dominant(_) => ranking()?.into_iter().take(1).collect(),
            Placement::DominantKind(kind, _) => ranking()?
                .into_iter()
                .filter(|m| m.kind == *kind)
                .take(1)
                .collect(),
            Placement::TopK(k, _) => {
                if *k > all.len() {
                    return Err(PlacementError::TooMany {
                        asked: *k,
                        available: all.len(),
                    });
                }
                ranking()?.into_iter().take(*k).collect()
            }
            Placement::Ranked(position, _) => {
                if *position > all.len() {
                    return Err(PlacementError::TooMany {
                        asked: *position,
                        available: all.len(),
                    });
                }
                ranking()?.into_iter().skip(position - 1).take(1).collect()
            }
            Placement::Random(n) => {
                if *n > all.len() {
                    return Err(PlacementError::TooMany {
                        asked: *n,
                        available: all.len(),
                    });
                }
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x005E_ED0F_7A4D);
                let mut chosen: Vec<ModuleId> =
                    all.choose_multiple(&mut rng, *n).copied().collect();
                chosen.sort();
                chosen
            }
            Placement::Kind(kind) => all.iter().filter(|m| m.kind == *kind).copied().collect(),
            Placement::Explicit(list) => {
                for module in list {
                    if module.layer >= config.num_layers {
                        return Err(PlacementError::NoSuchModule {
                            module: module.name(),
                            layers: config.num_layers,
                        });
                    }
                }
                let mut list = list.clone();
                list.sort();
                list.dedup();
                list
            }
            Placement::BudgetMatched(budget, _) => {
                let module = ranking()?.into_iter().next().ok_or_else(needs_probe)?;
                let (d_in, d_out) = config.module_dims(module.kind);
                let per_rank = d_in + d_out;
                let max_rank = d_in.min(d_out);
                let fixed = adapter_parameter_count(config, module, 0, variant);
                let chosen = (((*budget as usize).saturating_sub(fixed)) as f64 / per_rank as f64)
                    .round() as usize;
                if chosen == 0 || chosen > max_rank {
                    return Err(PlacementError::Budget {
                        budget: *budget as usize,
                        module: module.name(),
                        per_rank,
                        max_rank,
                    });
                }
                return Ok(vec![(module, chosen)]);
            }
        };
        if modules.is_empty() {
            return Err(needs_probe());
        }
        for module in &modules {
            let (d_in, d_out) = config.module_dims(module.kind);
            check_rank(*module, rank, d_in, d_out)?;
        }
        Ok(modules.into_iter().map(|m| (m, rank)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Architecture;

    fn config() -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Llama,
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 24,
            num_layers: 3,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: true,
            attention_bias: false,
            max_position_embeddings: 64,
        }
    }

    fn probe(config: &ModelConfig) -> ProbeResult {
        // Scores rise with the module index, so the last module (layers.2.mlp.down_proj) wins,
        // except that layers.0.mlp.down_proj is best among down_proj after it.
        let per_batch = vec![config
            .all_modules()
            .iter()
            .enumerate()
            .map(|(i, _)| i as f64 + 1.0)
            .collect::<Vec<_>>()];
        let crate::probe::Summary {
            modules,
            dominant,
            top1_share,
            share_by_kind,
            share_by_layer,
            batch_argmax,
            argmax_stability,
        } = crate::probe::summarise(config, &per_batch);
        ProbeResult {
            model: "tiny".into(),
            model_digest: String::new(),
            data: "tiny".into(),
            data_digest: String::new(),
            settings: Default::default(),
            modules,
            dominant,
            top1_share,
            share_by_kind,
            share_by_layer,
            batch_argmax,
            argmax_stability,
            tokens: 0,
            wall_s: 0.0,
            peak_rss_gib: None,
        }
    }

    #[test]
    fn grammar_round_trips() {
        for text in [
            "all",
            "dominant",
            "dominant:down_proj",
            "top_k:3",
            "random:2",
            "kind:q_proj",
            "explicit:layers.0.mlp.down_proj,layers.1.self_attn.q_proj",
            "budget_matched:5000",
        ] {
            assert_eq!(parse(text).unwrap().to_string(), text);
        }
        for bad in [
            "",
            "everything",
            "top_k",
            "top_k:0",
            "top_k:x",
            "kind:foo_proj",
            "dominant:",
            "explicit:layers.1.mlp.q_proj",
            "all:3",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn resolves_each_placement() {
        let config = config();
        let probe = probe(&config);
        let resolve = |text: &str| {
            parse(text)
                .unwrap()
                .resolve(&config, Some(&probe), 2, Variant::Lora, 1)
                .unwrap()
        };
        assert_eq!(resolve("all").len(), 21);
        assert_eq!(
            resolve("dominant"),
            vec![(ModuleId::parse("layers.2.mlp.down_proj").unwrap(), 2)]
        );
        assert_eq!(
            resolve("dominant:q_proj"),
            vec![(ModuleId::parse("layers.2.self_attn.q_proj").unwrap(), 2)]
        );
        assert_eq!(resolve("top_k:2").len(), 2);
        // Scores rise with the module index: the second highest is the one before the last.
        assert_eq!(resolve("ranked:1"), resolve("dominant"));
        assert_eq!(
            resolve("ranked:2"),
            vec![(ModuleId::parse("layers.2.mlp.up_proj").unwrap(), 2)]
        );
        assert_eq!(
            resolve("ranked:21"),
            vec![(ModuleId::parse("layers.0.self_attn.q_proj").unwrap(), 2)]
        );
        assert_eq!(resolve("kind:down_proj").len(), 3);
        let random = resolve("random:4");
        assert_eq!(random.len(), 4);
        assert_eq!(random, resolve("random:4"), "random placement is seeded");
        let other_seed = parse("random:4")
            .unwrap()
            .resolve(&config, None, 2, Variant::Lora, 2)
            .unwrap();
        assert_ne!(random, other_seed);
        // down_proj: d_in 24 + d_out 16 = 40 parameters per rank; 200 → rank 5.
        assert_eq!(
            resolve("budget_matched:200"),
            vec![(ModuleId::parse("layers.2.mlp.down_proj").unwrap(), 5)]
        );
    }

    #[test]
    fn bad_placements_are_clear_errors() {
        let config = config();
        let err = parse("explicit:layers.7.mlp.down_proj")
            .unwrap()
            .resolve(&config, None, 2, Variant::Lora, 0)
            .unwrap_err();
        assert!(err.to_string().contains("has 3 layers"), "{err}");
        let err = Placement::Dominant(Rule::Page)
            .resolve(&config, None, 2, Variant::Lora, 0)
            .unwrap_err();
        assert!(
            err.to_string().contains("needs a page probe result"),
            "{err}"
        );
        let err = parse("dominant@grad")
            .unwrap()
            .resolve(&config, Some(&probe(&config)), 2, Variant::Lora, 0)
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "placement dominant@grad reads a grad probe, but was given a page probe result"
        );
        let err = Placement::All
            .resolve(&config, None, 17, Variant::Lora, 0)
            .unwrap_err();
        assert!(err.to_string().contains("between 1 and"), "{err}");
        let err = Placement::TopK(99, Rule::Page)
            .resolve(&config, Some(&probe(&config)), 2, Variant::Lora, 0)
            .unwrap_err();
        assert!(err.to_string().contains("only 21"), "{err}");
        let err = Placement::Ranked(22, Rule::Page)
            .resolve(&config, Some(&probe(&config)), 2, Variant::Lora, 0)
            .unwrap_err();
        assert!(err.to_string().contains("asks for 22 modules"), "{err}");
    }
}
