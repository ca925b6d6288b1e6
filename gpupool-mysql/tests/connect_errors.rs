//! A wrong password, an unknown database and an unreachable host each give
//! one clear line naming host:port and the cause, within 5 s, and never the
//! password.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::{Duration, Instant};

use gpupool_mysql::MysqlQueue;

async fn error_of(url: &str) -> String {
    let started = Instant::now();
    let err = MysqlQueue::connect(url).await.expect_err("connect must fail").to_string();
    assert!(started.elapsed() < Duration::from_secs(5), "took {:?}: {err}", started.elapsed());
    assert!(!err.contains('\n'), "one line: {err}");
    err
}

#[tokio::test]
async fn wrong_password_unknown_database_unreachable_host() {
    let Some(good) = common::url("errors_") else { return };
    // mysql://user:pass@host:port/db?prefix=…
    let (scheme_user, rest) = good.split_once(':').map(|(s, r)| (s.to_owned(), r.to_owned())).unwrap();
    let after_scheme = rest.trim_start_matches("//");
    let (userinfo, hostpart) = after_scheme.split_once('@').unwrap();
    let user = userinfo.split(':').next().unwrap();
    let (authority, db_and_query) = hostpart.split_once('/').unwrap();

    let wrong_pw = format!("{scheme_user}://{user}:Wr0ngPassw0rd@{authority}/{db_and_query}");
    let e = error_of(&wrong_pw).await;
    assert!(e.contains(authority) && e.contains("Access denied"), "{e}");
    assert!(!e.contains("Wr0ngPassw0rd"), "{e}");

    let (_, query) = db_and_query.split_once('?').unwrap_or((db_and_query, ""));
    let unknown_db = format!("{scheme_user}://{userinfo}@{authority}/gpupool_no_such_db?{query}");
    let e = error_of(&unknown_db).await;
    assert!(e.contains(authority) && (e.contains("Unknown database") || e.contains("Access denied")), "{e}");

    // A port nothing listens on.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let unreachable = format!("{scheme_user}://{user}:Secr3tPw@127.0.0.1:{port}/db");
    let e = error_of(&unreachable).await;
    assert!(e.contains(&format!("127.0.0.1:{port}")), "{e}");
    assert!(!e.contains("Secr3tPw"), "{e}");
}
