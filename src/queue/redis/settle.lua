-- After an enqueue's `HSETNX` found its key taken (see `add` in src/queue/redis.rs).
-- ARGV: 2 key, 3 id, 4 the enqueue's entry id.
-- A key whose owner is gone (see `gone`) is taken over.
-- Returns {1, id} stored after all (`lease` claimed the key for this entry, or the owner
-- was acked meanwhile and the key is now this entry's); {0, owner} a duplicate (its entry
-- is deleted); {2, ''} the entry is gone (`lease` deleted it while the key was taken):
-- add it again.
local key, id, eid = ARGV[2], ARGV[3], ARGV[4]
local owner = redis.call('HGET', keys, key)
if owner == id then return {1, id} end
if owner and gone(owner, eid) then
  -- A key left claimed by a message deleted by hand: free it.
  redis.call('HDEL', keys, key)
  owner = false
end
if owner then
  if redis.call('HGET', msgs, id) ~= eid then
    redis.pcall('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
  end
  return {0, owner}
end
if #redis.call('XRANGE', stream, eid, eid) == 1 then
  redis.call('HSET', keys, key, id)
  return {1, id}
end
return {2, ''}
