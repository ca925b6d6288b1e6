-- ARGV: prefix, id, token
local id, token = ARGV[2], ARGV[3]
adopt(id, token)
if not held(id, token) then return -1 end
unlease(id)
enqueue(id)
return 1
