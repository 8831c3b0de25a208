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

-- A staged write, or a dead letter's XADD, may carry at most this many arguments: Lua unpacks
-- them onto its stack, which holds about 8,000 values, and an error half way through a call
-- would leave its earlier writes applied (Redis functions do not roll back).
local MAX_ARGS = 4000

-- The fenced commit of a batch, in one atomic step. For each entry still pending on this
-- consumer: ack it, then apply the writes its handler staged (tx.py) and mark its order done;
-- or, for a dead letter, copy it to the dead-letter stream and ack it there and then. An
-- entry another consumer took over meanwhile is left alone, its writes dropped. Acks come
-- before writes, and every write goes through pcall, so nothing here can fail half way and
-- be applied again by a retry: a staged write Redis refuses is reported, the rest stand.
-- KEYS: stream, done, running, dead-letter stream, this consumer's lease.
-- ARGV: group, consumer, lease token, window ms; the number of plain entries (ack only) and
-- their ids; the number of entries with more, then per entry its id, its order id ('' for
-- none), the number of staged writes and each write as its argument count and arguments;
-- then, to the end, per dead letter its id, its order id, its record's length and the record
-- (field, value, ...).
-- Returns {acked, ids pending on another consumer, errors, 1 if the lease is another
-- process's (nothing applied) else 0}. Entries no longer pending (committed by a try whose
-- reply was lost) count in neither and are not applied again.
local function commit(keys, args)
  local stream, done, running, dead, lease = keys[1], keys[2], keys[3], keys[4], keys[5]
  local group, consumer, token, window = args[1], args[2], args[3], tonumber(args[4])
  local holder = redis.call('GET', lease)
  if holder and holder ~= token then
    return {0, {}, {}, 1}
  end
  local now = now_ms()
  local at = 4 -- the arguments are read in order: take() is the next one
  local function take()
    at = at + 1
    return args[at]
  end
  local plain = tonumber(take())
  local first_plain = at + 1
  at = at + plain
  local rich = {}
  for _ = 1, tonumber(take()) do
    local entry = {id = take(), order = take(), writes = {}}
    for _ = 1, tonumber(take()) do
      local count = tonumber(take())
      entry.writes[#entry.writes + 1] = {at + 1, count}
      at = at + count
    end
    rich[#rich + 1] = entry
  end
  local dead_letters = {}
  while at < #args do
    local letter = {id = take(), order = take(), count = tonumber(take())}
    letter.first = at + 1
    at = at + letter.count
    dead_letters[#dead_letters + 1] = letter
  end

  -- Which entries are still ours. When no other consumer of the group holds an entry, each
  -- is pending on this one or on none, and XACK itself skips those on none: the plain ids are
  -- acked straight from the arguments. Else one XPENDING fetches this consumer's oldest
  -- entries (usually the batch itself); an id not among them is looked up alone.
  local fenced, errors, acks = {}, {}, {}
  local mine
  local function ours(id)
    if mine == nil then
      mine = oldest_pending(stream, group, consumer, math.max(1, plain + #rich + #dead_letters))
    end
    local owner = mine[id] and consumer or owner_of(stream, group, id)
    if owner == consumer then
      return true
    end
    if owner then
      fenced[#fenced + 1] = id
    end
    return false
  end
  local acked = 0
  if plain > 0 and alone(stream, group, consumer) then
    for first = first_plain, first_plain + plain - 1, 1000 do
      acked = acked + redis.call('XACK', stream, group, unpack(args, first, math.min(first + 999, first_plain + plain - 1)))
    end
  else
    for j = first_plain, first_plain + plain - 1 do
      if ours(args[j]) then acks[#acks + 1] = args[j] end
    end
  end
  local owned = {}
  for _, entry in ipairs(rich) do
    if ours(entry.id) then
      owned[#owned + 1] = entry
      acks[#acks + 1] = entry.id
    end
  end
  for first = 1, #acks, 1000 do
    acked = acked + redis.call('XACK', stream, group, unpack(acks, first, math.min(first + 999, #acks)))
  end
  for _, entry in ipairs(owned) do
    for _, write in ipairs(entry.writes) do
      local at, count = write[1], write[2]
      local reply
      if count < 1 or count > MAX_ARGS then
        reply = {err = 'a staged write of ' .. count .. ' arguments (at most ' .. MAX_ARGS .. ')'}
      else
        reply = redis.pcall(unpack(args, at, at + count - 1))
      end
      if type(reply) == 'table' and reply.err then
        errors[#errors + 1] = entry.id .. ' ' .. tostring(args[at]) .. ': ' .. reply.err
      end
    end
    if entry.order ~= '' then
      if window > 0 then
        redis.call('ZADD', done, now, entry.order)
      end
      if redis.call('HGET', running, entry.order) == consumer .. ' ' .. entry.id then
        redis.call('HDEL', running, entry.order)
      end
    end
  end
  if window > 0 and #owned > 0 then
    redis.call('ZREMRANGEBYSCORE', done, '-inf', '(' .. (now - window))
  end
  -- Dead letters: the copy first, then the ack. A record Redis refuses is copied again with
  -- its metadata only, so the dead letter exists whatever the original held.
  local at = iso(now)
  for _, letter in ipairs(dead_letters) do
    if ours(letter.id) then
      local full, meta = {'XADD', dead, '*'}, {'XADD', dead, '*'}
      for j = letter.first, letter.first + letter.count - 2, 2 do
        full[#full + 1], full[#full + 2] = args[j], args[j + 1]
        if args[j] == 'group' or args[j] == 'consumer' or args[j] == 'source_id'
            or args[j] == 'deliveries' or args[j] == 'error' then
          meta[#meta + 1], meta[#meta + 2] = args[j], args[j + 1]
        end
      end
      full[#full + 1], full[#full + 2] = 'dead_lettered_at', at
      local reply
      if #full <= MAX_ARGS then
        reply = redis.pcall(unpack(full))
      else
        reply = {err = 'a record of ' .. letter.count .. ' values (at most ' .. MAX_ARGS .. ')'}
      end
      if type(reply) == 'table' and reply.err then
        errors[#errors + 1] = letter.id .. ' dead letter: ' .. reply.err .. '; kept its metadata only'
        meta[#meta + 1], meta[#meta + 2] = 'truncated', 'the original fields could not be copied'
        meta[#meta + 1], meta[#meta + 2] = 'dead_lettered_at', at
        reply = redis.pcall(unpack(meta))
      end
      if type(reply) == 'table' and reply.err then
        errors[#errors + 1] = letter.id .. ' dead letter: ' .. reply.err .. '; left pending'
      else
        acked = acked + redis.call('XACK', stream, group, letter.id)
        if letter.order ~= '' and redis.call('HGET', running, letter.order) == consumer .. ' ' .. letter.id then
          redis.call('HDEL', running, letter.order)
        end
      end
    end
  end
  return {acked, fenced, errors, 0}
end

-- Idempotent append, one check per chunk (as Kafka's idempotent producer does per batch).
-- A track is one run of appends to this stream: one publish call (a field of its producer's
-- hash of calls, which keeps the last `keep` calls) or one input file (a key of its own, an
-- input's checkpoint). Its record holds the state the last chunk moved it to and that chunk's
-- entry ids, and the same for the chunk before: at most two chunks are in flight, so a chunk
-- sent again after a lost reply finds its own state there and adds nothing; a chunk whose
-- `before` is the state recorded is appended, whole, and moves the track on. A state is the
-- orders so far ("1500"; for an input, with a digest of them: "1500:<hex>"). A record behind
-- the chunk (Redis lost appends it had confirmed: a failover before the replica had them, a
-- flush) cannot hold the chunk, which is appended; one at or past it holds another run's
-- chunks (the same input published twice at once): refused, not appended twice.
-- KEYS: stream, the track's key, the producer's list of calls (newest first).
-- ARGV: producer id, the call's field ('' for an input's own key), before, after, keep (calls
-- a producer's hash remembers; 0 for an input), TTL ms, a number n, n pairs of field name and
-- value added to every entry (the trace context, tracing.py), then the payloads.
-- Returns {'new' | 'again' | 'behind' | 'gone', ids, orders}: ids is "first-id+count" (the entries'
-- ids follow each other) or, should they not (ids someone set near the end of their range), "id,id,...".
-- 'again': the chunk was appended before (the ids are that append's); 'behind': appended, the
-- record `orders` short of `before`; 'gone': appended, no record (a flush, a restart without
-- persistence, `keep` newer calls, or the TTL), `orders` short of `before`.
local function append(keys, args)
  local stream, track, calls = keys[1], keys[2], keys[3]
  local producer, call, before, after = args[1], args[2], args[3], args[4]
  local keep, ttl, first = tonumber(args[5]), args[6], 8 + 2 * tonumber(args[7])
  if first > #args then
    return redis.error_reply('ERR append: no payloads')
  end
  local record
  if call == '' then record = redis.call('GET', track) else record = redis.call('HGET', track, call) end
  local now, now_ids, prev, prev_ids = '', '', '', ''
  if record then
    now, now_ids, prev, prev_ids = string.match(record, '^(%S*) (%S*) (%S*) (%S*)$')
    if after == now then return {'again', now_ids, 0} end
    if after == prev then return {'again', prev_ids, 0} end
  end
  local short = 0
  if before ~= now then
    short = (tonumber(string.match(before, '^%d+')) or 0) - (tonumber(string.match(now, '^%d+')) or 0)
    if short <= 0 then
      return redis.error_reply('CONFLICT the track is at ' .. now .. ', this chunk follows ' .. before)
    end
  end
  local extra = {}
  for i = 8, first - 1 do
    extra[#extra + 1] = args[i]
  end
  local id = redis.call('XADD', stream, '*', 'data', args[first], 'producer', producer, unpack(extra))
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  -- The entries of one call take the sequence numbers after the first's: from Redis 7.2 every
  -- '*' of a call gets the call's time; before, '<ms>-*' asks for that ms (but not near 2^64).
  local following = '*'
  if redis.REDIS_VERSION_NUM < 0x070200 and #seq < 19 then
    following = ms .. '-*'
  end
  local all = {id}
  for i = first + 1, #args do
    all[#all + 1] = redis.call('XADD', stream, following, 'data', args[i], 'producer', producer, unpack(extra))
  end
  local ids
  if #seq < 15 and all[#all] == string.format('%s-%d', ms, tonumber(seq) + #all - 1) then
    ids = id .. '+' .. #all
  else
    ids = table.concat(all, ',')
  end
  local updated = after .. ' ' .. ids .. ' ' .. now .. ' ' .. now_ids
  if call == '' then
    redis.call('SET', track, updated, 'PX', ttl)
  else
    redis.call('HSET', track, call, updated)
    if not record then
      local length = redis.call('LPUSH', calls, call)
      if length > keep then -- a thousand at most: unpack puts them on Lua's stack
        redis.call('HDEL', track, unpack(redis.call('RPOP', calls, math.min(length - keep, 1000))))
      end
    end
    redis.call('PEXPIRE', track, ttl)
    redis.call('PEXPIRE', calls, ttl)
  end
  if short > 0 then
    return {record and 'behind' or 'gone', ids, short}
  end
  return {'new', ids, 0}
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

-- Stream ids compared by value, as text: Lua's numbers lose digits above 2^53. -1, 0 or 1.
local function compare_ids(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  for _, pair in ipairs({{a_ms, b_ms}, {a_seq, b_seq}}) do
    local x, y = pair[1], pair[2]
    if #x ~= #y then return #x < #y and -1 or 1 end
    if x ~= y then return x < y and -1 or 1 end
  end
  return 0
end

-- How many entries lie in the XRANGE bounds `from` .. `to`, counting at most limit + 1 of them:
-- the count, and whether it is all of them.
local function count_range(stream, from, to, limit)
  local n = 0
  while n <= limit do
    local ask = math.min(1000, limit + 1 - n)
    local page = redis.call('XRANGE', stream, from, to, 'COUNT', ask)
    n = n + #page
    if #page < ask then return n, true end
    from = '(' .. page[#page][1]
  end
  return n, false
end

local function fields_of(flat)
  local map = {}
  for i = 1, #flat, 2 do map[flat[i]] = flat[i + 1] end
  return map
end

-- Each group's lag: the entries of the stream after its last-delivered id, counted, since
-- Redis's own figure (XINFO GROUPS lag, kept from two counters) can be wrong or NULL: after an
-- AOF reload or a failover on Redis before 7.4 (the read counter is not replicated), once an
-- undelivered entry was trimmed or deleted, or once a group was set to an arbitrary id.
-- Exact for free when the group has read everything or is behind the first entry; else the
-- entries after it, or the stream's length less those up to it, whichever is done within
-- `limit`; else only bounds. With `fix`, a group whose figure differs from an exact count gets
-- it through XGROUP SETID (same id, ENTRIESREAD), where no deleted entry ahead makes Redis
-- ignore that counter. KEYS: the stream. ARGV: limit.
-- Returns per group {name, pending, lowest, highest, Redis's figure before, after (false for
-- NULL), 1 if a deleted entry ahead makes Redis ignore the counter}.
local function group_lags(stream, limit, fix)
  local info = redis.pcall('XINFO', 'STREAM', stream)
  if type(info) == 'table' and info.err then
    if string.find(string.lower(info.err), 'no such key', 1, true) then return {} end
    return redis.error_reply(info.err)
  end
  info = fields_of(info)
  local length, added, deleted = info['length'], info['entries-added'], info['max-deleted-entry-id']
  local out = {}
  for _, flat in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local group = fields_of(flat)
    local last = group['last-delivered-id']
    local low, high
    if length == 0 or compare_ids(last, info['last-entry'][1]) >= 0 then
      low = 0
    elseif compare_ids(last, info['first-entry'][1]) < 0 then
      low = length
    else
      local after, all_after = count_range(stream, '(' .. last, '+', limit)
      if all_after then
        low = after
      else
        local before, all_before = count_range(stream, '-', last, limit)
        low = all_before and length - before or after
        high = all_before and low or length - before
      end
    end
    high = high or low
    -- A deleted entry after the group's id (and still inside the stream) makes Redis ignore the
    -- group's counter: setting it would change nothing there.
    local ignored = length > 0 and deleted ~= '0-0' and compare_ids(deleted, last) >= 0
      and compare_ids(deleted, info['first-entry'][1]) >= 0
    local before, now = group['lag'], group['lag']
    if fix and low == high and before ~= low and not ignored then
      redis.call('XGROUP', 'SETID', stream, group['name'], last, 'ENTRIESREAD', string.format('%d', added - low))
      for _, again in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
        local seen = fields_of(again)
        if seen['name'] == group['name'] then now = seen['lag'] end
      end
    end
    out[#out + 1] = {group['name'], group['pending'], low, high, before, now, ignored and 1 or 0}
  end
  return out
end

local function lags(keys, args)
  return group_lags(keys[1], tonumber(args[1]), false)
end

local function fix_lags(keys, args)
  return group_lags(keys[1], tonumber(args[1]), true)
end

-- Keep every entry pending on this consumer fresh (Redis 8.4+, where reads claim by idle
-- time with XREADGROUP ... CLAIM): XCLAIM ... JUSTID sets idle to 0 and leaves the delivery
-- count alone. Its lease process calls it while the consumer lives, so whatever it holds (a
-- batch in hand, one read ahead, entries waiting for a retry) stays its own. XCLAIM drops an
-- entry deleted while pending: the consumer counts those, as it does those it finds itself.
-- KEYS: the stream; ARGV: group, consumer. Returns {entries touched, entries dropped}.
local function touch(keys, args)
  local stream, group, consumer = keys[1], args[1], args[2]
  local touched, dropped, start = 0, 0, '-'
  for _ = 1, 100 do -- at most 100,000 entries a call: bounded, however much a consumer holds
    local rows = redis.pcall('XPENDING', stream, group, start, '+', 1000, consumer)
    if rows.err then return {0, 0} end -- no stream or group (yet, or flushed): it holds nothing
    if #rows == 0 then break end
    local call = {'XCLAIM', stream, group, consumer, 0}
    for _, row in ipairs(rows) do call[#call + 1] = row[1] end
    call[#call + 1] = 'JUSTID'
    local claimed = #redis.call(unpack(call))
    touched, dropped = touched + claimed, dropped + #rows - claimed
    if #rows < 1000 then break end
    start = '(' .. rows[#rows][1]
  end
  return {touched, dropped}
end

-- Deliver again entries due for a retry, those still pending on this consumer: XCLAIM to
-- itself, with the delivery count the consumer gives (the deliveries that ran: a re-read
-- after a failure, or an entry held back during a downstream outage, adds nothing); one
-- another consumer took over is left alone, a deleted one leaves the pending list.
-- KEYS: the stream; ARGV: group, consumer, then per entry its id and delivery count.
-- Returns per entry still there {id, fields, its delivery count}.
local function redeliver(keys, args)
  local stream, group, consumer = keys[1], args[1], args[2]
  local out = {}
  for i = 3, #args, 2 do
    local id, count = args[i], args[i + 1]
    local row = redis.call('XPENDING', stream, group, id, id, 1)[1]
    if row and row[2] == consumer then
      local claimed = redis.call('XCLAIM', stream, group, consumer, 0, id, 'RETRYCOUNT', count)
      if claimed[1] then out[#out + 1] = {claimed[1][1], claimed[1][2], tonumber(count)} end
    end
  end
  return out
end

-- A consumer's lease: its name's key holds the token of the one process using that name.
-- KEYS: the lease. ARGV: what, token, TTL ms, and for 'take' the token a dead holder left.
-- 'take': set it if no process holds it, or if it holds the token expected there; returns
-- 1, or {holder's token, its TTL left in ms} when another holds it.
-- 'refresh': 1 ours and refreshed; 2 it had lapsed and is ours again; 0 another process's.
-- 'release': delete it if it is ours.
local function lease(keys, args)
  local key, what, token, ttl = keys[1], args[1], args[2], args[3]
  local holder = redis.call('GET', key)
  if what == 'take' then
    if not holder or holder == token or holder == args[4] then
      redis.call('SET', key, token, 'PX', ttl)
      return 1
    end
    return {holder, redis.call('PTTL', key)}
  elseif what == 'refresh' then
    if holder == token then
      redis.call('PEXPIRE', key, ttl)
      return 1
    elseif not holder then
      redis.call('SET', key, token, 'PX', ttl)
      return 2
    end
    return 0
  elseif holder == token then
    redis.call('DEL', key)
  end
  return 0
end

-- Consumers' steps may run on a full Redis (maxmemory reached, noeviction): they free memory
-- (acks, then trimming) and grow it by at most what is in flight. The producer's append may
-- not: a full Redis refuses new orders rather than dropping old ones.
local function for_consumers(name, callback)
  redis.register_function{function_name = 'orders___VERSION___' .. name, callback = callback, flags = {'allow-oom'}}
end

redis.register_function{function_name = 'orders___VERSION___version', callback = function() return '__VERSION__' end,
  flags = {'no-writes'}}
for_consumers('admit', admit)
for_consumers('commit', commit)
for_consumers('remove_consumer', remove_consumer)
for_consumers('fix_lags', fix_lags)
redis.register_function{function_name = 'orders___VERSION___lags', callback = lags, flags = {'no-writes'}}
for_consumers('touch', touch)
for_consumers('redeliver', redeliver)
for_consumers('lease', lease)
redis.register_function('orders___VERSION___append', append)
