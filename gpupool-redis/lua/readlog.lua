-- A job's shipped log from byte FROM on (gpupool_core::RunLogs::read_log):
-- the piece that holds FROM, then up to COUNT more. Returns -1 for an
-- unknown job, else a flat list: start, len, text, start, len, text, …
-- ARGV: prefix, id, from, count.
local id, from = ARGV[2], ARGV[3]
local log = P .. 'log:' .. id
local out = {}
local function add(entry)
  table.insert(out, string.match(entry[1], '^(%d+)-'))
  table.insert(out, entry[2][2])
  table.insert(out, entry[2][4])
end
local before = redis.call('XREVRANGE', log, from .. '-1', '-', 'COUNT', 1)[1]
if before and tonumber(string.match(before[1], '^(%d+)-')) + tonumber(before[2][2]) > tonumber(from) then
  add(before)
end
for _, e in ipairs(redis.call('XRANGE', log, '(' .. from .. '-1', '+', 'COUNT', ARGV[4])) do add(e) end
if #out == 0 and redis.call('EXISTS', jkey(id)) == 0 then return -1 end
return out
