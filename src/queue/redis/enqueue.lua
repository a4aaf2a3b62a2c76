-- ARGV: 2 id, 3 idempotency key, 4 capacity (0: none), 5 attempts so far, 6.. entry fields.
-- Returns {0, existing id} (duplicate), {1, id} (stored) or {2, ''} (full).
local id, key, cap = ARGV[2], ARGV[3], tonumber(ARGV[4])
if key ~= '' then
  local existing = redis.call('HGET', keys, key)
  if existing then return {0, existing} end
end
if redis.call('HEXISTS', msgs, id) == 1 then return {0, id} end
if cap > 0 and redis.call('HLEN', msgs) >= cap then return {2, ''} end
local eid = redis.call('XADD', stream, '*', unpack(ARGV, 6))
redis.call('HSET', msgs, id, eid)
redis.call('HSET', attempts, id, ARGV[5])
if key ~= '' then redis.call('HSET', keys, key, id) end
return {1, id}
