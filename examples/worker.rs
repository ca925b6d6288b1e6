//! A GPU pool from any queue URL, on the `gpupool` facade alone.
//!
//! ```sh
//! cargo run --example worker -- sqlite://.gpupool/queue.db /path/to/repo
//! cargo run --example worker -- mysql://gpupool:gpupool@127.0.0.1:3306/gpupool_test /path/to/repo
//! ```
//!
//! Add `--burst` after the repository to exit once nothing is left to run.

use std::error::Error;

use gpupool::gpu::GpuSelection;
use gpupool::{CancellationToken, Worker, WorkerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let mut args = std::env::args().skip(1);
    let url = args.next().unwrap_or_else(|| "sqlite://.gpupool/queue.db".to_owned());
    let repo = args.next().unwrap_or_else(|| ".".to_owned());
    let burst = args.next().as_deref() == Some("--burst");

    // The scheme picks the backend: sqlite://, mysql://, redis://, amqp://, memory://
    let queue = gpupool::connect(&url).await?;
    queue.init().await?;

    let data_dir = std::env::temp_dir().join("gpupool-example-worker");
    let mut cfg = WorkerConfig::new(&data_dir);
    cfg.repo = Some(std::fs::canonicalize(&repo)?.to_string_lossy().into_owned());
    let inventory = gpupool::inventory(&GpuSelection::Auto)?; // NVML; CPU-only without a driver
    cfg.slots = 2; // parallel runs when there is no GPU
    cfg.burst = burst;

    // Ctrl-C: stop reserving, let running jobs finish (drain), release the rest.
    let shutdown = CancellationToken::new();
    let on_signal = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        on_signal.cancel();
    });

    let worker = Worker::builder(queue, cfg).inventory(inventory).build();
    let summary = worker.run(shutdown).await?;
    println!("worker stopped after {} job(s)", summary.reserved);
    Ok(())
}
