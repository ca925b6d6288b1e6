-- Helpers for the scripts that change a job's state (complete, and those
-- that carry `jobs.lua`).

-- Only the states that end a job badly have an index (`PREFIXstate:S`, a
-- sorted set by id): they are few, and `jobs --state failed` must not scan.
-- Queued and running jobs are read from the streams and their pending
-- lists, succeeded ones by counting down the ids (`list.lua`), so the hot
-- paths touch no index.
local function indexed(state) return state == 'failed' or state == 'cancelled' end

-- Moves a job between the state indexes (its hash's `state` is set by the caller).
local function move_state(id, old, new)
  if old == new then return end
  if old and indexed(old) then redis.call('ZREM', P .. 'state:' .. old, id) end
  if indexed(new) then redis.call('ZADD', P .. 'state:' .. new, id, id) end
end

-- A consumer in the group is named `WORKER@INSTANCE/LEASE_MS` (queue.rs):
-- the pending list says who holds an entry and for how long a lease it
-- asked. This is the worker; `holder_lease` in jobs.lua the lease. A name
-- without the suffix (an older gpupool's) gives no worker and a lease of 0.
local function holder_worker(consumer) return string.match(consumer, '^(.*)@[^@]*$') end
