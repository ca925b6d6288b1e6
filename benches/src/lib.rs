//! Benchmarks for gpupool: the harness arrives with the benchmark issue.
