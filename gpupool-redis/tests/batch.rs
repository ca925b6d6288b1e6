//! `reserve_many` on Redis: a worker on a host without GPUs leases its free
//! slots' jobs in one read after its first, in queue order. A job there
//! that needs GPUs goes back to the end of its queue and the jobs after it
//! keep their order. A host with GPUs gets one job a call.

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
    let batch = q.reserve_many(&req, 4).await.unwrap();
    let got: Vec<&JobId> = batch.iter().map(|l| l.id()).collect();
    // The first, then one read of 3: the GPU job is passed over, and the
    // batch reads no further past it.
    assert_eq!(got, [&ids[0], &ids[1], &ids[3]], "the GPU job is passed over, the rest in order");
    for lease in &batch {
        assert_eq!((lease.job.state, lease.attempt()), (JobState::Running, 1));
    }
    // The GPU job went back behind the last one, unleased and uncharged.
    let gpu = q.get(&ids[2]).await.unwrap();
    assert_eq!((gpu.state, gpu.attempt), (JobState::Queued, 0), "{gpu:?}");
    let rest = q.reserve_many(&req, 8).await.unwrap();
    let got: Vec<&JobId> = rest.iter().map(|l| l.id()).collect();
    assert_eq!(got, [&ids[4], &ids[5], &ids[6]], "then the jobs after it; the GPU job comes back last");
    for lease in batch.iter().chain(&rest) {
        q.complete(lease, Completion::default()).await.unwrap();
    }
    let last = q.reserve_many(&req, 8).await.unwrap();
    assert_eq!(last.iter().map(|l| l.id()).collect::<Vec<_>>(), [&ids[2]], "first of a batch, it is handed out");
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
