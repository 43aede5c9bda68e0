//! Carrying cached assets to machines without network: a bundle is a directory holding a
//! manifest ([`MANIFEST`]) and every file of the bundled assets split into parts of at most a
//! given size; installing reads the manifest(s), verifies every part and every file against
//! their sha256, reassembles each asset in a build directory under `tmp/` and moves it into
//! the cache exactly as a fetch would have left it (completion marker included, so a later
//! fetch finds it and does nothing).
//!
//! Bundling writes each part under a temporary name and renames it, and writes the manifest
//! last (also renamed into place, after removing an older manifest first): a directory whose
//! bundling was interrupted has no manifest, and install refuses it.
//!
//! Install takes several directories at once (parts may travel in several batches); it looks
//! for each part in every directory given. An asset whose parts are all present and valid is
//! installed even when another asset of the same manifest is incomplete; an incomplete or
//! corrupt one is left exactly as it was in the cache (nothing of it is written under
//! `assets/`), its problems are reported part by part, and the install fails. The valid parts
//! of such an asset are kept under `$LORASWEEP_HOME/parts/` (named by their sha256), so a later
//! install given only the remaining parts (and the manifest) completes it; they are removed
//! once the asset is installed.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::cache::{check_complete, marker_files};
use super::fetch::{create_file, finish_file, sha256_file, write_synced};
use super::{expand_names, io_error, list, AssetError, AssetSpec, Cache, MARKER};

/// The manifest's file name inside a bundle directory.
pub const MANIFEST: &str = "manifest.json";
/// The `format` field of every manifest.
pub const MANIFEST_FORMAT: &str = "lorasweep-asset-bundle";
/// The manifest version this lorasweep writes and reads.
pub const MANIFEST_VERSION: u32 = 1;
/// The default largest part: 45 MiB.
pub const DEFAULT_PART_SIZE: u64 = 45 << 20;
/// The directory of the cache keeping verified parts of assets not yet installed.
pub const PARTS_DIR: &str = "parts";

/// What `manifest.json` holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`] when written.
    pub version: u32,
    /// The largest part, in bytes.
    pub part_size: u64,
    /// The bundled assets, in the order given.
    pub assets: Vec<BundleAsset>,
}

/// One bundled asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleAsset {
    /// The asset's name (its directory in the cache).
    pub name: String,
    /// The revision of the asset's spec the files were built with.
    pub revision: u32,
    /// Every file of the asset directory, the completion marker last.
    pub files: Vec<BundleFile>,
}

/// One file of a bundled asset.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    /// The path relative to the asset directory, with `/`.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lowercase hex.
    pub sha256: String,
    /// Its parts, in order (none for an empty file).
    pub parts: Vec<BundlePart>,
}

/// One part of a bundled file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundlePart {
    /// The part's file name in the bundle directory.
    pub name: String,
    /// Its size in bytes.
    pub size: u64,
    /// Its sha256, lowercase hex.
    pub sha256: String,
}

/// What an install did when every asset could be installed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstallReport {
    /// The assets installed by this run, with their main paths.
    pub installed: Vec<(String, PathBuf)>,
    /// The assets that were complete in the cache already (their parts were not needed).
    pub already_cached: Vec<(String, PathBuf)>,
}

/// Parses a size: a number of bytes, or a number with `K`, `M` or `G` (binary units, `KiB`,
/// `MB`… accepted, case-insensitive); `45M` is 45 × 2²⁰ bytes. Zero is refused.
pub fn parse_size(text: &str) -> Result<u64, AssetError> {
    let bad = |reason: &str| AssetError::BadPartSize {
        text: text.to_string(),
        reason: reason.to_string(),
    };
    let upper = text.trim().to_ascii_uppercase();
    let digits_end = upper
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(upper.len());
    let (digits, unit) = upper.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad("it does not start with a number"));
    }
    let shift = match unit.trim() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        other => return Err(bad(&format!("unknown unit `{other}`"))),
    };
    let bytes = digits
        .parse::<u64>()
        .ok()
        .and_then(|value| value.checked_mul(1u64 << shift))
        .ok_or_else(|| bad("too large"))?;
    if bytes == 0 {
        return Err(bad("a part must hold at least one byte"));
    }
    Ok(bytes)
}

impl Cache {
    /// Bundles packaged assets by name (`all` for every one); see [`Cache::bundle_specs`].
    pub fn bundle<S: AsRef<str>>(
        &self,
        names: &[S],
        out: &Path,
        part_size: u64,
    ) -> Result<Manifest, AssetError> {
        self.bundle_specs(&expand_names(names)?, out, part_size)
    }

    /// Writes into `out` (created if needed) every file of these assets split into parts of
    /// at most `part_size` bytes, then [`MANIFEST`]. Assets not complete in the cache are
    /// fetched first. An older manifest in `out` is removed before any part is written, and
    /// the new one is written last, so an interrupted bundle has no manifest.
    pub fn bundle_specs(
        &self,
        specs: &[&AssetSpec],
        out: &Path,
        part_size: u64,
    ) -> Result<Manifest, AssetError> {
        if part_size == 0 {
            return Err(AssetError::BadPartSize {
                text: "0".into(),
                reason: "a part must hold at least one byte".into(),
            });
        }
        for spec in specs {
            self.fetch_spec(spec)?;
        }
        std::fs::create_dir_all(out).map_err(io_error(out))?;
        let manifest_path = out.join(MANIFEST);
        match std::fs::remove_file(&manifest_path) {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(AssetError::Io {
                    path: manifest_path,
                    source,
                })
            }
        }

        let mut names = HashSet::new();
        let mut assets = Vec::with_capacity(specs.len());
        for spec in specs {
            let dir = self.asset_dir(&spec.name);
            let mut files = marker_files(&dir).ok_or_else(|| AssetError::Invalid {
                path: dir.join(MARKER),
                detail: "the completion marker disappeared while bundling".into(),
            })?;
            let marker_size = std::fs::metadata(dir.join(MARKER))
                .map_err(io_error(&dir.join(MARKER)))?
                .len();
            files.push((MARKER.to_string(), marker_size));
            let mut bundled = Vec::with_capacity(files.len());
            for (path, size) in files {
                tracing::info!(asset = %spec.name, file = %path, size, "bundling");
                bundled.push(split_file(
                    &spec.name, &dir, &path, size, out, part_size, &mut names,
                )?);
            }
            assets.push(BundleAsset {
                name: spec.name.clone(),
                revision: spec.revision,
                files: bundled,
            });
        }
        let manifest = Manifest {
            format: MANIFEST_FORMAT.to_string(),
            version: MANIFEST_VERSION,
            part_size,
            assets,
        };
        let json = serde_json::to_vec_pretty(&manifest)
            .expect("the manifest is plain data and serializes");
        let staged = out.join(format!(".{MANIFEST}.tmp"));
        write_synced(&staged, &json)?;
        std::fs::rename(&staged, &manifest_path).map_err(io_error(&manifest_path))?;
        Ok(manifest)
    }

    /// Installs the packaged assets of the bundles in `dirs`; see
    /// [`Cache::install_bundles_specs`].
    pub fn install_bundles<P: AsRef<Path>>(&self, dirs: &[P]) -> Result<InstallReport, AssetError> {
        self.install_bundles_specs(dirs, list())
    }

    /// Installs the assets of the bundles in `dirs` into the cache; `specs` are the assets
    /// this lorasweep knows (a bundled asset must be one of them, at the same revision and
    /// built from the same pinned packages).
    ///
    /// Every directory holding a [`MANIFEST`] contributes its assets (the same asset in two
    /// manifests must be listed identically); parts are looked up in every directory, then
    /// among the parts kept by earlier incomplete installs. An asset complete in the cache
    /// already is left alone. For the others, every part's size and sha256 is checked, the
    /// files are assembled in a build directory under `tmp/`, each file's size and sha256 is
    /// checked, the bundled completion marker must fit the spec, and only then is the asset
    /// renamed into `assets/`.
    ///
    /// Assets that are complete and valid are installed even when others are not; when any
    /// is not, the result is [`AssetError::InstallIncomplete`] naming each missing or
    /// corrupt part, and those assets are unchanged in the cache.
    pub fn install_bundles_specs<P: AsRef<Path>>(
        &self,
        dirs: &[P],
        specs: &[AssetSpec],
    ) -> Result<InstallReport, AssetError> {
        let dirs: Vec<&Path> = dirs.iter().map(AsRef::as_ref).collect();
        let assets = read_manifests(&dirs)?;
        let mut report = InstallReport::default();
        let mut problems = Vec::new();
        // Parts of incomplete assets stay in the store even if another asset shares them.
        let mut keep: HashSet<String> = HashSet::new();
        let mut done: Vec<&BundleAsset> = Vec::new();
        for asset in &assets {
            let Some(spec) = specs.iter().find(|spec| spec.name == asset.name) else {
                let known: Vec<&str> = specs.iter().map(|spec| spec.name.as_str()).collect();
                problems.push(format!(
                    "asset `{}`: unknown to this lorasweep (known: {})",
                    asset.name,
                    known.join(", ")
                ));
                continue;
            };
            if let Some(path) = self.cached_spec(spec) {
                tracing::info!(asset = %asset.name, "already cached");
                report.already_cached.push((asset.name.clone(), path));
                done.push(asset);
                continue;
            }
            if asset.revision != spec.revision {
                problems.push(format!(
                    "asset `{}`: the bundle holds revision {}, this lorasweep expects revision \
                     {}; bundle it again with this version (nothing changed in the cache)",
                    asset.name, asset.revision, spec.revision
                ));
                continue;
            }
            match self.install_one(asset, spec, &dirs)? {
                Ok(path) => {
                    report.installed.push((asset.name.clone(), path));
                    done.push(asset);
                }
                Err(problem) => {
                    keep.extend(all_parts(asset).map(|part| part.sha256.clone()));
                    problems.push(problem);
                }
            }
        }
        for asset in done {
            self.forget_parts(asset, &keep);
        }
        if problems.is_empty() {
            Ok(report)
        } else {
            let installed = report
                .installed
                .iter()
                .chain(&report.already_cached)
                .map(|(name, _)| name.clone())
                .collect();
            Err(AssetError::InstallIncomplete {
                installed,
                problems,
            })
        }
    }

    /// Verifies, assembles and places one asset. The outer error is an I/O failure that stops
    /// the install; the inner one describes why this asset cannot be installed (the cache
    /// unchanged for it).
    fn install_one(
        &self,
        asset: &BundleAsset,
        spec: &AssetSpec,
        dirs: &[&Path],
    ) -> Result<Result<PathBuf, String>, AssetError> {
        let store = self.home.join(PARTS_DIR);
        // Where each part was found valid, by (file index, part index).
        let mut found: BTreeMap<(usize, usize), PathBuf> = BTreeMap::new();
        let mut issues = Vec::new();
        let mut needed = Vec::new();
        for (file_index, file) in asset.files.iter().enumerate() {
            let count = file.parts.len();
            for (part_index, part) in file.parts.iter().enumerate() {
                let mut candidates: Vec<PathBuf> = dirs
                    .iter()
                    .map(|dir| dir.join(&part.name))
                    .filter(|path| path.is_file())
                    .collect();
                let stored = store.join(&part.sha256);
                if stored.is_file() {
                    candidates.push(stored);
                }
                let what = format!(
                    "file `{}` part {}/{count} `{}`",
                    file.path,
                    part_index + 1,
                    part.name
                );
                let mut corrupt = None;
                for candidate in &candidates {
                    match part_digest(candidate, part.size)? {
                        Some(digest) if digest == part.sha256 => {
                            found.insert((file_index, part_index), candidate.clone());
                            break;
                        }
                        Some(digest) => {
                            corrupt.get_or_insert(format!(
                                "{what} is corrupt: {} has sha256 {digest}, the manifest says {}",
                                candidate.display(),
                                part.sha256
                            ));
                        }
                        None => {
                            let actual = std::fs::metadata(candidate)
                                .map_err(io_error(candidate))?
                                .len();
                            corrupt.get_or_insert(format!(
                                "{what} is corrupt: {} has {actual} bytes, the manifest says {}",
                                candidate.display(),
                                part.size
                            ));
                        }
                    }
                }
                if found.contains_key(&(file_index, part_index)) {
                    continue;
                }
                needed.push(part.name.clone());
                issues.push(corrupt.unwrap_or_else(|| format!("{what} is missing")));
            }
        }
        if !issues.is_empty() {
            let kept = self.keep_parts(asset, &found, &store)?;
            let mut problem = format!(
                "asset `{}` not installed (nothing changed in the cache for it): {}; still \
                 needed: {}",
                asset.name,
                issues.join("; "),
                needed.join(", ")
            );
            if kept > 0 {
                problem.push_str(&format!(
                    " ({kept} verified parts kept in {} for the next install)",
                    store.display()
                ));
            }
            return Ok(Err(problem));
        }

        let build = self.build_dir(&asset.name)?;
        // The marker last, so the build is never complete before its files are.
        let mut order: Vec<usize> = (0..asset.files.len()).collect();
        order.sort_by_key(|index| asset.files[*index].path == MARKER);
        for file_index in order {
            let file = &asset.files[file_index];
            let destination = build.path.join(&file.path);
            let mut writer = create_file(&destination)?;
            for part_index in 0..file.parts.len() {
                let source = &found[&(file_index, part_index)];
                let mut reader = File::open(source).map_err(io_error(source))?;
                std::io::copy(&mut reader, &mut writer).map_err(io_error(&destination))?;
            }
            finish_file(writer, &destination)?;
            let size = std::fs::metadata(&destination)
                .map_err(io_error(&destination))?
                .len();
            let digest = sha256_file(&destination)?;
            if size != file.size || digest != file.sha256 {
                return Ok(Err(format!(
                    "asset `{}` not installed (nothing changed in the cache for it): file `{}` \
                     assembled from valid parts has {size} bytes and sha256 {digest}, the \
                     manifest says {} bytes and {}; the manifest is inconsistent, bundle it \
                     again",
                    asset.name, file.path, file.size, file.sha256
                )));
            }
        }
        if let Err(reason) = check_complete(&build.path, spec) {
            return Ok(Err(format!(
                "asset `{}` not installed (nothing changed in the cache for it): the bundled \
                 build does not fit this lorasweep: {reason}",
                asset.name
            )));
        }
        let path = self.place(build, spec)?;
        tracing::info!(asset = %asset.name, path = %path.display(), "installed from bundle");
        Ok(Ok(path))
    }

    /// Copies the valid parts found outside the store into it, for a later install; returns
    /// how many parts of the asset the store now holds.
    fn keep_parts(
        &self,
        asset: &BundleAsset,
        found: &BTreeMap<(usize, usize), PathBuf>,
        store: &Path,
    ) -> Result<usize, AssetError> {
        if found.is_empty() {
            return Ok(0);
        }
        std::fs::create_dir_all(store).map_err(io_error(store))?;
        for ((file_index, part_index), source) in found {
            let part = &asset.files[*file_index].parts[*part_index];
            let stored = store.join(&part.sha256);
            if source == &stored || stored.is_file() {
                continue;
            }
            let staged = store.join(format!(".{}.{}.tmp", part.sha256, std::process::id()));
            std::fs::copy(source, &staged).map_err(io_error(source))?;
            File::open(&staged)
                .and_then(|file| file.sync_all())
                .map_err(io_error(&staged))?;
            std::fs::rename(&staged, &stored).map_err(io_error(&stored))?;
        }
        Ok(found.len())
    }

    /// Removes the kept parts of an installed asset (those not in `keep`).
    fn forget_parts(&self, asset: &BundleAsset, keep: &HashSet<String>) {
        let store = self.home.join(PARTS_DIR);
        if !store.is_dir() {
            return;
        }
        for part in all_parts(asset) {
            if !keep.contains(&part.sha256) {
                let _ = std::fs::remove_file(store.join(&part.sha256));
            }
        }
        // Only when empty.
        let _ = std::fs::remove_dir(&store);
    }
}

fn all_parts(asset: &BundleAsset) -> impl Iterator<Item = &BundlePart> {
    asset.files.iter().flat_map(|file| file.parts.iter())
}

/// The sha256 of a part file, or `None` when its size is not `size` (not worth hashing).
fn part_digest(path: &Path, size: u64) -> Result<Option<String>, AssetError> {
    let actual = std::fs::metadata(path).map_err(io_error(path))?.len();
    if actual != size {
        return Ok(None);
    }
    sha256_file(path).map(Some)
}

/// Splits one file of an asset into parts in `out`; returns its manifest entry.
fn split_file(
    asset: &str,
    dir: &Path,
    path: &str,
    size: u64,
    out: &Path,
    part_size: u64,
    names: &mut HashSet<String>,
) -> Result<BundleFile, AssetError> {
    let source = dir.join(path);
    let sha256 = sha256_file(&source)?;
    let count = size.div_ceil(part_size);
    let width = count.to_string().len().max(3);
    let flat = path.replace('/', "--");
    let mut reader =
        BufReader::with_capacity(1 << 20, File::open(&source).map_err(io_error(&source))?);
    let mut parts = Vec::with_capacity(count as usize);
    for index in 0..count {
        let name = format!("{asset}--{flat}.part{index:0width$}");
        if !names.insert(name.clone()) || name == MANIFEST {
            return Err(AssetError::BadBundle {
                path: out.to_path_buf(),
                detail: format!("two bundled files would share the part name {name}"),
            });
        }
        let expected = part_size.min(size - index * part_size);
        let staged = out.join(format!(".{name}.tmp"));
        let mut writer = create_file(&staged)?;
        let copied = std::io::copy(&mut (&mut reader).take(expected), &mut writer)
            .map_err(io_error(&source))?;
        finish_file(writer, &staged)?;
        if copied != expected {
            let _ = std::fs::remove_file(&staged);
            return Err(AssetError::Invalid {
                path: source,
                detail: format!("the file shrank while it was bundled (expected {size} bytes)"),
            });
        }
        let part_sha256 = sha256_file(&staged)?;
        let target = out.join(&name);
        std::fs::rename(&staged, &target).map_err(io_error(&target))?;
        parts.push(BundlePart {
            name,
            size: expected,
            sha256: part_sha256,
        });
    }
    Ok(BundleFile {
        path: path.to_string(),
        size,
        sha256,
        parts,
    })
}

/// The assets of every manifest in `dirs`, merged by name and checked for paths that would
/// leave the asset or bundle directory.
fn read_manifests(dirs: &[&Path]) -> Result<Vec<BundleAsset>, AssetError> {
    let mut assets: Vec<BundleAsset> = Vec::new();
    let mut any = false;
    for dir in dirs {
        if !dir.is_dir() {
            return Err(AssetError::BadBundle {
                path: dir.to_path_buf(),
                detail: "not a directory".into(),
            });
        }
        let path = dir.join(MANIFEST);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(AssetError::Io { path, source }),
        };
        any = true;
        let bad = |detail: String| AssetError::BadBundle {
            path: path.clone(),
            detail,
        };
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|error| bad(format!("not a bundle manifest: {error}")))?;
        if manifest.format != MANIFEST_FORMAT || manifest.version != MANIFEST_VERSION {
            return Err(bad(format!(
                "format `{}` version {}; this lorasweep reads `{MANIFEST_FORMAT}` version \
                 {MANIFEST_VERSION}",
                manifest.format, manifest.version
            )));
        }
        for asset in manifest.assets {
            check_entry(&asset).map_err(&bad)?;
            match assets.iter().find(|known| known.name == asset.name) {
                Some(known) if *known == asset => {}
                Some(_) => {
                    return Err(bad(format!(
                        "asset `{}` is listed differently in another manifest given; install \
                         one bundle's directories at a time",
                        asset.name
                    )))
                }
                None => assets.push(asset),
            }
        }
    }
    if !any {
        let listed: Vec<String> = dirs.iter().map(|dir| dir.display().to_string()).collect();
        return Err(AssetError::BadBundle {
            path: dirs
                .first()
                .map(|dir| dir.to_path_buf())
                .unwrap_or_default(),
            detail: format!(
                "no {MANIFEST} in {}; copy the bundle's {MANIFEST} along with its parts (an \
                 interrupted bundle has none: bundle again)",
                listed.join(", ")
            ),
        });
    }
    Ok(assets)
}

/// Refuses manifest entries that could write outside their directories or can never be
/// complete.
fn check_entry(asset: &BundleAsset) -> Result<(), String> {
    let plain = |name: &str| {
        !name.is_empty() && name != "." && name != ".." && !name.contains(['/', '\\', '\0'])
    };
    let hex = |digest: &str| {
        digest.len() == 64
            && digest
                .bytes()
                .all(|byte| byte.is_ascii_digit() || (b'a'..=b'f').contains(&byte))
    };
    if !plain(&asset.name) {
        return Err(format!("bad asset name `{}`", asset.name));
    }
    if !asset.files.iter().any(|file| file.path == MARKER) {
        return Err(format!(
            "asset `{}` has no completion marker ({MARKER}) in its files",
            asset.name
        ));
    }
    for file in &asset.files {
        if file.path.is_empty() || !file.path.split('/').all(plain) {
            return Err(format!(
                "asset `{}`: bad file path `{}`",
                asset.name, file.path
            ));
        }
        if !hex(&file.sha256) {
            return Err(format!(
                "asset `{}`: file `{}` has a malformed sha256",
                asset.name, file.path
            ));
        }
        for part in &file.parts {
            if !plain(&part.name) || !hex(&part.sha256) {
                return Err(format!(
                    "asset `{}`: file `{}` has a malformed part entry `{}`",
                    asset.name, file.path, part.name
                ));
            }
        }
        if file.parts.iter().map(|part| part.size).sum::<u64>() != file.size {
            return Err(format!(
                "asset `{}`: the parts of `{}` do not add up to its size",
                asset.name, file.path
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_take_binary_units() {
        assert_eq!(parse_size("1000").unwrap(), 1000);
        assert_eq!(parse_size("45M").unwrap(), 45 << 20);
        assert_eq!(parse_size("2k").unwrap(), 2048);
        assert_eq!(parse_size("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_size(" 3 MB ").unwrap(), 3 << 20);
        for bad in ["", "0", "M", "-5", "1.5G", "12X", "99999999999999G"] {
            let error = parse_size(bad).unwrap_err();
            assert!(matches!(error, AssetError::BadPartSize { .. }), "{bad}");
        }
    }

    #[test]
    fn manifest_entries_cannot_escape() {
        let part = BundlePart {
            name: "toy--a.part000".into(),
            size: 1,
            sha256: "a".repeat(64),
        };
        let file = |path: &str| BundleFile {
            path: path.into(),
            size: 1,
            sha256: "b".repeat(64),
            parts: vec![part.clone()],
        };
        let asset = |files: Vec<BundleFile>| BundleAsset {
            name: "toy".into(),
            revision: 1,
            files,
        };
        assert!(check_entry(&asset(vec![file("a"), file(MARKER)])).is_ok());
        assert!(check_entry(&asset(vec![file("a")])).is_err());
        for path in ["../a", "/etc/a", "a//b", "a/./b", ""] {
            assert!(
                check_entry(&asset(vec![file(path), file(MARKER)])).is_err(),
                "{path}"
            );
        }
        let mut escaping = file("a");
        escaping.parts[0].name = "../x".into();
        assert!(check_entry(&asset(vec![escaping, file(MARKER)])).is_err());
    }
}
