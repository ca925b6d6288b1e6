-- complete / cancelled. ARGV: prefix, id, token, state, output_tail, result, exit_code,
-- and, for a completion that carries them (Queue::completes_with_run), the
-- run's commit and GPUs ('' GPUs: none), its last output ('' : none) and
-- the log's cap: recorded in the same step as the end.
local id, token, state = ARGV[2], ARGV[3], ARGV[4]
local h = jkey(id)
local v = redis.call('HMGET', h, 'state', 'token', 'entry', 'queue', 'attempt')
local now = now_ms()
local te, tc = string.match(token, '^~([^~]+)'), string.match(token, '^~[^~]+~[^~]+~(.+)$')
if v[1] == 'queued' and v[3] and v[3] ~= '' and te == v[3] then
  -- A lease by a bare read that ends before its holder's first call
  -- (`adopt` in jobs.lua, inlined: complete carries no helpers it can
  -- spare). Its start is the delivery, from the pending list.
  local p = redis.call('XPENDING', skey(v[4]), GROUP, v[3], v[3], 1)[1]
  if not p or (tc and p[2] ~= tc) then return -1 end
  redis.call('HSET', h, 'attempt', string.format('%d', tonumber(v[5]) + 1), 'consumer', p[2],
             'worker', holder_worker(p[2]) or '',
             'started', string.format('%d', tonumber(now) - p[3]))
elseif v[1] ~= 'running' or v[2] ~= token or token == '' then
  return -1
end
if ARGV[9] and ARGV[9] ~= '' then redis.call('HSET', h, 'commit', ARGV[8], 'gpu_ids', ARGV[9]) end
if ARGV[10] and ARGV[10] ~= '' then append_log(id, ARGV[10], tonumber(ARGV[11])) end
-- Acknowledged only: `trim.lua` deletes done entries in bulk, which costs
-- the server less than an XDEL per job.
if v[3] and v[3] ~= '' then redis.call('XACK', skey(v[4]), GROUP, v[3]) end
move_state(id, 'running', state)
redis.call('HSET', h, 'state', state, 'entry', '', 'token', '', 'output_tail', ARGV[5], 'result', ARGV[6],
           'finished', now, 'exit_code', ARGV[7])
return 1
