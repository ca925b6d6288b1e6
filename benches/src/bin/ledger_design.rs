//! What a RabbitMQ drain could reach if gpupool's ledger were read by one
//! process instead of every one: the upper bound of that redesign, measured
//! with lapin alone beside the floor, in the same run.
//!
//! `cargo run --release -p gpupool-benches --bin ledger_design -- [--queue URL] [--jobs N] [--consumers C] [--runs R]`
//!
//! Each way drains N messages pushed beforehand to a quorum queue, with C
//! consumers, each on its own connection, with prefetch 1:
//! - `floor`: deliver, ack (the loadgen floor's drain);
//! - `completion_event`: deliver, publish a completion event to a stream
//!   (confirmed), ack. One more connection reads the stream, as the one
//!   folding process would, and the clock stops when it has seen every
//!   event. That is the least a job can cost while its end is written to a
//!   ledger that is read back;
//! - `lease_and_completion`: the same with a lease event published before
//!   the completion, for a design in which the lease is an event too.
//!
//! It prints `DESIGN way=<way> jobs_per_s=<r> ratio=<r / floor>` per run.

// A measuring tool: a panic is how it reports a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gpupool_benches::amqp;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use tokio::sync::Notify;

/// An event the size of a gpupool ledger event.
fn event(kind: &str) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "type": kind, "at": 0, "job": "123456", "token": uuid::Uuid::new_v4().simple().to_string(),
        "worker": "gpu-host-01:12345", "exit_code": 0, "output_tail": "",
    }))
    .unwrap()
}

/// Drains `n` jobs one of three ways (`events` per job: 0, 1 or 2); returns jobs/s.
async fn drain(url: &str, n: usize, consumers: usize, events: usize) -> f64 {
    let tag = uuid::Uuid::new_v4().simple().to_string();
    let (work, ledger) = (format!("gpupool-bench.work.{tag}"), format!("gpupool-bench.ledger.{tag}"));
    let conn = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    amqp::declare(&ch, &work, "quorum").await.unwrap();
    amqp::declare(&ch, &ledger, "stream").await.unwrap();
    let spec = gpupool_benches::spec_text();
    for _ in 0..n {
        amqp::publish_confirmed(&ch, &work, spec.as_bytes()).await.unwrap();
    }

    // The one folding reader: counts the events it has seen.
    let seen = Arc::new(AtomicUsize::new(0));
    let all_seen = Arc::new(Notify::new());
    let reader = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
    if events > 0 {
        let rc = reader.create_channel().await.unwrap();
        let mut stream = amqp::read_from_next(&rc, &ledger).await.unwrap();
        let (seen, all_seen) = (Arc::clone(&seen), Arc::clone(&all_seen));
        let want = n * events;
        tokio::spawn(async move {
            while let Some(Ok(d)) = stream.next().await {
                let k = seen.fetch_add(1, Ordering::Relaxed) + 1;
                if k.is_multiple_of(64) || k == want {
                    d.acker.ack(BasicAckOptions { multiple: true }).await.unwrap();
                }
                if k == want {
                    all_seen.notify_one();
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let mut workers = Vec::new();
    for _ in 0..consumers {
        let c = Connection::connect(url, ConnectionProperties::default()).await.unwrap();
        let get = c.create_channel().await.unwrap();
        get.basic_qos(1, BasicQosOptions::default()).await.unwrap();
        let put = c.create_channel().await.unwrap();
        put.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
        workers.push((c, get, put));
    }
    let remaining = Arc::new(AtomicUsize::new(n));
    let done = Arc::new(Notify::new());
    let t = Instant::now();
    let mut tasks = Vec::new();
    for (c, get, put) in workers {
        let mut deliveries = get
            .basic_consume(work.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await
            .unwrap();
        let (remaining, done, ledger) = (Arc::clone(&remaining), Arc::clone(&done), ledger.clone());
        tasks.push(tokio::spawn(async move {
            while remaining.load(Ordering::Relaxed) > 0 {
                let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(500), deliveries.next()).await else {
                    break;
                };
                if events == 2 {
                    amqp::publish_confirmed(&put, &ledger, &event("leased")).await.unwrap();
                }
                if events >= 1 {
                    amqp::publish_confirmed(&put, &ledger, &event("completed")).await.unwrap();
                }
                d.acker.ack(BasicAckOptions::default()).await.unwrap();
                if remaining.fetch_sub(1, Ordering::Relaxed) == 1 {
                    done.notify_one();
                }
            }
            let _ = c.close(200, "done".into()).await;
        }));
    }
    done.notified().await;
    if events > 0 {
        all_seen.notified().await;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    for task in tasks {
        task.await.unwrap();
    }
    assert!(events == 0 || seen.load(Ordering::Relaxed) == n * events, "the reader saw every event");
    let _ = reader.close(200, "done".into()).await;
    ch.queue_delete(work.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    ch.queue_delete(ledger.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
    let _ = conn.close(200, "done".into()).await;
    rate
}

#[tokio::main]
async fn main() {
    let mut url = "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned();
    let (mut jobs, mut consumers, mut runs) = (4000usize, 8usize, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |flag: &str| args.next().and_then(|v| v.parse().ok()).unwrap_or_else(|| panic!("{flag} N"));
        match a.as_str() {
            "--queue" => url = args.next().expect("--queue URL"),
            "--jobs" => jobs = num("--jobs"),
            "--consumers" => consumers = num("--consumers"),
            "--runs" => runs = num("--runs"),
            other => panic!("unknown argument {other}; use [--queue URL] [--jobs N] [--consumers C] [--runs R]"),
        }
    }
    // Interleaved, so each way sees the same minutes of the machine.
    for _ in 0..runs {
        let floor = drain(&url, jobs, consumers, 0).await;
        println!("DESIGN way=floor jobs_per_s={floor:.0} ratio=1.00");
        for (way, events) in [("completion_event", 1), ("lease_and_completion", 2)] {
            let rate = drain(&url, jobs, consumers, events).await;
            println!("DESIGN way={way} jobs_per_s={rate:.0} ratio={:.2}", rate / floor);
        }
    }
}
