-- postbox Redis queue: shared prelude of every script (see src/queue/redis.rs).
-- KEYS: 1 stream, 2 dead, 3 msgs, 4 attempts, 5 nb, 6 keys, 7 leases, 8 delayed, 9 ready,
-- 10 done, 11 idkeys
-- ARGV[1]: the consumer group name. Times are Unix milliseconds.
local stream, dead, msgs, attempts, nb = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local keys, leases, delayed, ready, done = KEYS[6], KEYS[7], KEYS[8], KEYS[9], KEYS[10]
local idkeys = KEYS[11]
local group = ARGV[1]

-- The fields of stream entry `eid` as a Lua table, or nil.
local function entry(eid)
  local r = redis.call('XRANGE', stream, eid, eid)
  if #r == 0 then return nil end
  local f, t = r[1][2], {}
  for i = 1, #f, 2 do t[f[i]] = f[i + 1] end
  return t, f
end

-- The low 32 bits of the decimal integer text `s`, exactly. (A lease generation is
-- the releases in its high half and the attempts in its low one: past 2^53 it is no
-- longer exact as a Lua number, so it is kept as Redis' text.)
local function low32(s)
  local r = 0
  for i = 1, #s do r = (r * 10 + string.byte(s, i) - 48) % 4294967296 end
  return r
end

-- Whether `gen` is the current lease of message `id`.
local function current(id, gen)
  local a = redis.call('HGET', attempts, id)
  return a and a == gen and redis.call('ZSCORE', leases, id)
end

-- The millisecond part of stream entry id `eid`.
local function eid_ms(eid)
  return tonumber(string.match(eid, '^(%d+)'))
end

-- The score `bury` gives: the newest stream entry's millisecond (false if the stream
-- is empty), looked up once per script.
local horizon = nil

-- Remembers that message `id` is finished (acked or dead), so that another entry of
-- the same id still unread in the stream (left by an enqueue retried after its reply
-- was lost) is deleted by `lease`, not delivered again. Scored by the newest entry's
-- millisecond now: once `lease` has read past it, every entry that could be such a
-- copy has been read, and `lease` prunes it. With the stream empty there is nothing
-- left to guard, and nothing is kept.
local function bury(id)
  if horizon == nil then
    local last = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #last == 0 then
      redis.call('UNLINK', done)
      horizon = false
    else
      horizon = eid_ms(last[1][1])
    end
  end
  if horizon then redis.call('ZADD', done, horizon, id) end
end

-- Removes message `id` everywhere (ack or dead letter: `finished`, so it is buried
-- too) and frees its key.
local function forget(id, fields, finished)
  local eid = redis.call('HGET', msgs, id)
  -- An entry written by hand may have no key field at all (nil, not ''); one gone
  -- (deleted by hand) left its key in `idkeys` when `lease` first read it.
  local key = fields and fields['idempotency_key']
  if not key then key = redis.call('HGET', idkeys, id) end
  if key and key ~= '' and redis.call('HGET', keys, key) == id then
    redis.call('HDEL', keys, key)
  end
  redis.call('HDEL', idkeys, id)
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
  if finished then bury(id) end
end

-- Whether message `owner`, which claims a key, is gone while its key stayed claimed:
-- its entry was deleted or trimmed by hand (or never written, by an enqueue that died
-- after a failed XADD), so nothing will ever free the key. Its entry, once read by
-- `lease`, is the one `msgs` names; before that it is one of the unread entries, so
-- while any entry other than `mine` (the caller's own, or nil) is unread the owner
-- counts as live. Only called when a key is found taken: never on the common path.
local function gone(owner, mine)
  if redis.call('ZSCORE', done, owner) then return true end
  local eid = redis.call('HGET', msgs, owner)
  if eid then return #redis.call('XRANGE', stream, eid, eid) == 0 end
  local from = '-'
  local groups = redis.pcall('XINFO', 'GROUPS', stream)
  if type(groups) == 'table' and not groups.err then
    for _, g in ipairs(groups) do
      local name, last = nil, nil
      for i = 1, #g, 2 do
        if g[i] == 'name' then name = g[i + 1]
        elseif g[i] == 'last-delivered-id' then last = g[i + 1] end
      end
      if name == group and last then from = '(' .. last end
    end
  end
  for _, e in ipairs(redis.call('XRANGE', stream, from, '+', 'COUNT', 2)) do
    if e[1] ~= mine then return false end
  end
  return true
end
