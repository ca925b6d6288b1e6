//! The Redis server's CPU time per pushed and per drained job: gpupool's
//! push (one producer) against the floor's `XADD`, and gpupool's reserve
//! and complete against the floor's `XREADGROUP COUNT 1` and `XACK`, with
//! the same number of consumers, each its own connection.
//!
//! `cargo run --release -p gpupool-benches --bin redis_cpu -- [--queue URL] [--jobs N] [--consumers C]`
//!
//! With eight consumers the server is the bottleneck (one thread at ~100 %
//! of a core), so its CPU time per job, read from `INFO cpu` before and
//! after the drain, is what the drain rate answers to; unlike the rate, it
//! barely moves with the machine's noise. It prints
//! `REDIS_CPU way=<gpupool|floor>_<push|drain> jobs_per_s=<r> server_us_per_job=<u> server_busy=<share of a core> client_us_per_job=<u>`.

// A measuring tool: a panic is how it reports a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use gpupool_benches::{redis_floor, spec_text};
use gpupool_core::{Completion, JobSpec, ReserveRequest};

/// This process's CPU seconds (user + system).
fn own_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap().split_whitespace().collect();
    (fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap()) / 100.0
}

/// The server's CPU seconds (user + system), from `INFO cpu`.
async fn server_cpu(c: &mut redis::aio::MultiplexedConnection) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(c).await.unwrap();
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .sum()
}

/// Measures `drain` (which drains `n` jobs) and prints its line.
async fn measure(way: &str, n: usize, admin: &mut redis::aio::MultiplexedConnection, drain: impl Future<Output = ()>) {
    let (client0, server0, t) = (own_cpu(), server_cpu(admin).await, Instant::now());
    drain.await;
    let wall = t.elapsed().as_secs_f64();
    let (client, server) = (own_cpu() - client0, server_cpu(admin).await - server0);
    println!(
        "REDIS_CPU way={way} jobs_per_s={:.0} server_us_per_job={:.1} server_busy={:.2} client_us_per_job={:.1}",
        n as f64 / wall,
        1e6 * server / n as f64,
        server / wall,
        1e6 * client / n as f64
    );
}

async fn gpupool(url: &str, n: usize, consumers: usize, admin: &mut redis::aio::MultiplexedConnection) {
    let q = gpupool::connect(url).await.unwrap();
    q.init().await.unwrap();
    measure("gpupool_push", n, admin, async {
        for i in 0..n {
            q.push(JobSpec::new("main", "noop.py").arg("i", i)).await.unwrap();
        }
    })
    .await;
    let mut clients = Vec::new();
    for _ in 0..consumers {
        clients.push(gpupool::connect(url).await.unwrap());
    }
    measure("gpupool_drain", n, admin, async {
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| {
                tokio::spawn(async move {
                    let req = ReserveRequest::new("default");
                    while let Some(lease) = c.reserve(&req).await.unwrap() {
                        c.complete(&lease, Completion::default()).await.unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
}

async fn floor(client: &redis::Client, n: usize, consumers: usize, admin: &mut redis::aio::MultiplexedConnection) {
    let stream = format!("gpupool-bench:redis-cpu:{}", uuid::Uuid::new_v4().simple());
    redis_floor::create(admin, &stream).await.unwrap();
    let spec = spec_text();
    let mut pusher = client.get_multiplexed_async_connection().await.unwrap();
    measure("floor_push", n, admin, async {
        for _ in 0..n {
            redis_floor::push(&mut pusher, &stream, &spec).await.unwrap();
        }
    })
    .await;
    let mut conns = Vec::new();
    for _ in 0..consumers {
        conns.push(client.get_multiplexed_async_connection().await.unwrap());
    }
    measure("floor_drain", n, admin, async {
        let tasks: Vec<_> = conns
            .into_iter()
            .enumerate()
            .map(|(w, mut c)| {
                let stream = stream.clone();
                tokio::spawn(async move { redis_floor::drain(&mut c, &stream, &format!("c{w}")).await.unwrap() })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    })
    .await;
    let _: i64 = redis::cmd("DEL").arg(&stream).query_async(admin).await.unwrap();
}

#[tokio::main]
async fn main() {
    let (mut url, mut n, mut consumers) = ("redis://127.0.0.1:6379".to_owned(), 50_000usize, 8usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queue" => url = args.next().expect("--queue URL"),
            "--jobs" => n = args.next().and_then(|v| v.parse().ok()).expect("--jobs N"),
            "--consumers" => consumers = args.next().and_then(|v| v.parse().ok()).expect("--consumers C"),
            other => panic!("unknown argument {other}; use [--queue URL] [--jobs N] [--consumers C]"),
        }
    }
    let opts = gpupool_redis::RedisOptions::from_url(&url).unwrap();
    let client = redis::Client::open(opts.driver_url.as_str()).unwrap();
    let mut admin = client.get_multiplexed_async_connection().await.unwrap();
    // A fresh prefix, so the jobs drained are only these.
    let sep = if url.contains('?') { '&' } else { '?' };
    let prefix = format!("gpupool-bench:redis-cpu-{}:", uuid::Uuid::new_v4().simple());
    let bench_url = format!("{url}{sep}prefix={prefix}");
    gpupool(&bench_url, n, consumers, &mut admin).await;
    floor(&client, n, consumers, &mut admin).await;
    // What the gpupool run left: its keys, by prefix.
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut admin).await.unwrap();
    for chunk in keys.chunks(1000) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut admin).await.unwrap();
    }
}
