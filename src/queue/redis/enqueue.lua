-- A batch of enqueues (group commit: one script, one reply, and with
-- `appendfsync always` one fsync, for every enqueue waiting at the time).
-- ARGV: 2 capacity (0 holds nothing, as in the other queues), then per message: id, idempotency key, field count n,
-- n entry fields. Returns per message {0, existing id} (duplicate), {1, id} (stored)
-- or {2, ''} (full).
-- The stream holds exactly the live messages (acked and dead ones are deleted), so
-- its length is the live count; `msgs` and `attempts` are filled when the entry is
-- first read by `lease`.
local cap = tonumber(ARGV[2])
local len = redis.call('XLEN', stream)
local out = {}
local i = 3
while i <= #ARGV do
  local id, key, n = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local first, last = i + 3, i + 2 + n
  i = last + 1
  local existing = false
  if key ~= '' then existing = redis.call('HGET', keys, key) end
  if existing and gone(existing, nil) then
    redis.call('HDEL', keys, key)
    existing = false
  end
  if existing then
    out[#out + 1] = {0, existing}
  elseif len >= cap then
    out[#out + 1] = {2, ''}
  else
    redis.call('XADD', stream, '*', unpack(ARGV, first, last))
    if key ~= '' then redis.call('HSET', keys, key, id) end
    len = len + 1
    out[#out + 1] = {1, id}
  end
end
return out
