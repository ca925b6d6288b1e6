//! Criterion micro-benchmarks: argv building, message parsing, and one job's
//! state transitions on the in-memory queue.

#![allow(missing_docs, clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use gpupool_core::{Completion, JobSpec, MemoryQueue, Queue, ReserveRequest, argv, message};

const SEED: &str = r#"{"branch": "develop", "train_path": "./ai_folder/train.py", "name": "test_name",
  "seed": "42", "epoch": "1", "dataset": "MaskBaseDataset", "augmentation": "BaseAugmentation",
  "resize": "128 96", "batch_size": "64", "valid_batch_size": "1000", "model": "BaseModel",
  "optimizer": "SGD", "lr": "1e-3", "val_ratio": "0.2", "criterion": "cross_entropy",
  "lr_decay_step": "20", "log_interval": "20", "patience": "5", "data_dir": "d", "model_dir": "m"}"#;

fn benches(c: &mut Criterion) {
    let spec = message::parse_jobs(SEED).unwrap().remove(0);
    let command = vec!["torchrun".to_owned(), "--nproc_per_node={gpus}".to_owned()];
    c.bench_function("argv/seed message", |b| {
        b.iter(|| argv::build_argv(black_box(&command), &spec.entrypoint, black_box(&spec.args), 4))
    });
    c.bench_function("parse/seed message.json", |b| b.iter(|| message::parse_jobs(black_box(SEED)).unwrap()));
    let structured = r#"{"git_ref": "main", "entrypoint": "train.py", "gpus": 2, "queue": "high",
        "args": {"lr": 0.001, "layers": [64, 128], "amp": true}, "env": {"WANDB_MODE": "offline"}}"#;
    c.bench_function("parse/structured job", |b| b.iter(|| message::parse_jobs(black_box(structured)).unwrap()));

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let q = MemoryQueue::new();
    let req = ReserveRequest::new("default");
    c.bench_function("memory/push+reserve+complete", |b| {
        b.iter(|| {
            rt.block_on(async {
                q.push(JobSpec::new("main", "train.py")).await.unwrap();
                let lease = q.reserve(&req).await.unwrap().unwrap();
                q.complete(&lease, Completion::default()).await.unwrap();
            })
        })
    });
}

criterion_group!(micro, benches);
criterion_main!(micro);
