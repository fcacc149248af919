//! The `medzero` binary: see [`medzero::cli`].

fn main() -> std::process::ExitCode {
    medzero::cli::main()
}
