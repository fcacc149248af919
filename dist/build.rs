// Compiles shim/c10d.cpp against the libtorch torch-sys found. c10d's Gloo
// header includes Gloo's own headers, which the PyTorch wheel does not ship:
// `make setup` unpacks Debian's libgloo-dev into the user cache (headers
// only; the symbols come from libtorch_cpu, which carries its own Gloo).
#[path = "../build/link_torch.rs"]
mod link_torch;

use std::path::PathBuf;

fn main() {
    link_torch::main();
    println!("cargo:rerun-if-changed=shim/c10d.cpp");
    println!("cargo:rerun-if-env-changed=MEDZERO_GLOO_INCLUDE");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        return;
    };
    let include = PathBuf::from(lib).join("../include");
    let gloo = std::env::var("MEDZERO_GLOO_INCLUDE").map(PathBuf::from);
    let gloo = match gloo {
        Ok(dir) if dir.join("gloo/algorithm.h").exists() => dir,
        _ => panic!(
            "Gloo's headers were not found (MEDZERO_GLOO_INCLUDE, set by .cargo/config.toml to \
             .medzero/gloo-include): run `make setup`, which unpacks them from Debian's \
             libgloo-dev into the user cache"
        ),
    };
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .include(&gloo)
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DUSE_C10D_GLOO")
        .file("shim/c10d.cpp")
        .compile("medzero_c10d");
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
}
