//! Faults on purpose, for the chaos test (`tests/chaos.rs`): with `LORASWEEP_FAULTS` naming a
//! folder, the coordinator and the client look there for switch files.
//!
//! - `disk-full`: while it exists, every write into the coordinator's artifact directory fails
//!   as a full disk does (`ENOSPC`); removing it frees the disk.
//! - `upload-abort-<worker id>`: the next artifact upload of that worker stops midway (half
//!   of its bytes sent, then the stream ends), as when a worker's link breaks; the file is
//!   removed when it fires, so it fires once.
//!
//! Without the variable nothing is looked up and nothing changes.

use std::path::PathBuf;
use std::sync::OnceLock;

/// The environment variable naming the switch folder.
pub const FAULTS_ENV: &str = "LORASWEEP_FAULTS";

fn folder() -> Option<&'static PathBuf> {
    static FOLDER: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOLDER
        .get_or_init(|| std::env::var_os(FAULTS_ENV).map(PathBuf::from))
        .as_ref()
}

/// A full-disk error (`StorageFull`, what `ENOSPC` reads as) while the `disk-full` switch is on.
pub fn disk_full() -> Option<std::io::Error> {
    let on = folder()?.join("disk-full").exists();
    on.then(|| {
        std::io::Error::new(
            std::io::ErrorKind::StorageFull,
            "No space left on device (LORASWEEP_FAULTS disk-full)",
        )
    })
}

/// Whether `worker`'s next upload must stop midway (consumes the switch).
pub fn take_upload_abort(worker: &str) -> bool {
    folder().is_some_and(|folder| {
        std::fs::remove_file(folder.join(format!("upload-abort-{worker}"))).is_ok()
    })
}
