-- Frees idempotency key ARGV[2] if message ARGV[3] claims it and `lease` has not yet
-- read its entry: after an enqueue whose XADD may have failed (see `add` in
-- src/queue/redis.rs). An entry that was written after all is claimed by `lease`.
if redis.call('HGET', keys, ARGV[2]) == ARGV[3] and redis.call('HEXISTS', msgs, ARGV[3]) == 0 then
  redis.call('HDEL', keys, ARGV[2])
end
return 0
