-- ARGV: prefix, id, token, kind, retryable (0/1), exit_code, signal, message, output_tail,
-- backoff (ms before a requeued job may run; '' = none).
-- Returns -1 (lost), 1 (requeued) or 0 (failed).
local id, token, kind, retryable = ARGV[2], ARGV[3], ARGV[4], ARGV[5]
adopt(id, token)
if not held(id, token) then return -1 end
local h = jkey(id)
local v = redis.call('HMGET', h, 'attempt', 'attempt_limit')
local now = now_ms()
add_error(id, v[1], kind, ARGV[6], ARGV[7], ARGV[8], ARGV[9], now)
drop_entry(id)
redis.call('HSET', h, 'token', '', 'exit_code', ARGV[6], 'signal', ARGV[7], 'output_tail', ARGV[9])
if retryable == '1' and tonumber(v[1]) < tonumber(v[2]) then
  set_state(id, 'queued')
  if ARGV[10] ~= '' then
    hold(id, string.format('%d', tonumber(now) + tonumber(ARGV[10])))
  else
    enqueue(id)
  end
  return 1
end
set_state(id, 'failed')
redis.call('HSET', h, 'finished', now)
return 0
