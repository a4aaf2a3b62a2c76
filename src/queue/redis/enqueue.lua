-- ARGV: 2 id, 3 idempotency key, 4 capacity (0: none), 5.. entry fields.
-- Returns {0, existing id} (duplicate), {1, id} (stored) or {2, ''} (full).
-- Kept to the fewest commands: this is the hot path. The stream holds exactly the
-- live messages (acked and dead ones are deleted), so its length is the live count;
-- `msgs` and `attempts` are filled when the entry is first read by `lease`.
local id, key, cap = ARGV[2], ARGV[3], tonumber(ARGV[4])
if key ~= '' then
  local existing = redis.call('HGET', keys, key)
  if existing then return {0, existing} end
end
if cap > 0 and redis.call('XLEN', stream) >= cap then return {2, ''} end
redis.call('XADD', stream, '*', unpack(ARGV, 5))
if key ~= '' then redis.call('HSET', keys, key, id) end
return {1, id}
