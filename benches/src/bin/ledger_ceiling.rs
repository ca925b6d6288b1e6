//! How many ledger events per second one RabbitMQ stream carries when every
//! client reads every event, as every gpupool process does.
//!
//! `cargo run --release -p gpupool-benches --bin ledger_ceiling -- [--queue URL] [--events N] [--clients 1,8] [--readers R]`
//!
//! Each client has its own connection, publishes an event the size of a
//! gpupool `Want` to a fresh stream and waits until its own consumer (reading
//! from `next`, acknowledging every 64 deliveries, as the backend does) sees
//! it, then publishes the next. It prints one line per client count:
//! `CEILING clients=C events_per_s=R`. A gpupool job needs two such events
//! (its lease and its completion), so half of R bounds the RabbitMQ drain
//! with C consumers, whatever the rest of the backend does.
//!
//! With `--readers R`, only R of the clients read the stream (the others
//! wait for the broker's confirm of each event instead), and the line says
//! `readers=R`: the ceiling of a design in which workers write the ledger
//! and only a few processes fold it (BENCHMARKS.md, RabbitMQ drain).

// A measuring tool: a panic is how it reports a broken setup.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gpupool_benches::amqp;
use lapin::options::{BasicAckOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeleteOptions};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use tokio::sync::oneshot;

type Waiters = Arc<Mutex<HashMap<String, oneshot::Sender<()>>>>;

async fn client(url: String, stream: String, events: usize, reads: bool) {
    let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let publish = conn.create_channel().await.unwrap();
    publish.confirm_select(ConfirmSelectOptions::default()).await.unwrap();
    if !reads {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for _ in 0..events {
            let body = serde_json::to_vec(&want(uuid::Uuid::new_v4().simple().to_string())).unwrap();
            amqp::publish_confirmed(&publish, &stream, &body).await.unwrap();
        }
        return;
    }
    let read = conn.create_channel().await.unwrap();
    let mut consumer = amqp::read_from_next(&read, &stream).await.unwrap();
    let waiters: Waiters = Arc::default();
    let seen = Arc::clone(&waiters);
    tokio::spawn(async move {
        let mut n = 0u64;
        while let Some(Ok(d)) = consumer.next().await {
            let event: serde_json::Value = serde_json::from_slice(&d.data).unwrap();
            let nonce = event["nonce"].as_str().unwrap_or_default().to_owned();
            if let Some(tx) = seen.lock().unwrap().remove(&nonce) {
                let _ = tx.send(());
            }
            n += 1;
            if n.is_multiple_of(64) {
                d.acker.ack(BasicAckOptions { multiple: true }).await.unwrap();
            }
        }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    for _ in 0..events {
        let nonce = uuid::Uuid::new_v4().simple().to_string();
        let event = want(nonce.clone());
        let (tx, rx) = oneshot::channel();
        waiters.lock().unwrap().insert(nonce, tx);
        let props = BasicProperties::default().with_delivery_mode(2);
        let body = serde_json::to_vec(&event).unwrap();
        let _confirm = publish
            .basic_publish("".into(), stream.as_str().into(), BasicPublishOptions::default(), &body, props)
            .await
            .unwrap();
        rx.await.unwrap();
    }
}

/// An event the size of a gpupool `Want`.
fn want(nonce: String) -> serde_json::Value {
    serde_json::json!({
        "nonce": nonce, "at": 0, "type": "want", "token": uuid::Uuid::new_v4().simple().to_string(),
        "owner": uuid::Uuid::new_v4().simple().to_string(), "worker": "gpu-host-01:12345",
        "queues": ["default"], "gpu_limit": 0, "gpu_host": false, "lease_ms": 60000, "wait_ms": 0,
    })
}

#[tokio::main]
async fn main() {
    let mut url = "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned();
    let mut events = 2000usize;
    let mut counts = vec![1usize, 8];
    let mut readers: Option<usize> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--queue" => url = args.next().expect("--queue URL"),
            "--events" => events = args.next().and_then(|v| v.parse().ok()).expect("--events N"),
            "--clients" => {
                let list = args.next().expect("--clients C[,C…]");
                counts = list.split(',').map(|c| c.parse().expect("--clients takes numbers: 1,8")).collect();
            }
            "--readers" => readers = Some(args.next().and_then(|v| v.parse().ok()).expect("--readers R")),
            other => {
                panic!("unknown argument {other}; use [--queue URL] [--events N] [--clients C[,C…]] [--readers R]")
            }
        }
    }
    let stream = format!("gpupool-bench.ceiling.{}", uuid::Uuid::new_v4().simple());
    let conn = Connection::connect(&url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    amqp::declare(&ch, &stream, "stream").await.unwrap();
    for clients in counts {
        let t = Instant::now();
        let reading = readers.unwrap_or(clients);
        let tasks: Vec<_> = (0..clients)
            .map(|i| tokio::spawn(client(url.clone(), stream.clone(), events / clients, i < reading)))
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        // Each client waits 300 ms for its consumer to attach before it starts.
        let took = t.elapsed().saturating_sub(Duration::from_millis(300));
        let rate = (events / clients * clients) as f64 / took.as_secs_f64();
        match readers {
            Some(r) => println!("CEILING clients={clients} readers={r} events_per_s={rate:.0}"),
            None => println!("CEILING clients={clients} events_per_s={rate:.0}"),
        }
    }
    ch.queue_delete(stream.as_str().into(), QueueDeleteOptions::default()).await.unwrap();
}
