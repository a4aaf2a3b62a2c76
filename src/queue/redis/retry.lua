-- ARGV: 2 id, 3 generation, 4 not before. Returns 1, or 0 if the lease is not current.
local id, gen, due = ARGV[2], ARGV[3], ARGV[4]
if not current(id, gen) then return 0 end
redis.call('ZREM', leases, id)
redis.call('HSET', nb, id, due)
redis.call('ZADD', delayed, due, id)
return 1
