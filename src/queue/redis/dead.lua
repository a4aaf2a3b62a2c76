-- ARGV: 2 id, 3 generation, 4 reason, 5 now. Returns 1, or 0 if the lease is not current.
local id, gen = ARGV[2], ARGV[3]
if not current(id, gen) then return 0 end
local eid = redis.call('HGET', msgs, id)
local t, f = nil, nil
if eid then t, f = entry(eid) end
if f then
  local d = {}
  for i = 1, #f, 2 do
    local k, v = f[i], f[i + 1]
    if k == 'attempts' then
      v = tostring(low32(gen)) -- the generation's low half
    elseif k == 'not_before_ms' then
      v = redis.call('HGET', nb, id) or v
    end
    d[#d + 1] = k
    d[#d + 1] = v
  end
  d[#d + 1] = 'reason'
  d[#d + 1] = ARGV[4]
  d[#d + 1] = 'dead_at_ms'
  d[#d + 1] = ARGV[5]
  redis.call('XADD', dead, '*', unpack(d))
end
forget(id, t, true)
return 1
