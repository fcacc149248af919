// Shared build script of every crate that links libtorch (see REFERENCE 7).
// tch's own build only sets these for itself; binaries and tests of a
// dependent crate need them repeated:
//   - an rpath to libtorch's lib dir, so nothing needs LD_LIBRARY_PATH;
//   - `--no-as-needed -ltorch`, else the linker drops libtorch_cuda and CUDA is
//     silently unavailable on GPU machines.
pub fn main() {
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        println!(
            "cargo:warning=torch-sys did not report a libtorch lib dir; run `make setup` first"
        );
        return;
    };
    let lib = std::fs::canonicalize(&lib).unwrap_or_else(|_| lib.into());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-L{}", lib.display());
    println!("cargo:rustc-link-arg=-ltorch");
}
