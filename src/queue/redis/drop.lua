-- Deletes the stream entries of enqueues answered as duplicates (see `add_batch` in
-- src/queue/redis.rs), unless `lease` already made one of them the entry of its id.
-- ARGV: 2.. pairs of (id, entry id).
for i = 2, #ARGV, 2 do
  local id, eid = ARGV[i], ARGV[i + 1]
  if redis.call('HGET', msgs, id) ~= eid then
    redis.pcall('XACK', stream, group, eid)
    redis.call('XDEL', stream, eid)
  end
end
return 0
