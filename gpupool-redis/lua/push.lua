-- ARGV: prefix, spec, queue, max_attempts, idempotency key ('' = none),
-- not_before (ms; '' = none: at once).
-- Returns the new job's id, or {id, spec} of the job the key names.
-- Priority and GPUs are read from the spec; the hash keeps what scripts use.
local spec, queue, max_attempts, idem, not_before = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6] or ''
if idem ~= '' then
  local existing = redis.call('GET', P .. 'idem:' .. idem)
  -- The caller compares the stored job with its own.
  if existing then return {existing, redis.call('HGET', jkey(existing), 'spec') or ''} end
end
local id = string.format('%d', redis.call('INCR', P .. 'seq'))
local entry, created = '', nil
if not_before == '' then
  -- The entry carries the spec, so a reserve that reads it has all a first
  -- attempt's lease needs and runs no script (`take` in queue.rs); it also
  -- makes entries big enough that a stream node holds tens, not a hundred,
  -- and `XREADGROUP`'s walk from the node's start to the last delivered
  -- entry stays short (see BENCHMARKS.md).
  entry = redis.call('XADD', skey(queue), '*', 'job', id, 'spec', spec)
  -- The entry's id starts with the server's clock in milliseconds, which
  -- is the job's creation time: no `TIME` call (a tenth of a push's work).
  created = string.match(entry, '^%d+')
else
  -- Held back until its start: no entry until `promote.lua` makes one.
  created = now_ms()
end
redis.call('HSET', jkey(id), 'spec', spec, 'queue', queue, 'attempt', '0',
           'max_attempts', max_attempts, 'attempt_limit', max_attempts, 'cancel', '0',
           'created', created, 'entry', entry, 'state', 'queued')
if not_before ~= '' then
  redis.call('HSET', jkey(id), 'not_before', not_before)
  redis.call('ZADD', P .. 'delayed', not_before, id)
end
-- No index of all jobs (ids are dense, from `seq`, and jobs are never
-- deleted) nor of queued ones (they are the streams' unread entries).
redis.call('ZADD', P .. 'queue:' .. queue, id, id)
redis.call('SADD', P .. 'queues', queue)
if idem ~= '' then redis.call('SET', P .. 'idem:' .. idem, id) end
return id
