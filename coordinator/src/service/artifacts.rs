//! The coordinator's artifact directory: uploads land in `tmp/` while their bytes are
//! hashed, and are renamed into `jobs/<job>/e<epoch>/<name>` only once size and SHA-256
//! match what the worker declared. Runs on blocking threads (hashing and disk writes).

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

/// Bytes per download message.
pub const CHUNK_BYTES: usize = 1 << 20;

/// Why an upload was not kept.
#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    /// The content does not match the declared size.
    #[error("upload of {name} has {received} bytes, {declared} were declared")]
    SizeMismatch {
        /// Artifact name.
        name: String,
        /// Bytes received (so far, when over).
        received: u64,
        /// Bytes declared in the header.
        declared: u64,
    },
    /// The content does not match the declared SHA-256.
    #[error("upload of {name} has sha256 {actual}, {declared} was declared")]
    DigestMismatch {
        /// Artifact name.
        name: String,
        /// Digest of what arrived.
        actual: String,
        /// Digest declared in the header.
        declared: String,
    },
    /// Writing the file failed.
    #[error("cannot write artifact {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

impl UploadError {
    /// Whether the disk (or the user's quota) is full: the same upload may succeed once space
    /// is freed.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            UploadError::Io { source, .. } if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        )
    }
}

/// The path of an artifact relative to the artifact directory.
pub fn relative_path(job: u64, epoch: u64, name: &str) -> String {
    format!("jobs/{job}/e{epoch}/{name}")
}

/// Whether `text` is a lowercase hex SHA-256.
pub fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64
        && text
            .chars()
            .all(|character| matches!(character, '0'..='9' | 'a'..='f'))
}

/// What the header of an upload promised.
#[derive(Debug, Clone)]
pub struct Declared {
    /// Artifact name.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// Lowercase hex SHA-256.
    pub sha256: String,
}

/// Receives chunks until the channel closes, then keeps the file at `root/relative` if size
/// and digest match. The temporary file is removed on any failure.
pub fn receive_upload(
    mut chunks: mpsc::Receiver<Vec<u8>>,
    root: &Path,
    relative: &str,
    declared: &Declared,
) -> Result<(), UploadError> {
    let temporary = root
        .join("tmp")
        .join(format!("{:016x}.part", rand::random::<u64>()));
    let io_error = |path: &Path| {
        let path = path.display().to_string();
        move |source| UploadError::Io { path, source }
    };
    let result = (|| {
        std::fs::create_dir_all(root.join("tmp")).map_err(io_error(&temporary))?;
        let mut file = File::create(&temporary).map_err(io_error(&temporary))?;
        let mut hasher = Sha256::new();
        let mut received: u64 = 0;
        while let Some(chunk) = chunks.blocking_recv() {
            received += chunk.len() as u64;
            if received > declared.size {
                return Err(UploadError::SizeMismatch {
                    name: declared.name.clone(),
                    received,
                    declared: declared.size,
                });
            }
            hasher.update(&chunk);
            if let Some(full) = crate::faults::disk_full() {
                return Err(io_error(&temporary)(full));
            }
            file.write_all(&chunk).map_err(io_error(&temporary))?;
        }
        if received != declared.size {
            return Err(UploadError::SizeMismatch {
                name: declared.name.clone(),
                received,
                declared: declared.size,
            });
        }
        let actual = hex::encode(hasher.finalize());
        if actual != declared.sha256 {
            return Err(UploadError::DigestMismatch {
                name: declared.name.clone(),
                actual,
                declared: declared.sha256.clone(),
            });
        }
        file.sync_all().map_err(io_error(&temporary))?;
        let destination = root.join(relative);
        if let Some(parent) = destination.parent() {
            std::fs::create_dir_all(parent).map_err(io_error(parent))?;
        }
        std::fs::rename(&temporary, &destination).map_err(io_error(&destination))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    result
}

/// Reads a file in [`CHUNK_BYTES`] pieces, handing each to `send` (which returns false when
/// the receiver is gone). An empty file gives one empty piece.
pub fn read_chunks(path: &PathBuf, mut send: impl FnMut(Vec<u8>) -> bool) -> std::io::Result<()> {
    let mut file = File::open(path)?;
    let mut first = true;
    loop {
        let mut chunk = vec![0u8; CHUNK_BYTES];
        let mut filled = 0;
        while filled < CHUNK_BYTES {
            let read = file.read(&mut chunk[filled..])?;
            if read == 0 {
                break;
            }
            filled += read;
        }
        chunk.truncate(filled);
        if filled == 0 && !first {
            return Ok(());
        }
        first = false;
        let last = filled < CHUNK_BYTES;
        if !send(chunk) || last {
            return Ok(());
        }
    }
}

/// Lowercase hex SHA-256 and size of a file.
pub fn digest_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; CHUNK_BYTES];
    let mut size = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            break;
        }
        size += read as u64;
        hasher.update(&buffer[..read]);
    }
    Ok((hex::encode(hasher.finalize()), size))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn declared(content: &[u8]) -> Declared {
        Declared {
            name: "a.bin".to_string(),
            size: content.len() as u64,
            sha256: hex::encode(Sha256::digest(content)),
        }
    }

    fn upload(root: &Path, chunks: Vec<Vec<u8>>, declared: &Declared) -> Result<(), UploadError> {
        let (sender, receiver) = mpsc::channel(chunks.len().max(1));
        for chunk in chunks {
            sender.try_send(chunk).unwrap();
        }
        drop(sender);
        receive_upload(receiver, root, "jobs/1/e1/a.bin", declared)
    }

    #[test]
    fn a_matching_upload_is_kept_and_a_mismatch_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let content = b"hello artifact".to_vec();
        upload(
            dir.path(),
            vec![content[..5].to_vec(), content[5..].to_vec()],
            &declared(&content),
        )
        .unwrap();
        assert_eq!(
            std::fs::read(dir.path().join("jobs/1/e1/a.bin")).unwrap(),
            content
        );
        let mut wrong = declared(&content);
        wrong.sha256 = "0".repeat(64);
        let error = upload(dir.path(), vec![content.clone()], &wrong).unwrap_err();
        assert!(matches!(error, UploadError::DigestMismatch { .. }));
        let error = upload(
            dir.path(),
            vec![content.clone(), b"x".to_vec()],
            &declared(&content),
        )
        .unwrap_err();
        assert!(matches!(error, UploadError::SizeMismatch { .. }));
        assert_eq!(
            std::fs::read_dir(dir.path().join("tmp")).unwrap().count(),
            0,
            "no temporary files left"
        );
    }

    #[test]
    fn a_full_disk_is_told_apart_from_a_bad_upload() {
        // What the kernel answers when a disk is full.
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .and_then(|mut file| file.write_all(b"x"))
            .unwrap_err();
        let error = UploadError::Io {
            path: "tmp/x.part".to_string(),
            source: full,
        };
        assert!(error.is_disk_full(), "{error}");
        let error = UploadError::Io {
            path: "tmp/x.part".to_string(),
            source: std::io::Error::from(std::io::ErrorKind::PermissionDenied),
        };
        assert!(!error.is_disk_full());
        let error = UploadError::SizeMismatch {
            name: "a".to_string(),
            received: 1,
            declared: 2,
        };
        assert!(!error.is_disk_full());
    }

    #[test]
    fn files_are_read_back_in_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let content: Vec<u8> = (0..(CHUNK_BYTES * 2 + 10))
            .map(|index| (index % 251) as u8)
            .collect();
        std::fs::write(&path, &content).unwrap();
        let mut pieces = Vec::new();
        read_chunks(&path, |chunk| {
            pieces.push(chunk);
            true
        })
        .unwrap();
        assert_eq!(pieces.len(), 3);
        assert_eq!(pieces.concat(), content);
        let empty = dir.path().join("empty");
        std::fs::write(&empty, b"").unwrap();
        let mut count = 0;
        read_chunks(&empty, |chunk| {
            assert!(chunk.is_empty());
            count += 1;
            true
        })
        .unwrap();
        assert_eq!(count, 1);
        assert_eq!(digest_file(&path).unwrap().1, content.len() as u64);
    }
}
