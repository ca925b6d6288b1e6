-- ARGV: prefix, id, token, commit, gpu_ids
local id, token = ARGV[2], ARGV[3]
adopt(id, token)
if not held(id, token) then return -1 end
redis.call('HSET', jkey(id), 'commit', ARGV[4], 'gpu_ids', ARGV[5])
return 1
