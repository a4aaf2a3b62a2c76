-- ARGV: 2.. pairs of (id, generation). Returns 0, or the 1-based index of the first
-- stale token (every current token is acked either way).
local lost = 0
for i = 2, #ARGV, 2 do
  local id, gen = ARGV[i], ARGV[i + 1]
  if current(id, gen) then
    local eid = redis.call('HGET', msgs, id)
    local f = nil
    if eid then f = entry(eid) end
    forget(id, f, true)
  elseif lost == 0 then
    lost = i / 2
  end
end
return lost
