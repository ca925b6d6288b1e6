-- Shared by every gpupool script. ARGV[1] is the key prefix. Keys are built
-- here from the prefix, so gpupool needs a standalone Redis (not Cluster).
--
-- A script is this file, then the helper files it needs (`states.lua`,
-- `jobs.lua`, `lease.lua`; the `script!` macro in queue.rs), then its own
-- body. Every helper is a closure made again on each call (about 430
-- instructions each, measured with callgrind), so push carries only this
-- file and complete this file, `states.lua` and `logappend.lua` (one
-- function). (A first attempt's
-- reserve runs no script at all: `take` in queue.rs.)
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
  -- The microseconds padded to six digits by concatenation, then their
  -- first three: no `string.format` (1.7k instructions less a call).
  return t[1] .. string.sub('00000' .. t[2], -6, -4)
end

local function jkey(id) return P .. 'job:' .. id end
local function skey(queue) return P .. 'stream:' .. queue end
