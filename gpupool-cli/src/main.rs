//! `gpupool`: push training runs, run GPU workers, list, cancel and retry,
//! on every backend compiled into the `gpupool` crate.

fn main() -> std::process::ExitCode {
    gpupool_cli::main_with(gpupool::Registry::with_defaults())
}
