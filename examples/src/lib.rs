//! Examples for gpupool live beside this crate as `cargo run --example NAME`.
