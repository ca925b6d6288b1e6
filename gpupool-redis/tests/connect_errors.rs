//! A refused AUTH, a wrong database number and an unreachable host each give
//! one clear line within 5 s, never with the password.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use gpupool_redis::RedisQueue;

async fn error_of(url: &str) -> String {
    let started = Instant::now();
    let err = RedisQueue::connect(url).await.expect_err("connect must fail").to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}: {err}", started.elapsed());
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn refused_auth_wrong_database_unreachable_host() {
    let Some(_) = common::url("x:") else { return };
    // Our own server with a password, so AUTH can be refused.
    let port = free_port();
    let server = Server(
        Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--requirepass", "right-pass"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed"),
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "redis-server did not start");
        std::thread::sleep(Duration::from_millis(50));
    }

    let e = error_of(&format!("redis://:Wr0ngPass@127.0.0.1:{port}/0")).await;
    assert!(e.contains(&format!("127.0.0.1:{port}")) && e.to_lowercase().contains("authentication failed"), "{e}");
    assert!(!e.contains("Wr0ngPass"), "{e}");

    let e = error_of(&format!("redis://:right-pass@127.0.0.1:{port}/99")).await;
    assert!(e.contains("DB index is out of range") || e.contains("database"), "{e}");
    assert!(!e.contains("right-pass"), "{e}");
    drop(server);

    let dead = free_port();
    let e = error_of(&format!("redis://:s3cret@127.0.0.1:{dead}/0")).await;
    assert!(e.contains(&format!("127.0.0.1:{dead}")), "{e}");
    assert!(!e.contains("s3cret"), "{e}");
}
