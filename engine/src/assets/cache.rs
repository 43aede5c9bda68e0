//! The cache: its layout (`assets/<name>/`, `tmp/`), the completion marker that says an asset
//! is complete and current, and fetching an asset by building it in `tmp/` and renaming it
//! into place once its marker is written. The downloads and build steps it runs are in
//! `fetch.rs`.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::fetch::{check_gguf_magic, write_synced};
use super::specs::spec;
use super::{
    home, io_error, AssetError, AssetKind, AssetSpec, Package, MARKER, PYTHON_ENV, WHEELHOUSE_ENV,
};

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
    pub(super) home: PathBuf,
    pub(super) wheelhouse: Option<PathBuf>,
    pub(super) python: OsString,
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
        check_complete(&dir, spec)
            .is_ok()
            .then(|| main_path(&dir, spec))
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
        let build = self.build_dir(&spec.name)?;

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

        let path = self.place(build, spec)?;
        tracing::info!(
            asset = %spec.name,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "asset ready"
        );
        Ok(path)
    }

    /// A fresh build directory for `name` under `tmp/`, after removing the ones abandoned by
    /// killed processes. It is removed when dropped unless [`Cache::place`] moved it.
    pub(super) fn build_dir(&self, name: &str) -> Result<BuildDir, AssetError> {
        let tmp_root = self.home.join("tmp");
        std::fs::create_dir_all(&tmp_root).map_err(io_error(&tmp_root))?;
        remove_abandoned_builds(&tmp_root, name);
        BuildDir::create(&tmp_root, name)
    }

    /// Moves a finished build (its marker written last) into `assets/<name>` in one rename,
    /// replacing an incomplete or stale directory there; returns the asset's main path.
    pub(super) fn place(&self, build: BuildDir, spec: &AssetSpec) -> Result<PathBuf, AssetError> {
        let destination = self.asset_dir(&spec.name);
        let assets_dir = self.assets_dir();
        std::fs::create_dir_all(&assets_dir).map_err(io_error(&assets_dir))?;
        if destination.exists() {
            // Incomplete or stale (the caller's check failed): replace it.
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
        Ok(main_path(&destination, spec))
    }
}

/// A build directory under `tmp/`, removed on drop unless disarmed (renamed into place).
pub(super) struct BuildDir {
    pub(super) path: PathBuf,
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

/// Whether `dir` holds a complete, current build of `spec`: its marker exists, names the same
/// revision and pinned packages, and every file it lists has the recorded size. The error
/// says what is wrong.
pub(super) fn check_complete(dir: &Path, spec: &AssetSpec) -> Result<(), String> {
    let marker = read_marker(dir).ok_or_else(|| format!("no readable {MARKER}"))?;
    if marker.asset != spec.name {
        return Err(format!(
            "its marker is for asset `{}`, not `{}`",
            marker.asset, spec.name
        ));
    }
    if marker.revision != spec.revision || marker.packages != spec.packages {
        let requirements = |packages: &[Package]| {
            packages
                .iter()
                .map(Package::requirement)
                .collect::<Vec<_>>()
                .join(", ")
        };
        return Err(format!(
            "it is revision {} built from [{}], this lorasweep expects revision {} built from \
             [{}]",
            marker.revision,
            requirements(&marker.packages),
            spec.revision,
            requirements(&spec.packages)
        ));
    }
    for (file, size) in &marker.files {
        match std::fs::metadata(dir.join(file)) {
            Ok(metadata) if metadata.len() == *size => {}
            Ok(metadata) => {
                return Err(format!(
                    "{file} has {} bytes, its marker says {size}",
                    metadata.len()
                ))
            }
            Err(error) => return Err(format!("{file}: {error}")),
        }
    }
    Ok(())
}

/// The files the marker of a complete asset directory lists, with their sizes (relative
/// paths with `/`, the marker itself not included).
pub(super) fn marker_files(dir: &Path) -> Option<Vec<(String, u64)>> {
    read_marker(dir).map(|marker| marker.files)
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
