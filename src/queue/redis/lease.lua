-- ARGV: 2 consumer, 3 now, 4 lease until, 5 max.
-- Returns {foreign, {{id, attempts, envelope, not_before override or ''}, ...}}, oldest
-- id first; `foreign` counts the entries not written by postbox moved to the dead
-- letters.
local consumer, now, untl, max = ARGV[2], tonumber(ARGV[3]), ARGV[4], tonumber(ARGV[5])
redis.pcall('XGROUP', 'CREATE', stream, group, '0', 'MKSTREAM')
-- Expired leases return to pending first, then messages whose not-before has come: the
-- earliest `cap` of each, the rest on the next leases. A backlog that fell due at once
-- (an outage's retries, all due when the breaker's break ends; a crashed replayer's
-- leases) moved whole would block Redis for seconds, every other client answered BUSY.
local cap = math.max(max, 1024)
for _, id in ipairs(redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, cap)) do
  redis.call('ZREM', leases, id)
  redis.call('ZADD', ready, 0, id)
end
for _, id in ipairs(redis.call('ZRANGEBYSCORE', delayed, '-inf', now, 'LIMIT', 0, cap)) do
  redis.call('ZREM', delayed, id)
  redis.call('ZADD', ready, 0, id)
end
-- Read new entries through the consumer group until `max` are due (or none are left).
local fresh = {}
local foreign = 0
-- Lowercase only, as postbox writes ids and names them in lease tokens: an entry with an
-- uppercase id could never be acked, and would be delivered again forever.
local H = '[0-9a-f]'
local UUID = '^' .. string.rep(H, 8) .. '%-' .. string.rep(H, 4) .. '%-' ..
  string.rep(H, 4) .. '%-' .. string.rep(H, 4) .. '%-' .. string.rep(H, 12) .. '$'
local rounds = 0
local last = nil
while max > 0 and rounds < 64 and redis.call('ZCARD', ready) < max do
  rounds = rounds + 1
  local r = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', max,
    'STREAMS', stream, '>')
  if not r or #r == 0 or #r[1][2] == 0 then break end
  for _, e in ipairs(r[1][2]) do
    local id, due, base, key, claimed = nil, '0', '0', '', false
    for i = 1, #e[2], 2 do
      local k = e[2][i]
      if k == 'id' then id = e[2][i + 1]
      elseif k == 'claim' then claimed = e[2][i + 1] == '1'
      elseif k == 'not_before_ms' then due = e[2][i + 1]
      elseif k == 'attempts' then base = e[2][i + 1]
      elseif k == 'idempotency_key' then key = e[2][i + 1] end
    end
    -- Checked before anything is written: a field a script cannot use would stop it
    -- halfway, after XREADGROUP moved past the rest of the batch.
    local bad = nil
    if not id or not string.match(id, UUID) then bad = 'no message id'
    elseif not string.match(due, '^%d+$') or #due > 20 then bad = 'bad not_before_ms'
    -- No leading zero: HINCRBY refuses "01" as not an integer.
    elseif not string.match(base, '^0$') and not string.match(base, '^[1-9]%d*$')
      or #base > 10 or tonumber(base) >= 4294967296 then
      bad = 'bad attempts'
    end
    if bad then id = nil end
    due = tonumber(due)
    -- An entry whose key belongs to another id is a duplicate's (an orphan, see `add`
    -- in src/queue/redis.rs), as is a second entry with the id of a live message or of
    -- one already finished (see `bury`): delete them all. A key nobody claims is
    -- claimed for this entry if it was written by hand, or by an older postbox whose
    -- enqueue could die between its `XADD` and `HSETNX` (no `claim` field). One written
    -- with its claim (`claim`) whose key is free lost that claim: a duplicate's entry
    -- left by an enqueue that failed before it deleted it, whose owner has since
    -- finished. Delivered, it would repeat the owner's effect.
    last = e[1]
    local finished = id and redis.call('ZSCORE', done, id)
    local owner = false
    if id and key ~= '' and not finished then
      owner = redis.call('HGET', keys, key)
      if not owner and not claimed and redis.call('HEXISTS', msgs, id) == 0 then
        redis.call('HSET', keys, key, id)
        owner = id
      end
    end
    local known = id and redis.call('HGET', msgs, id)
    local orphan = id and (finished or (key ~= '' and owner ~= id)
      or (known and known ~= e[1]))
    if orphan then
      if finished and key ~= '' and redis.call('HGET', keys, key) == id then
        -- Claimed again by an enqueue of the finished message retried after a lost
        -- reply: that copy goes, and so does its claim.
        redis.call('HDEL', keys, key)
      end
      redis.call('XACK', stream, group, e[1])
      redis.call('XDEL', stream, e[1])
    elseif id and redis.call('HSETNX', msgs, id, e[1]) == 1 then
      redis.call('HSET', idkeys, id, key)
      redis.call('HSET', attempts, id, base)
      fresh[id] = e[2]
      if due <= now then
        redis.call('ZADD', ready, 0, id)
      else
        redis.call('ZADD', delayed, due, id)
      end
    elseif bad then
      -- Not written by postbox (no message id, or fields it never writes): into the
      -- dead-letter stream as it is, so it neither stays counted as pending nor is lost.
      -- One with too many fields to pass on in one call stays in the stream (acked,
      -- still counted), named by its entry id in the dead letter.
      local whole = #e[2] <= 7000
      local d = {'entry', e[1]}
      if whole then d = {unpack(e[2])} end
      d[#d + 1] = 'reason'
      d[#d + 1] = 'not a postbox entry: ' .. bad
      d[#d + 1] = 'dead_at_ms'
      d[#d + 1] = ARGV[3]
      redis.call('XADD', dead, '*', unpack(d))
      redis.call('XACK', stream, group, e[1])
      if whole then redis.call('XDEL', stream, e[1]) end
      foreign = foreign + 1
    end
  end
end
-- Every entry up to `last` has been read: a finished id buried at an older millisecond
-- has no unread copy left.
-- (At most `cap` at a time, and a whole set freed in the background: `done` can have
-- grown by an ack each while leases read nothing new.)
if last then
  if redis.call('XLEN', stream) == 0 then
    redis.call('UNLINK', done)
  else
    -- The lowest-scored are the ones below `last` (no `unpack`: Lua takes about 8000
    -- values at most, and `cap` follows `max`).
    local old = redis.call('ZCOUNT', done, '-inf', '(' .. eid_ms(last))
    if old > 0 then redis.call('ZREMRANGEBYRANK', done, 0, math.min(old, cap) - 1) end
  end
end
-- Lease the oldest due ids (all scores are 0, so the order is the id's text order).
local out = {}
if max > 0 then
  for _, id in ipairs(redis.call('ZRANGE', ready, 0, max - 1)) do
    redis.call('ZREM', ready, id)
    local eid = redis.call('HGET', msgs, id)
    local f = fresh[id]
    if eid and not f then
      local c = redis.call('XCLAIM', stream, group, consumer, 0, eid)
      if #c > 0 and c[1] then
        f = c[1][2]
      else
        -- Not pending in the group (it was reset by hand) but still in the stream.
        local _, flat = entry(eid)
        f = flat
      end
    end
    if f then
      local env, due = '', nil
      for i = 1, #f, 2 do
        if f[i] == 'envelope' then env = f[i + 1]
        elseif f[i] == 'not_before_ms' then due = f[i + 1] end
      end
      local override = redis.call('HGET', nb, id)
      due = tonumber(override or due) or 0
      if due > now then
        -- Made ready by a lease with a later `now` (another replayer's clock): not
        -- due for this one, so back to waiting, uncounted.
        redis.call('ZADD', delayed, due, id)
      else
        -- The generation as Redis' text, not as the Lua number HINCRBY returns: past
        -- 2^53 (2^21 releases) that is rounded, and the token would never be current.
        redis.call('HINCRBY', attempts, id, 1)
        local a = redis.call('HGET', attempts, id)
        if low32(a) == 0 then
          -- The attempts were at 2^32 - 1 and carried into the releases: they stay
          -- there (saturated), and the releases count this lease, so its generation
          -- is still new.
          redis.call('HINCRBY', attempts, id, 4294967295)
          a = redis.call('HGET', attempts, id)
        end
        redis.call('ZADD', leases, untl, id)
        out[#out + 1] = {id, a, env, override or ''}
      end
    else
      -- The entry was deleted by hand: drop its bookkeeping and free its key (left
      -- claimed, every later enqueue of it would be answered as a duplicate of a
      -- message that no longer exists while any other entry is unread). `forget`
      -- finds the key in `idkeys`; a message first read by an older postbox is not
      -- there, and its key is found by its owner (a scan of every key, so only then).
      if redis.call('HEXISTS', idkeys, id) == 0 then
        local all = redis.call('HGETALL', keys)
        for i = 1, #all, 2 do
          if all[i + 1] == id then
            redis.call('HDEL', keys, all[i])
            break
          end
        end
      end
      forget(id, nil, true)
    end
  end
end
return {foreign, out}
