-- ARGV: 2 id, 3 generation, 4 not before, 5 '1' to leave this delivery uncounted
-- (release). Returns 1, or 0 if the lease is not current.
local id, gen, due = ARGV[2], ARGV[3], ARGV[4]
if not current(id, gen) then return 0 end
redis.call('ZREM', leases, id)
redis.call('HSET', nb, id, due)
redis.call('ZADD', delayed, due, id)
if ARGV[5] == '1' then
  -- One attempt fewer, and one more release in the generation's high half, so the
  -- next lease's generation is still new: + 2^32 - 1.
  redis.call('HINCRBY', attempts, id, 4294967295)
end
return 1
