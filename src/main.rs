//! The `easel` binary: everything lives in the library; this only runs the command line (and, with the default
//! `mimalloc` feature, picks the allocator).

#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    easel::cli::run()
}
