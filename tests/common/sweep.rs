//! The folder an end-to-end sweep test starts from: a tiny Llama model in `model/`, the chat
//! data in `chat.jsonl` and the coordinator's token in `token`. Included beside `files`
//! (`engine/tests/common/files.rs`), which writes the model.

use std::path::Path;

pub fn folder(token: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    crate::files::write_hf_dir(
        &dir.path().join("model"),
        &crate::files::hf_spec("llama", 11),
    );
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("engine/tests/fixtures/engine/chat.jsonl"),
        dir.path().join("chat.jsonl"),
    )
    .unwrap();
    std::fs::write(dir.path().join("token"), token).unwrap();
    dir
}
