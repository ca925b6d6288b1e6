-- A delivery we cannot take now (a second queue answered a blocking read):
-- put the job back at the end of its queue. ARGV: prefix, queue, entry, job id
local queue, entry, id = ARGV[2], ARGV[3], ARGV[4]
redis.call('XACK', skey(queue), GROUP, entry)
local v = redis.call('HMGET', jkey(id), 'state', 'entry')
if v[1] == 'queued' and v[2] == entry then
  redis.call('XDEL', skey(queue), entry)
  enqueue(id)
end
return 1
