-- Which queued jobs are in fact running, leased by a bare read and not yet
-- recorded (`adopt`): their entry is pending. ARGV: prefix, then a queue and
-- an entry per job. Returns {now, then per job {worker or false, idle ms} or
-- false}.
local out = {now_ms()}
for i = 2, #ARGV, 2 do
  local p = pending(skey(ARGV[i]), ARGV[i + 1])
  out[#out + 1] = p and {holder_worker(p[2]) or false, p[3]} or false
end
return out
