-- A fresh delivery of a blocking read. ARGV: prefix, stream queue, entry id, job id, consumer, worker, token, lease_ms
local queue, entry, id, consumer, worker, token, lease_ms = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8]
return claim_entry(queue, entry, {'job', id}, consumer, worker, token, lease_ms)
