-- Shared by every gpupool script. ARGV[1] is the key prefix. Keys are built
-- here from the prefix, so gpupool needs a standalone Redis (not Cluster).
--
-- A script is this file, then `lease.lua` and `jobs.lua` where it needs
-- them (the `script!` macro in queue.rs), then its own body. Every helper
-- is a closure made again on each call, so push and complete carry only
-- this file, and reserve this file and `lease.lua`.
--
-- Hot paths (push, reserve, finish) avoid Lua numbers where they can: a
-- number handed to `redis.call` is formatted with `%.14g`, which costs the
-- server more than the command it goes to (measured with callgrind; see
-- BENCHMARKS.md). Times and counters travel as decimal strings.
local P = ARGV[1]
local GROUP = 'gpupool'

-- Milliseconds since the epoch, by the server's clock, as a decimal string.
local function now_ms()
  local t = redis.call('TIME')
  return t[1] .. string.sub(string.format('%06d', t[2]), 1, 3)
end

local function jkey(id) return P .. 'job:' .. id end
local function skey(queue) return P .. 'stream:' .. queue end

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

