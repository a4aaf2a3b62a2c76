-- postbox Redis queue: shared prelude of every script (see src/queue/redis.rs).
-- KEYS: 1 stream, 2 dead, 3 msgs, 4 attempts, 5 nb, 6 keys, 7 leases, 8 delayed, 9 ready
-- ARGV[1]: the consumer group name. Times are Unix milliseconds.
local stream, dead, msgs, attempts, nb = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local keys, leases, delayed, ready = KEYS[6], KEYS[7], KEYS[8], KEYS[9]
local group = ARGV[1]

-- The fields of stream entry `eid` as a Lua table, or nil.
local function entry(eid)
  local r = redis.call('XRANGE', stream, eid, eid)
  if #r == 0 then return nil end
  local f, t = r[1][2], {}
  for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
  return t, f
end

-- Whether `gen` is the current lease of message `id`.
local function current(id, gen)
  local a = redis.call('HGET', attempts, id)
  return a and a == gen and redis.call('ZSCORE', leases, id)
end

-- Removes message `id` everywhere (ack or dead letter) and frees its key.
local function forget(id, fields)
  local eid = redis.call('HGET', msgs, id)
  if fields and fields['idempotency_key'] ~= '' and
      redis.call('HGET', keys, fields['idempotency_key']) == id then
    redis.call('HDEL', keys, fields['idempotency_key'])
  end
  if eid then
    redis.pcall('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
  end
  redis.call('HDEL', msgs, id)
  redis.call('HDEL', attempts, id)
  redis.call('HDEL', nb, id)
  redis.call('ZREM', leases, id)
  redis.call('ZREM', delayed, id)
  redis.call('ZREM', ready, id)
end
