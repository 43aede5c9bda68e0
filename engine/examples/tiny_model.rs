//! Writes a small random Llama model as a Hugging Face directory (config.json, safetensors,
//! a byte-level BPE tokenizer.json with a ChatML template): the model the tests train,
//! usable where the real weights cannot go (the GPU machine of the device runs, whose calls
//! carry at most 64 MiB).
//!
//! `cargo run --release -p lorasweep-engine --example tiny_model -- DIR [HIDDEN LAYERS]`

#[path = "../tests/common/files.rs"]
mod files;

use std::path::PathBuf;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(dir) = args.next().map(PathBuf::from) else {
        eprintln!("usage: tiny_model DIR [HIDDEN LAYERS]");
        std::process::exit(2);
    };
    let number = |text: Option<String>, default: usize, what: &str| match text {
        None => default,
        Some(text) => text.parse().unwrap_or_else(|_| {
            eprintln!("tiny_model: {what} must be a number, got {text:?}");
            std::process::exit(2);
        }),
    };
    let mut spec = files::hf_spec("llama", 7);
    if let Some(hidden) = args.next() {
        spec.hidden = number(Some(hidden), spec.hidden, "HIDDEN");
        spec.ffn = (spec.hidden * 8 / 3).div_ceil(8) * 8;
    }
    spec.layers = number(args.next(), spec.layers, "LAYERS");
    files::write_hf_dir(&dir, &spec);
    println!("{}", dir.display());
}
