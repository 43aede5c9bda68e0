//! With the `cuda` feature, compiles the engine's own kernels (`kernels/*.cu`) to PTX with
//! nvcc; the PTX is embedded in the library and loaded on first use. Without it, nothing runs.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = std::env::var_os("CUDA_HOME")
        .map(|home| Path::new(&home).join("bin").join("nvcc"))
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    // PTX for the virtual architecture: the driver compiles it for the actual GPU at load time.
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_string());
    let cap = cap.trim().replace('.', "");
    if cap.parse::<u32>().map_or(true, |c| c < 80) {
        panic!("CUDA_COMPUTE_CAP={cap}: the engine's kernels need compute capability 8.0 or newer (bf16)");
    }
    let source = Path::new("kernels").join("engine.cu");
    let ptx = out_dir.join("engine.ptx");
    let status = Command::new(&nvcc)
        .arg("--ptx")
        .arg(format!("--gpu-architecture=compute_{cap}"))
        .args(["-O3", "--std=c++17", "-o"])
        .arg(&ptx)
        .arg(&source)
        .status()
        .unwrap_or_else(|e| panic!("could not run {}: {e} (set CUDA_HOME)", nvcc.display()));
    if !status.success() {
        panic!("nvcc failed on {} ({status})", source.display());
    }
}
