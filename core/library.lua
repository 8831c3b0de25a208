#!lua name=orders___VERSION__
-- The pipeline's atomic steps, as Redis Functions: loaded once by an admin
-- (python -m initialization_stream), called with FCALL by least-privilege users, whose own
-- ACL rules apply to every command inside. Every key a call touches shares the stream's hash
-- tag (keys.py), so on Redis Cluster each call stays in one slot. Times are the server's.
-- __VERSION__ stands for a digest of this file (library.py fills it in): each version is a
-- library of its own, so processes of two releases running at once never replace each other's.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- The consumer an entry is pending on in a group, or nil when it is not pending.
local function owner_of(stream, group, id)
  local row = redis.call('XPENDING', stream, group, id, id, 1)[1]
  return row and row[2]
end

-- Of the consumer's `n` oldest pending entries, a set of their ids (each maps to true): one
-- XPENDING for a whole batch instead of one per entry. Usually that is the batch being
-- committed; an id not in it (the consumer holds older entries too) is looked up with owner_of.
local function oldest_pending(stream, group, consumer, n)
  local ids = {}
  for _, row in ipairs(redis.call('XPENDING', stream, group, '-', '+', n, consumer)) do
    ids[row[1]] = true
  end
  return ids
end

-- True when no consumer of the group but this one has an entry pending (XPENDING's summary
-- lists only consumers that have some): every pending entry is then this consumer's.
local function alone(stream, group, consumer)
  for _, row in ipairs(redis.call('XPENDING', stream, group)[4] or {}) do
    if row[1] ~= consumer then
      return false
    end
  end
  return true
end

-- 2026-11-29T13:55:00.123+00:00 from milliseconds since the epoch (days to civil date:
-- Howard Hinnant's algorithm).
local function iso(ms)
  local s = math.floor(ms / 1000)
  local z = math.floor(s / 86400) + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local day = doy - math.floor((153 * mp + 2) / 5) + 1
  local month = mp < 10 and mp + 3 or mp - 9
  local year = yoe + era * 400 + (month <= 2 and 1 or 0)
  local sec = s % 86400
  return string.format('%04d-%02d-%02dT%02d:%02d:%02d.%03d+00:00', year, month, day,
    math.floor(sec / 3600), math.floor(sec % 3600 / 60), sec % 60, ms % 1000)
end

-- Admission: which of these delivered entries may run their handler now.
-- KEYS: stream, done, running. ARGV: group, consumer, lease prefix, window ms, then pairs of
-- entry id and order id. Per pair: 1 run it (and this consumer now runs that order);
-- 0 the order is done within the window; 2 another entry of the same order is being run by a
-- live consumer (or by this one), pending on it, so this copy needs no run.
local function admit(keys, args)
  local stream, done, running = keys[1], keys[2], keys[3]
  local group, consumer, lease_prefix, window = args[1], args[2], args[3], tonumber(args[4])
  local since = now_ms() - window
  local out = {}
  for i = 5, #args, 2 do
    local id, order = args[i], args[i + 1]
    local decision = 1
    local score = redis.call('ZSCORE', done, order)
    if score and tonumber(score) >= since then
      decision = 0
    else
      local holder = redis.call('HGET', running, order)
      if holder then
        local who, held = string.match(holder, '^(.*) (%S+)$')
        if held ~= id and (who == consumer or redis.call('EXISTS', lease_prefix .. who) == 1)
            and owner_of(stream, group, held) == who then
          decision = 2
        end
      end
      if decision == 1 then
        redis.call('HSET', running, order, consumer .. ' ' .. id)
      end
    end
    out[#out + 1] = decision
  end
  return out
end

-- The fenced commit: for each entry still pending on this consumer, apply the writes its
-- handler staged (tx.py), ack it, mark its order done and no longer running; an entry another
-- consumer took over meanwhile is left alone, its staged writes dropped.
-- KEYS: stream, done, running. ARGV: group, consumer, window ms, then the number of plain
-- entries and their ids (acked and nothing else: most of a batch, passed as bare ids), then
-- per other entry: its id, its order id ('' for none), the number of staged writes, and each
-- write as its argument count followed by its arguments.
-- Returns {acked, ids fenced out (pending on another consumer), errors of staged writes}.
-- Entries no longer pending (committed before, as when a reply was lost) count in neither,
-- and their writes are not applied again. A staged write Redis refuses is reported, not retried:
-- Redis has no rollback, and applying the rest once beats applying some of them twice.
local function commit(keys, args)
  local stream, done, running = keys[1], keys[2], keys[3]
  local group, consumer, window = args[1], args[2], tonumber(args[3])
  local plain = tonumber(args[4])
  local now = now_ms()
  local acked, fenced, errors, acks = 0, {}, {}, {}
  -- Every other entry takes at least three arguments: enough rows for all of them.
  local rows = plain + math.floor((#args - 4 - plain) / 3)
  local mine
  -- True when the entry is still pending on this consumer (it is then acked below), else false;
  -- one pending on another consumer is noted as fenced out.
  local function ours(id)
    local known, owner = mine[id], nil
    if known then
      owner = consumer
    elseif known == nil then -- false: acked earlier in this call, so no longer pending
      owner = owner_of(stream, group, id)
    end
    if owner == consumer then
      mine[id] = false
      acks[#acks + 1] = id
      return true
    end
    if owner then
      fenced[#fenced + 1] = id
    end
    return false
  end
  -- Plain entries still pending on this consumer (all of them, but for a consumer that was cut
  -- off) are acked straight from the arguments; from the first one that is not, one by one.
  -- When no other consumer of the group holds an entry, each is pending on this one or on
  -- none, XACK skips those on none, and the consumer's pending rows need not be read at all.
  local k = 5
  if plain > 0 and alone(stream, group, consumer) then
    k = 5 + plain
  else
    mine = oldest_pending(stream, group, consumer, math.max(1, rows))
    while k <= 4 + plain and mine[args[k]] do
      mine[args[k]] = false
      k = k + 1
    end
  end
  for first = 5, k - 1, 1000 do
    acked = acked + redis.call('XACK', stream, group, unpack(args, first, math.min(first + 999, k - 1)))
  end
  if k <= #args and not mine then -- entries with writes or an order to mark: looked up as before
    mine = oldest_pending(stream, group, consumer, math.max(1, rows - plain))
  end
  for j = k, 4 + plain do
    ours(args[j])
  end
  local i = 5 + plain
  while i <= #args do
    local id, order, writes = args[i], args[i + 1], tonumber(args[i + 2])
    i = i + 3
    local owned = ours(id)
    for _ = 1, writes do
      local count = tonumber(args[i])
      if owned then
        local reply = redis.pcall(unpack(args, i + 1, i + count))
        if type(reply) == 'table' and reply.err then
          errors[#errors + 1] = id .. ' ' .. args[i + 1] .. ': ' .. reply.err
        end
      end
      i = i + 1 + count
    end
    if owned and order ~= '' then
      if window > 0 then
        redis.call('ZADD', done, now, order)
      end
      if redis.call('HGET', running, order) == consumer .. ' ' .. id then
        redis.call('HDEL', running, order)
      end
    end
  end
  -- One XACK per thousand entries rather than one per entry: nothing in between reads the PEL.
  for first = 1, #acks, 1000 do
    acked = acked + redis.call('XACK', stream, group, unpack(acks, first, math.min(first + 999, #acks)))
  end
  if window > 0 then
    redis.call('ZREMRANGEBYSCORE', done, '-inf', '(' .. (now - window))
  end
  return {acked, fenced, errors}
end

-- The fenced dead-letter: copy the entry to the dead-letter stream and ack it, if it is still
-- pending on this consumer. KEYS: stream, dead-letter stream, running. ARGV: group, consumer,
-- entry id, order id (or ''), then the record's field/value pairs. Returns the new entry's id,
-- or false when another consumer took the entry over.
local function dead_letter(keys, args)
  local stream, dead, running = keys[1], keys[2], keys[3]
  local group, consumer, id, order = args[1], args[2], args[3], args[4]
  if owner_of(stream, group, id) ~= consumer then
    return false
  end
  local record = {}
  for i = 5, #args do
    record[#record + 1] = args[i]
  end
  record[#record + 1] = 'dead_lettered_at'
  record[#record + 1] = iso(now_ms())
  local new_id = redis.call('XADD', dead, '*', unpack(record))
  redis.call('XACK', stream, group, id)
  if order ~= '' and redis.call('HGET', running, order) == consumer .. ' ' .. id then
    redis.call('HDEL', running, order)
  end
  return new_id
end

-- Idempotent append: a chunk of orders, each under its idempotency id (the order id) for
-- this producer, so a chunk sent again after a lost reply adds nothing twice; returns the entry
-- ids, the first entry's id for an order already appended. KEYS: stream, the producer's map
-- (iid -> entry id), the producer's list of iids, newest first. ARGV: producer id, how many iids
-- to remember, their TTL in ms, '1' to use Redis 8.6's own XADD IDMP, a number n, n pairs of
-- field name and value added to every entry (the trace context, tracing.py), then pairs of iid
-- and payload. Memory: at most that many iids per producer, gone after the TTL.
local function append(keys, args)
  local stream, map, recent = keys[1], keys[2], keys[3]
  local producer, keep, ttl, native = args[1], tonumber(args[2]), args[3], args[4] == '1'
  local fields, first = {'data', '', 'producer', producer}, 6 + 2 * tonumber(args[5])
  for i = 6, first - 1 do
    fields[#fields + 1] = args[i]
  end
  local ids = {}
  for i = first, #args, 2 do
    local iid = args[i]
    fields[2] = args[i + 1]
    local id
    if native then
      id = redis.call('XADD', stream, 'IDMP', producer, iid, '*', unpack(fields))
    else
      id = redis.call('HGET', map, iid)
      if not id then
        id = redis.call('XADD', stream, '*', unpack(fields))
        redis.call('HSET', map, iid, id)
        redis.call('LPUSH', recent, iid)
      end
    end
    ids[#ids + 1] = id
  end
  if not native then
    local old = redis.call('LRANGE', recent, keep, -1)
    if #old > 0 then
      redis.call('HDEL', map, unpack(old))
      redis.call('LTRIM', recent, 0, keep - 1)
    end
    redis.call('PEXPIRE', map, ttl)
    redis.call('PEXPIRE', recent, ttl)
  end
  return ids
end

-- Remove a consumer that is gone: no live lease and nothing pending, checked in the same step
-- as the delete. KEYS: stream, the consumer's lease. ARGV: group, consumer. Returns what
-- XGROUP DELCONSUMER does (0), -1 when it holds entries, -2 when its lease is alive.
local function remove_consumer(keys, args)
  if redis.call('EXISTS', keys[2]) == 1 then
    return -2
  end
  if #redis.call('XPENDING', keys[1], args[1], '-', '+', 1, args[2]) > 0 then
    return -1
  end
  return redis.call('XGROUP', 'DELCONSUMER', keys[1], args[1], args[2])
end

-- Keep this consumer's in-hand entries fresh (Redis 8.4+, where reads claim by idle time with
-- XREADGROUP ... CLAIM): XCLAIM ... JUSTID sets idle to 0 and leaves the delivery count alone,
-- and only entries still pending on this consumer are touched, so none is taken back from
-- another. KEYS: the stream; ARGV: group, consumer, entry ids. Returns how many were touched.
local function touch(keys, args)
  local stream, group, consumer = keys[1], args[1], args[2]
  local mine = {}
  for i = 3, #args do
    if owner_of(stream, group, args[i]) == consumer then mine[#mine + 1] = args[i] end
  end
  for first = 1, #mine, 1000 do
    local call = {'XCLAIM', stream, group, consumer, 0}
    for i = first, math.min(first + 999, #mine) do call[#call + 1] = mine[i] end
    call[#call + 1] = 'JUSTID'
    redis.call(unpack(call))
  end
  return #mine
end

redis.register_function('orders___VERSION___version', function() return '__VERSION__' end)
redis.register_function('orders___VERSION___admit', admit)
redis.register_function('orders___VERSION___commit', commit)
redis.register_function('orders___VERSION___dead_letter', dead_letter)
redis.register_function('orders___VERSION___append', append)
redis.register_function('orders___VERSION___remove_consumer', remove_consumer)
redis.register_function('orders___VERSION___touch', touch)
