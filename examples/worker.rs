//! A GPU pool from any queue URL in about 40 lines.
//!
//! ```sh
//! cargo run --example worker -- sqlite://.gpupool/queue.db /path/to/repo
//! ```

use std::error::Error;

use gpupool_core::gpu::GpuSelection;
use gpupool_worker::{Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| gpupool_cli::DEFAULT_QUEUE_URL.to_owned());
    let repo = args.next().unwrap_or_else(|| ".".to_owned());

    // The scheme picks the backend: sqlite://, memory://, …
    let queue = gpupool_cli::connect(&url).await?;

    let mut cfg = WorkerConfig::new(gpupool_cli::default_data_dir());
    cfg.repo = Some(std::fs::canonicalize(&repo)?.to_string_lossy().into_owned());
    cfg.gpus = gpupool_worker::resolve(&GpuSelection::Auto)?; // NVML; CPU-only without a driver
    cfg.slots = 2; // parallel runs when there is no GPU

    // Ctrl-C: stop reserving, let running jobs finish (drain), release the rest.
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });

    let summary = Worker::new(queue, cfg).run(shutdown).await?;
    println!("worker stopped after {} job(s)", summary.reserved);
    Ok(())
}
