//! Examples for gpupool live beside this crate: `cargo run --example quickstart`,
//! `cargo run --example worker -- URL REPO`.
