//! `reserve_many` on Redis: a worker on a host without GPUs leases its free
//! slots' jobs in one read after its first, in queue order. A job read
//! there that needs GPUs is parked for a host with enough, and the jobs
//! after it keep their order; a first job that needs GPUs comes alone. A
//! host with GPUs gets one job a call.

// Test code: a panic is how a check fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use gpupool_core::{Completion, JobId, JobSpec, JobState, Queue, ReserveRequest};

fn job(queue: &str, i: usize) -> JobSpec {
    JobSpec::new("main", "train.py").with_queue(queue).arg("i", i)
}

#[tokio::test]
async fn a_host_without_gpus_leases_a_batch_in_queue_order() {
    let Some(q) = common::queue("batch-order").await else { return };
    let mut ids = Vec::new();
    for i in 0..7 {
        let mut spec = job("bo", i);
        if i == 2 {
            spec.gpus = Some(1);
        }
        ids.push(q.push(spec).await.unwrap());
    }
    let req = ReserveRequest::new("bo").worker("cpu-1");
    let batch = q.reserve_many(&req, 5).await.unwrap();
    let got: Vec<&JobId> = batch.iter().map(|l| l.id()).collect();
    assert_eq!(got, [&ids[0], &ids[1], &ids[3], &ids[4], &ids[5]], "the GPU job is passed over, the rest in order");
    for lease in &batch {
        assert_eq!((lease.job.state, lease.attempt()), (JobState::Running, 1));
    }
    // The GPU job is parked, uncharged, for a host with a GPU.
    let gpu = q.get(&ids[2]).await.unwrap();
    assert_eq!((gpu.state, gpu.attempt), (JobState::Queued, 0), "{gpu:?}");
    let rest = q.reserve_many(&req, 8).await.unwrap();
    assert_eq!(rest.iter().map(|l| l.id()).collect::<Vec<_>>(), [&ids[6]], "then the last; never the GPU job");
    for lease in batch.iter().chain(&rest) {
        q.complete(lease, Completion::default()).await.unwrap();
    }
    assert!(q.reserve_many(&req, 8).await.unwrap().is_empty(), "a host without GPUs is not handed it again");
    let gpu_host = ReserveRequest::new("bo").worker("gpu-1").gpus(1, true);
    let last = q.reserve_many(&gpu_host, 8).await.unwrap();
    assert_eq!(last.iter().map(|l| l.id()).collect::<Vec<_>>(), [&ids[2]], "a host with a GPU gets it");
    common::cleanup(&q).await;
}

#[tokio::test]
async fn a_first_job_that_needs_gpus_is_not_followed_by_a_batch() {
    let Some(q) = common::queue("batch-first").await else { return };
    let mut spec = job("bf", 0);
    spec.gpus = Some(2);
    let gpu = q.push(spec).await.unwrap();
    let after = q.push(job("bf", 1)).await.unwrap();
    let req = ReserveRequest::new("bf").worker("cpu-1");
    let batch = q.reserve_many(&req, 4).await.unwrap();
    assert_eq!(batch.iter().map(|l| l.id()).collect::<Vec<_>>(), [&gpu], "alone: the worker parks it");
    q.park(&batch[0], 2).await.unwrap();
    let next = q.reserve_many(&req, 4).await.unwrap();
    assert_eq!(next.iter().map(|l| l.id()).collect::<Vec<_>>(), [&after], "the job after it kept its place");
    common::cleanup(&q).await;
}

#[tokio::test]
async fn a_host_with_gpus_gets_one_job_a_call() {
    let Some(q) = common::queue("batch-gpu").await else { return };
    for i in 0..3 {
        q.push(job("bg", i)).await.unwrap();
    }
    let req = ReserveRequest::new("bg").worker("gpu-1").gpus(4, true);
    assert_eq!(q.reserve_many(&req, 4).await.unwrap().len(), 1);
    common::cleanup(&q).await;
}
