-- Where a job's last run left its files (gpupool_core::Artifacts, as JSON):
-- in the artifact store or on the worker's disk. NULL until a run kept some.
ALTER TABLE jobs ADD COLUMN artifacts TEXT;
