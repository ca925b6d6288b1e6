//! Bad credentials, a missing vhost and an unreachable host each give one
//! clear line within 5 s, never with the password.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use gpupool_amqp::AmqpQueue;

async fn error_of(url: &str) -> String {
    let started = Instant::now();
    let err = AmqpQueue::connect(url).await.expect_err("connect must fail").to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}: {err}", started.elapsed());
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

#[tokio::test]
async fn bad_credentials_missing_vhost_unreachable_host() {
    let Some(good) = common::url("errors.") else { return };
    let after = good.split_once("://").unwrap().1;
    let authority = after.split_once('@').map_or(after, |(_, h)| h).split('/').next().unwrap().to_owned();

    let e = error_of(&format!("amqp://guest:Wr0ngPass@{authority}/%2f")).await;
    assert!(e.contains(&authority) && (e.contains("ACCESS_REFUSED") || e.to_lowercase().contains("auth")), "{e}");
    assert!(!e.contains("Wr0ngPass"), "{e}");

    let e = error_of(&format!("amqp://guest:guest@{authority}/no-such-vhost")).await;
    assert!(e.contains(&authority) && (e.contains("vhost") || e.contains("NOT_ALLOWED")), "{e}");
    assert!(!e.contains(":guest@"), "{e}");

    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = error_of(&format!("amqp://u:s3cret@127.0.0.1:{port}/%2f")).await;
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}
