-- stigmergy field scripts for Redis. Each script is this prelude plus one body.
--
-- KEYS (all share one hash tag, so they live in one cluster slot):
--   1 sig     hash  id -> record: I \31 kind \31 param \31 own \31 agent \31 type \31 target \31 region \31 meta \31 t0
--   2 exp     zset  what retires when: signals indexed on their own (own = '1') under their id, the
--                   others by batch (below); score = expiry = t0 + lifetime
--   3 acc     hash  sum field (below) -> A, a sum of 'e' and 's' signals in landmark form
--   4 count   hash  same fields -> how many live signals the sum holds (at 0 the sum is dropped)
--   5 gen     set   ids of signals evaluated one by one ('l' linear, 'x' own-rate exponential)
--   6 seq     string  id counter
--   7 evap    string  signals retired since the last evaporate()
--   8 types   hash  type -> "rate|epoch": the decay rate of its sums and their landmark time
--   9 agents  hash  agent seen (depositor or target) -> its slot: 0, 1, ... in order of first sight
--  10 index   hash  batch -> "first id|positions": a deposit's signals of one type, as positions
--                   (from 1, each followed by ',') in order of expiry; in exp as 'b' .. first id .. '.' .. n
--                   under the expiry of its next signal. One zset entry per batch instead of per signal:
--                   ZADD is the dearest part of a deposit. Decay is monotonic in |I| for one type, so the
--                   client orders them; a rescaled signal leaves its batch for an entry of its own.
--  11 order   string  the agents in slot order, each followed by \31
--  12 vec     string  (real Redis only) a copy of the n fields for region '': per type a segment of
--                   `capacity` little-endian doubles, the agent in slot s at 8 * (capacity * segment + s),
--                   so the all-agent read is one GETRANGE per type, not an HMGET of a field per agent, and
--                   the client parses no number. Written wherever the n fields are.
--  13 vecs    hash  type -> its segment (0, 1, ...); '\31' -> capacity (doubles when slots outgrow it)
-- ARGV[1] = now ('' = the server's TIME), ARGV[2] = evaporation threshold, ARGV[3] = idle TTL (s).
--
-- Records and sum fields join their parts with \31, which no part contains (names are printable,
-- JSON escapes control characters). Absent target, region and metadata are ''.
-- Sum fields, for region '' (every region) and for the signal's own region if it has one:
--   0 \31 type \31 region            every signal
--   1 \31 type \31 region            untargeted signals
--   n \31 type \31 region \31 agent  what the agent feels beyond sum 1: signals targeted at it by
--                                    another agent, minus its own untargeted ones
-- so an agent feels unit * (sum1 + net), everyone together unit * sum0: one agent's reading reads
-- two fields, every agent's one field each. RedisFieldBackend._deposits builds the same fields.
--
-- Landmark form: a sum of type t is stored as A = sum of I_i * e^(rate * (t_i - epoch_t)), so it is
-- worth A * e^(-rate * (now - epoch_t)) now. A deposit adds a constant, a retirement subtracts the
-- very same constant, a reading multiplies once per type: no per-sum exponentials, no parsing.
-- Before e^(rate * (now - epoch)) grows past e^REBASE, every sum of the type is rescaled to epoch = now.
-- Kinds: e = exponential (param: rate), s = step (param: ttl), l = linear (param: rate per s),
--        x = exponential with its own rate, not summed (stochastic decay draws one per signal).
--
-- Cost: on a slow core a redis.call costs ~3 us, a number formatted in Lua ~1 us and a ZADD ~2 us a
-- member, so scripts work per batch, not per signal: the client prepares records and sums, expiry
-- is indexed per batch, and numbers go to redis.call as numbers (Redis writes them exactly, with 17
-- significant digits, in C).

local K_SIG, K_EXP, K_ACC, K_COUNT, K_GEN, K_SEQ, K_EVAP, K_TYPES, K_AGENTS, K_INDEX = unpack(KEYS, 1, 10)
local K_ORDER, K_VEC, K_VECS = KEYS[11], KEYS[12], KEYS[13]
-- Vectors need Redis's struct library (every Redis since 2.6); without it (fakeredis) reads use the n fields.
local VECTORS = struct ~= nil

local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local NOW = clock()
local THRESHOLD = tonumber(ARGV[2])
local IDLE_TTL = tonumber(ARGV[3])
local REBASE = 100

local function fmt(x) return string.format('%.17g', x) end

local abs, log = math.abs, math.log

-- Age at which |value| falls under the threshold.
local function lifetime(I, kind, param)
  local m = abs(I)
  if m < THRESHOLD then return 0 end
  if kind == 's' then return param end
  if kind == 'l' then return (m - THRESHOLD) / param end
  return log(m / THRESHOLD) / param
end

local RECORD = '^' .. string.rep('([^\31]*)\31', 9) .. '(.*)$'

local function decode(raw)
  local I, kind, param, own, agent, t, target, region, meta, t0 = string.match(raw, RECORD)
  local r = {I = tonumber(I), kind = kind, param = tonumber(param), own = own, agent = agent, type = t,
             target = target, region = region, meta = meta, t0 = tonumber(t0)}
  r.expiry = r.t0 + lifetime(r.I, kind, r.param)  -- as the deposit computed it for the exp zset
  return r
end

local function encode(r)
  return table.concat({fmt(r.I), r.kind, fmt(r.param), r.own, r.agent, r.type, r.target, r.region, r.meta,
                       fmt(r.t0)}, '\31')
end

local function rate_of(r)
  if r.kind == 's' then return 0 end
  return r.param
end

local function summed(r) return r.kind == 'e' or r.kind == 's' end

local function value(r, now)
  local age = now - r.t0
  if r.kind == 's' then
    if age < r.param then return r.I end
    return 0
  elseif r.kind == 'l' then
    local m = math.abs(r.I) - r.param * age
    if m < 0 then m = 0 end
    if r.I < 0 then return -m end
    return m
  end
  return r.I * math.exp(-r.param * age)
end

-- One command per chunk of arguments: Lua's unpack() has a stack limit.
local function call_chunked(command, key, args, width)
  local chunk = 4000 - 4000 % width
  for start = 1, #args, chunk do
    redis.call(command, key, unpack(args, start, math.min(start + chunk - 1, #args)))
  end
end

local function hmget(key, fields)
  if #fields <= 4000 then
    if #fields == 0 then return {} end
    return redis.call('HMGET', key, unpack(fields))
  end
  local out = {}
  for start = 1, #fields, 4000 do
    local got = redis.call('HMGET', key, unpack(fields, start, math.min(start + 3999, #fields)))
    for _, v in ipairs(got) do out[#out + 1] = v end
  end
  return out
end

local SLOTS = {}  -- agent -> slot, as read or given out in this script

-- Give each agent never seen before the next slot (deposits name every agent they touch).
local function register_agents(names)
  if #names == 0 then return end
  local slots, new, order = hmget(K_AGENTS, names), {}, {}
  local next_slot = redis.call('HLEN', K_AGENTS)
  for k, name in ipairs(names) do
    if slots[k] then
      SLOTS[name] = tonumber(slots[k])
    else
      SLOTS[name] = next_slot
      new[#new + 1] = name
      new[#new + 1] = string.format('%d', next_slot)
      order[#order + 1] = name
      next_slot = next_slot + 1
    end
  end
  if #order > 0 then
    call_chunked('HSET', K_AGENTS, new, 2)
    redis.call('APPEND', K_ORDER, table.concat(order, '\31') .. '\31')
  end
end

local CAPACITY, SEGMENTS, ZERO = nil, {}, VECTORS and struct.pack('<d', 0)

local function capacity()
  if CAPACITY == nil then CAPACITY = tonumber(redis.call('HGET', K_VECS, '\31')) or 0 end
  return CAPACITY
end

-- Make room for `slots` slots in every segment: rare, as the capacity at least doubles.
local function reserve(slots)
  local old = capacity()
  if slots <= old then return end
  local new = math.max(64, 2 * old, slots)
  local vec, parts, pad = redis.call('GET', K_VEC) or '', {}, string.rep(ZERO, new - old)
  for seg = 0, redis.call('HLEN', K_VECS) - 2 do  -- every field but capacity is a segment
    local kept = string.sub(vec, 8 * old * seg + 1, 8 * old * (seg + 1))
    parts[#parts + 1] = kept .. string.rep(ZERO, old - #kept / 8) .. pad
  end
  redis.call('SET', K_VEC, table.concat(parts))
  redis.call('HSET', K_VECS, '\31', new)
  CAPACITY = new
end

-- Type t's segment (nil: none yet, unless create).
local function segment(t, create)
  if SEGMENTS[t] == nil then
    SEGMENTS[t] = tonumber(redis.call('HGET', K_VECS, t))
    if SEGMENTS[t] == nil and create then
      reserve(1)
      SEGMENTS[t] = redis.call('HLEN', K_VECS) - 1
      redis.call('HSET', K_VECS, t, SEGMENTS[t])
    end
  end
  return SEGMENTS[t]
end

-- n doubles from s (zeros past its end) and back: one struct call per 4,000 (Lua's stack limit).
local function doubles(s, n)
  local out, have = {}, math.floor(#s / 8)
  for first = 0, have - 1, 4000 do
    local m = math.min(4000, have - first)
    local got = {struct.unpack('<' .. string.rep('d', m), s, 8 * first + 1)}
    for k = 1, m do out[first + k] = got[k] end
  end
  for k = have + 1, n do out[k] = 0 end
  return out
end

local function packed(values)
  local parts = {}
  for first = 1, #values, 4000 do
    local last = math.min(first + 3999, #values)
    parts[#parts + 1] = struct.pack('<' .. string.rep('d', last - first + 1), unpack(values, first, last))
  end
  return table.concat(parts)
end

-- Set slots (changed: slot -> value) of t's segment: a SETRANGE each when few, else one for the
-- used part of the segment (a redis.call costs what unpacking and packing ~10 slots does).
local function vec_set(t, changed, count)
  local used = redis.call('HLEN', K_AGENTS)
  reserve(used)
  local base = 8 * capacity() * segment(t, true)
  if 8 * count < used then
    for slot, v in pairs(changed) do redis.call('SETRANGE', K_VEC, base + 8 * slot, struct.pack('<d', v)) end
    return
  end
  local values = doubles(redis.call('GETRANGE', K_VEC, base, base + 8 * used - 1), used)
  for slot, v in pairs(changed) do values[slot + 1] = v end
  redis.call('SETRANGE', K_VEC, base, packed(values))
end

-- Copy new values of region-'' net sums (fields[k] -> values[k]) into their types' segments.
local function vec_write(fields, values)
  local by_type, unknown = {}, {}
  for k, field in ipairs(fields) do
    local t, agent = nil, nil
    if string.byte(field) == 110 then t, agent = string.match(field, '^n\31([^\31]*)\31\31(.*)$') end
    if t then
      by_type[t] = by_type[t] or {agents = {}, values = {}}
      local list = by_type[t]
      list.agents[#list.agents + 1], list.values[#list.values + 1] = agent, values[k]
      if SLOTS[agent] == nil then unknown[#unknown + 1] = agent end
    end
  end
  for k, slot in ipairs(hmget(K_AGENTS, unknown)) do SLOTS[unknown[k]] = tonumber(slot) end
  for t, list in pairs(by_type) do
    local changed = {}
    for k, agent in ipairs(list.agents) do changed[SLOTS[agent]] = list.values[k] end
    vec_set(t, changed, #list.agents)
  end
end

-- Write t's segment afresh from flat {field, value, ...} pairs holding all its sums (a rescale).
local function vec_rebuild(t, flat)
  local head, agents, values = 'n\31' .. t .. '\31\31', {}, {}
  for k = 1, #flat, 2 do
    if string.sub(flat[k], 1, #head) == head then
      agents[#agents + 1], values[#values + 1] = string.sub(flat[k], #head + 1), flat[k + 1]
    end
  end
  local changed, used = {}, redis.call('HLEN', K_AGENTS)
  for slot = 0, used - 1 do changed[slot] = 0 end
  for k, slot in ipairs(hmget(K_AGENTS, agents)) do changed[tonumber(slot)] = values[k] end
  vec_set(t, changed, used)
end

local TYPES = {}  -- type -> {rate, epoch}, read once per script

local function type_info(t)
  local info = TYPES[t]
  if info == nil then
    local raw = redis.call('HGET', K_TYPES, t)
    if not raw then return nil end
    local rate, epoch = string.match(raw, '^([^|]*)|(.*)$')
    info = {tonumber(rate), tonumber(epoch)}
    TYPES[t] = info
  end
  return info
end

local function register_type(t, rate)
  if type_info(t) == nil then
    redis.call('HSET', K_TYPES, t, fmt(rate) .. '|' .. fmt(NOW))
    TYPES[t] = {rate, NOW}
  end
end

-- What a type's stored sums are worth per unit now (nil: type never seen); rebases when due.
local function scale(t)
  local info = type_info(t)
  if info == nil then return nil end
  if info[1] * (NOW - info[2]) > REBASE then
    local factor = math.exp(-info[1] * (NOW - info[2]))
    local flat, rescaled = redis.call('HGETALL', K_ACC), {}
    for k = 1, #flat, 2 do
      if string.match(flat[k], '^[^\31]*\31([^\31]*)') == t then
        rescaled[#rescaled + 1] = flat[k]
        rescaled[#rescaled + 1] = tonumber(flat[k + 1]) * factor
      end
    end
    call_chunked('HSET', K_ACC, rescaled, 2)
    if VECTORS then vec_rebuild(t, rescaled) end
    info[2] = NOW
    redis.call('HSET', K_TYPES, t, fmt(info[1]) .. '|' .. fmt(NOW))
  end
  return math.exp(-info[1] * (NOW - info[2]))
end

-- The constant a signal adds to its sums (and a retirement takes back).
local function landmark(r, intensity)
  local rate = rate_of(r)
  if rate == 0 then return intensity end
  return intensity * math.exp(rate * (r.t0 - type_info(r.type)[2]))
end

-- Add amounts[k] to sum fields[k] and counts[k] to how many signals it holds, a few commands for
-- any number of fields; a sum left with no signal is deleted (no rounding residue stays).
local function acc_write(fields, amounts, counts)
  if #fields == 0 then return end
  local sums, held = hmget(K_ACC, fields), hmget(K_COUNT, fields)
  local set_sums, set_counts, gone, now = {}, {}, {}, {}
  for k, field in ipairs(fields) do
    local n = (tonumber(held[k]) or 0) + counts[k]
    if n <= 0 then
      gone[#gone + 1], now[k] = field, 0
    else
      local j = #set_sums
      now[k] = (tonumber(sums[k]) or 0) + amounts[k]
      set_sums[j + 1], set_sums[j + 2] = field, now[k]
      set_counts[j + 1], set_counts[j + 2] = field, string.format('%d', n)  -- cheaper than a number
    end
  end
  call_chunked('HSET', K_ACC, set_sums, 2)
  call_chunked('HSET', K_COUNT, set_counts, 2)
  call_chunked('HDEL', K_ACC, gone, 1)
  call_chunked('HDEL', K_COUNT, gone, 1)
  if VECTORS then vec_write(fields, now) end
end

-- Changes to sums made one signal at a time (retirement, rescale), gathered per field.
local CHANGES = {fields = {}, amount = {}, count = {}}

local function change(field, amount, dn)
  local before = CHANGES.amount[field]
  if before == nil then
    CHANGES.fields[#CHANGES.fields + 1] = field
    CHANGES.amount[field], CHANGES.count[field] = amount, dn
  else
    CHANGES.amount[field], CHANGES.count[field] = before + amount, CHANGES.count[field] + dn
  end
end

-- Add amount (landmark form) to every sum of the signal; dn changes how many signals each holds.
local function acc_add(r, amount, dn)
  local regions = r.region == '' and 1 or 2
  for pass = 1, regions do
    local tail = r.type .. '\31' .. (pass == 1 and '' or r.region)
    change('0\31' .. tail, amount, dn)
    if r.target == '' then
      change('1\31' .. tail, amount, dn)
      change('n\31' .. tail .. '\31' .. r.agent, -amount, dn)
    elseif r.target ~= r.agent then
      change('n\31' .. tail .. '\31' .. r.target, amount, dn)
    end
  end
end

local function acc_flush()
  local fields, amounts, counts = CHANGES.fields, {}, {}
  for k, field in ipairs(fields) do amounts[k], counts[k] = CHANGES.amount[field], CHANGES.count[field] end
  acc_write(fields, amounts, counts)
  CHANGES = {fields = {}, amount = {}, count = {}}
end

-- Delete signals (ids with their decoded records, false for ids already gone) and take them out
-- of their sums. Returns how many existed.
local function forget(ids, records)
  local existing, own, generic = {}, {}, {}
  for k, id in ipairs(ids) do
    local r = records[k]
    if r then
      existing[#existing + 1] = id
      if r.own ~= '' then own[#own + 1] = id end
      if summed(r) then acc_add(r, -landmark(r, r.I), -1) else generic[#generic + 1] = id end
    end
  end
  acc_flush()
  call_chunked('HDEL', K_SIG, existing, 1)
  call_chunked('ZREM', K_EXP, own, 1)
  call_chunked('SREM', K_GEN, generic, 1)
  return #existing
end

-- Collect the due signals of a batch (see index), in order, into ids and records; index the rest
-- under the expiry of the first one not due. Signals gone or indexed on their own are passed over.
local function walk(batch, now, ids, records)
  local value = redis.call('HGET', K_INDEX, batch)
  if not value then  -- its key expired apart from exp's
    redis.call('ZREM', K_EXP, batch)
    return
  end
  local first, rest = string.match(value, '^(%d+)|(.*)$')
  local base, at, chunk = tonumber(first) - 1, 1, 8  -- read a few records, then more if all were due
  while at <= #rest do
    local some, starts, p = {}, {}, at
    while #some < chunk and p <= #rest do
      local comma = string.find(rest, ',', p, true)
      starts[#some + 1] = p
      some[#some + 1] = string.format('%d', base + tonumber(string.sub(rest, p, comma - 1)))
      p = comma + 1
    end
    local raws = hmget(K_SIG, some)
    for k, id in ipairs(some) do
      local r = raws[k] and decode(raws[k])
      if r and r.own == '' then
        if r.expiry > now then
          redis.call('HSET', K_INDEX, batch, first .. '|' .. string.sub(rest, starts[k]))
          redis.call('ZADD', K_EXP, r.expiry, batch)
          return
        end
        ids[#ids + 1], records[#records + 1] = id, r
      end
    end
    at, chunk = p, chunk * 2
  end
  redis.call('HDEL', K_INDEX, batch)
  redis.call('ZREM', K_EXP, batch)
end

-- Retire every signal whose evaporation time has come: readings never include them.
local function expire(now)
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', fmt(now))
  if #due == 0 then return end
  local ids, records, alone = {}, {}, {}
  for _, member in ipairs(due) do
    if string.byte(member) == 98 then walk(member, now, ids, records) else alone[#alone + 1] = member end
  end
  local raws, gone = hmget(K_SIG, alone), {}
  for k, id in ipairs(alone) do
    if raws[k] then
      ids[#ids + 1], records[#records + 1] = id, decode(raws[k])
    else
      gone[#gone + 1] = id  -- its record's key expired apart from exp's
    end
  end
  call_chunked('ZREM', K_EXP, gone, 1)
  local retired = forget(ids, records)
  if retired > 0 then redis.call('INCRBY', K_EVAP, retired) end
end

-- Keep every key IDLE_TTL from expiring; a key's expiry is rewritten only once it has run down
-- by 1% (or the key is new), so most writes cost reads, not replicated EXPIREs.
local function touch()
  for i = 1, #KEYS do
    if redis.call('TTL', KEYS[i]) < IDLE_TTL * 0.99 then redis.call('EXPIRE', KEYS[i], IDLE_TTL) end
  end
end

local function visible_to(r, agent)
  return r.target == '' or r.target == agent
end

-- Parse "n_pairs, type, weight, ..." starting at ARGV[i]; all_types when the list is '*'.
local function weights_from(i)
  local mode = ARGV[i]
  local n = tonumber(ARGV[i + 1])
  local w = {}
  if mode == '*' then
    for _, t in ipairs(redis.call('HKEYS', K_TYPES)) do w[t] = 1.0 end
  end
  for k = 0, n - 1 do
    local t, weight = ARGV[i + 2 + 2 * k], tonumber(ARGV[i + 3 + 2 * k])
    if mode == '*' then
      if w[t] ~= nil then w[t] = weight end
    else
      w[t] = weight
    end
  end
  return w, i + 2 + 2 * n
end

-- Flat id, record pairs: one signal (only = its id) or all of them (only = '').
local function stored(only)
  if only == '' then return redis.call('HGETALL', K_SIG) end
  local raw = redis.call('HGET', K_SIG, only)
  if raw then return {only, raw} end
  return {}
end

local function generic_records()
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', K_GEN)) do
    local raw = redis.call('HGET', K_SIG, id)
    if raw then out[#out + 1] = decode(raw) end
  end
  return out
end

-- What agent feels (anyone: every signal, targeted or not) at region ('' = every region), weighed by w.
local function felt(agent, anyone, region, w)
  local total = 0
  for t, weight in pairs(w) do
    local unit = scale(t)
    if weight ~= 0 and unit ~= nil then
      local tail = t .. '\31' .. region
      if anyone then
        total = total + weight * unit * (tonumber(redis.call('HGET', K_ACC, '0\31' .. tail)) or 0)
      else
        local v = redis.call('HMGET', K_ACC, '1\31' .. tail, 'n\31' .. tail .. '\31' .. agent)
        total = total + weight * unit * ((tonumber(v[1]) or 0) + (tonumber(v[2]) or 0))
      end
    end
  end
  for _, r in ipairs(generic_records()) do
    local weight = w[r.type]
    if weight and weight ~= 0 and (region == '' or r.region == region) and
        (anyone or (visible_to(r, agent) and r.agent ~= agent)) then
      total = total + weight * value(r, NOW)
    end
  end
  return total
end

--@@ deposit
-- ARGV[4]: JSON [n, decay, names, types, alone, batches, generic], ARGV[5]: the n records up to their
-- deposit time (appended here), separated by \30; both from RedisFieldBackend._deposits, so that this
-- script, which every client of the field waits on, parses and formats nothing per signal;
-- ARGV[6]: JSON [[type, region, at least], ...]: floors that must all hold, or nothing is stored.
--   decay    [kind, param] pairs
--   names    the agents the batch names, depositors and targets, each once
--   types    per type: [type, rate, field, amount, count, field, amount, count, ...], the batch's
--            changes to each sum field, amounts being sums of intensities (landmark form is made here)
--   alone    [position, decay, intensity] of each signal indexed on its own (record's own = '1')
--   batches  [decay, intensity of the first, positions as index stores them] per type of the others
--   generic  positions of the signals evaluated one by one ('l', 'x')
expire(NOW)
for _, floor in ipairs(cjson.decode(ARGV[6])) do
  if felt('', true, floor[2], {[floor[1]] = 1}) < floor[3] then return {fmt(NOW), '', 0} end
end
local batch = cjson.decode(ARGV[4])
local n, decay, names, types, alone, batches, generic =
  batch[1], batch[2], batch[3], batch[4], batch[5], batch[6], batch[7]
local first = redis.call('INCRBY', K_SEQ, n) - n + 1
local first_id = string.format('%d', first)
local stamp = '\31' .. fmt(NOW)
local sig, exp, gen, index = {}, {}, {}, {}
local k = 0
for record in string.gmatch(ARGV[5], '[^\30]+') do
  k = k + 1
  sig[2 * k - 1], sig[2 * k] = string.format('%d', first + k - 1), record .. stamp
end
local function expiry(spec, intensity)
  return NOW + lifetime(intensity, decay[spec][1], decay[spec][2])
end
for _, signal in ipairs(alone) do
  local j = #exp
  exp[j + 1], exp[j + 2] = expiry(signal[2], signal[3]), sig[2 * signal[1] - 1]
end
for g, entry in ipairs(batches) do
  local member, j = 'b' .. first_id .. '.' .. g, #exp
  exp[j + 1], exp[j + 2] = expiry(entry[1], entry[2]), member
  j = #index
  index[j + 1], index[j + 2] = member, first_id .. '|' .. entry[3]
end
for j, position in ipairs(generic) do gen[j] = sig[2 * position - 1] end
local fields, amounts, counts = {}, {}, {}
for _, group in ipairs(types) do
  local t, rate = group[1], group[2]
  register_type(t, rate)
  scale(t)  -- rebase first if due, so the landmark constant stays small
  local landmark_now = math.exp(rate * (NOW - TYPES[t][2]))
  for j = 3, #group, 3 do
    local k = #fields + 1
    fields[k], amounts[k], counts[k] = group[j], group[j + 1] * landmark_now, group[j + 2]
  end
end
register_agents(names)
acc_write(fields, amounts, counts)
call_chunked('HSET', K_SIG, sig, 2)
call_chunked('ZADD', K_EXP, exp, 2)
call_chunked('HSET', K_INDEX, index, 2)
call_chunked('SADD', K_GEN, gen, 1)
touch()
return {fmt(NOW), first_id, n}

--@@ pressure
-- ARGV[4] agent ('' with ARGV[5] = '0' means nobody: every signal), ARGV[6] region, ARGV[7..] weights
expire(NOW)
return fmt(felt(ARGV[4], ARGV[5] == '0', ARGV[6], (weights_from(7))))

--@@ pressures
-- ARGV[4] region, ARGV[5] '1' if the client takes binary replies, ARGV[6..] weights, then the agents
-- asked for (none: every agent seen). The sums go back as stored with each type's factor, and the
-- client does the arithmetic: formatting a number costs Lua more than parsing one costs Python.
-- Every agent, region '', binary: each type's segment as it is ('b'). Otherwise one HMGET per type of
-- one field per agent, joined by \31 ('t'). Reply: {agents in slot order, each followed by \31, when
-- none were asked for, else ''; {generic sum for all, position, generic adjustment, ...}; 'b' or 't';
-- then per type: factor, sum 1, nets}.
expire(NOW)
local region = ARGV[4]
local w, i = weights_from(6)
local names = {}
for k = i, #ARGV do names[#names + 1] = ARGV[k] end
local everyone = #names == 0
local vectors = everyone and region == '' and VECTORS and ARGV[5] == '1'
local reply = {'', {}, vectors and 'b' or 't'}
if everyone then
  reply[1] = redis.call('GET', K_ORDER) or ''
  if not vectors then
    for name in string.gmatch(reply[1], '([^\31]+)') do names[#names + 1] = name end
  end
end
for t, weight in pairs(w) do
  local unit = scale(t)
  if weight ~= 0 and unit ~= nil then
    reply[#reply + 1] = fmt(weight * unit)
    reply[#reply + 1] = redis.call('HGET', K_ACC, '1\31' .. t .. '\31' .. region) or '0'
    if vectors then  -- slots past the capacity were never written: the client reads them as 0
      local seg, used = segment(t, false), math.min(redis.call('HLEN', K_AGENTS), capacity())
      local base = seg and 8 * capacity() * seg
      reply[#reply + 1] = (seg and used > 0) and redis.call('GETRANGE', K_VEC, base, base + 8 * used - 1) or ''
    else
      local head, fields = 'n\31' .. t .. '\31' .. region .. '\31', {}
      for k = 1, #names do fields[k] = head .. names[k] end
      local nets = hmget(K_ACC, fields)
      for k = 1, #nets do
        if not nets[k] then nets[k] = '0' end
      end
      reply[#reply + 1] = table.concat(nets, '\31')
    end
  end
end
local generic = generic_records()
if #generic > 0 then
  local index, public, own = {}, 0, {}
  for k, name in ipairs(names) do index[name] = k end
  local function position(agent)  -- from 1, in the reply's order of agents
    if not vectors then return index[agent] end
    local slot = redis.call('HGET', K_AGENTS, agent)
    return slot and tonumber(slot) + 1
  end
  for _, r in ipairs(generic) do
    local weight = w[r.type]
    if weight and weight ~= 0 and (region == '' or r.region == region) then
      local v = weight * value(r, NOW)
      local k = nil
      if r.target == '' then
        public, k, v = public + v, position(r.agent), -v
      elseif r.target ~= r.agent then
        k = position(r.target)
      end
      if k then own[k] = (own[k] or 0) + v end
    end
  end
  reply[2][1] = fmt(public)
  for k, v in pairs(own) do
    reply[2][#reply[2] + 1] = k
    reply[2][#reply[2] + 1] = fmt(v)
  end
end
return reply

--@@ select
-- ARGV[4] id ('' = all), 5 visible_to, 6 agent, 7 exclude agent, 8 region, 9 types ('' = all, else joined by \31)
expire(NOW)
local only, viewer, agent, exclude, region, types = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local wanted = nil
if types ~= '' then
  wanted = {}
  for t in string.gmatch(types, '([^\31]+)') do wanted[t] = true end
end
local pairs_ = stored(only)
local out = {}
for k = 1, #pairs_, 2 do
  local r = decode(pairs_[k + 1])
  if (viewer == '' or visible_to(r, viewer)) and (agent == '' or r.agent == agent) and
      (exclude == '' or r.agent ~= exclude) and (region == '' or r.region == region) and
      (wanted == nil or wanted[r.type]) then
    out[#out + 1] = pairs_[k]
    out[#out + 1] = pairs_[k + 1]
    out[#out + 1] = fmt(value(r, NOW))
    out[#out + 1] = fmt(r.expiry)
  end
end
out[#out + 1] = fmt(NOW)
return out

--@@ rescale
-- ARGV[4] factor, 5 id ('' = by region/type), 6 region, 7 type; returns changed signals as select does
expire(NOW)
local factor, only, region, kind_of = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local pairs_ = stored(only)
local out, sig, exp = {}, {}, {}
for k = 1, #pairs_, 2 do
  local id, r = pairs_[k], decode(pairs_[k + 1])
  if (region == '' or r.region == region) and (kind_of == '' or r.type == kind_of) then
    local new = r.I * factor
    if new > 1 then new = 1 elseif new < -1 then new = -1 end
    if new ~= r.I then
      if summed(r) then acc_add(r, landmark(r, new) - landmark(r, r.I), 0) end
      r.I, r.own = new, '1'  -- its batch's order no longer holds for it
      r.expiry = r.t0 + lifetime(new, r.kind, r.param)
      local raw = encode(r)
      local j = #sig
      sig[j + 1], sig[j + 2] = id, raw
      exp[j + 1], exp[j + 2] = r.expiry, id
      out[#out + 1] = id
      out[#out + 1] = raw
      out[#out + 1] = fmt(value(r, NOW))
      out[#out + 1] = fmt(r.expiry)
    end
  end
end
acc_flush()
call_chunked('HSET', K_SIG, sig, 2)
call_chunked('ZADD', K_EXP, exp, 2)
expire(NOW)  -- a signal rescaled under the threshold goes now
touch()
out[#out + 1] = fmt(NOW)
return out

--@@ remove
-- ARGV[4] agent ('' = any), ARGV[5] region ('' = any)
expire(NOW)
local agent, region = ARGV[4], ARGV[5]
local flat = redis.call('HGETALL', K_SIG)
local ids, records = {}, {}
for k = 1, #flat, 2 do
  local r = decode(flat[k + 1])
  if (agent == '' or r.agent == agent) and (region == '' or r.region == region) then
    ids[#ids + 1], records[#records + 1] = flat[k], r
  end
end
return forget(ids, records)

--@@ evaporate
expire(NOW)
local count = tonumber(redis.call('GET', K_EVAP) or '0')
redis.call('SET', K_EVAP, '0')
touch()
return count

--@@ now
return fmt(NOW)
