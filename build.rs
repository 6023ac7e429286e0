//! Compiles `kernels/*.cu` to PTX with nvcc when the `cuda` feature is on; does nothing
//! otherwise, so the default build needs no CUDA toolkit.
//!
//! nvcc is `$NVCC`, else `$CUDA_HOME/bin/nvcc`, else `nvcc` on PATH. The PTX targets
//! `sm_$CUDA_COMPUTE_CAP` (default 90: H100/H200) and lands in `$OUT_DIR/<name>.ptx`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_HOME");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".to_string());
    let cap = cap.trim().trim_start_matches("sm_").replace('.', "");
    let nvcc = nvcc_path();
    let mut sources: Vec<PathBuf> = std::fs::read_dir("kernels")
        .expect("kernels/ is part of the source tree")
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect();
    sources.sort();
    for source in sources {
        compile(&nvcc, &source, &cap, &out_dir);
    }
}

fn nvcc_path() -> PathBuf {
    if let Some(nvcc) = std::env::var_os("NVCC") {
        return nvcc.into();
    }
    if let Some(home) = std::env::var_os("CUDA_HOME") {
        let nvcc = Path::new(&home).join("bin").join("nvcc");
        if nvcc.exists() {
            return nvcc;
        }
    }
    PathBuf::from("nvcc")
}

fn compile(nvcc: &Path, source: &Path, cap: &str, out_dir: &Path) {
    let stem = source.file_stem().expect("a .cu file has a stem");
    let ptx = out_dir.join(stem).with_extension("ptx");
    let status = Command::new(nvcc)
        .args(["--ptx", "-O3", "-std=c++17", "-lineinfo"])
        .arg(format!("-arch=sm_{cap}"))
        .arg("-o")
        .arg(&ptx)
        .arg(source)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "the cuda feature needs nvcc to compile {}: running {} failed: {e} \
                 (set NVCC or CUDA_HOME; scripts/install-nvcc.sh installs one from PyPI)",
                source.display(),
                nvcc.display()
            )
        });
    assert!(
        status.success(),
        "nvcc failed on {} ({status})",
        source.display()
    );
}
