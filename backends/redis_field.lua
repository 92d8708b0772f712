-- stigmergy field scripts for Redis. Each script is this prelude plus one body.
--
-- KEYS (all share one hash tag, so they live in one cluster slot):
--   1 sig     hash  id -> "I|t0|expiry|kind|param|" .. cjson([agent, type, target, region, meta])
--   2 exp     zset  id -> expiry (every signal; retired when expiry <= now)
--   3 acc     hash  scope \31 type \31 agent \31 region -> A, a sum of 'e' and 's' signals in landmark form
--   4 count   hash  same fields -> how many live signals the sum holds (at 0 the sum is dropped)
--   5 gen     set   ids of signals evaluated one by one ('l' linear, 'x' own-rate exponential)
--   6 seq     string  id counter
--   7 evap    string  signals retired since the last evaporate()
--   8 types   hash  type -> "rate|epoch": the decay rate of its sums and their landmark time
--   9 agents  set   agents seen (depositors and targets)
-- ARGV[1] = now ('' = the server's TIME), ARGV[2] = evaporation threshold, ARGV[3] = idle TTL (s).
--
-- Landmark form: a sum of type t is stored as A = sum of I_i * e^(rate * (t_i - epoch_t)), so it is
-- worth A * e^(-rate * (now - epoch_t)) now. A deposit adds a constant, a retirement subtracts the
-- very same constant, a reading multiplies once per type: no per-sum exponentials, no parsing.
-- Before e^(rate * (now - epoch)) grows past e^REBASE, every sum of the type is rescaled to epoch = now.
-- Kinds: e = exponential (param: rate), s = step (param: ttl), l = linear (param: rate per s),
--        x = exponential with its own rate, not summed (stochastic decay draws one per signal).
-- Scopes: 0 any signal, 1 untargeted, 2 untargeted from agent, 3 targeted at agent (by another).

local K_SIG, K_EXP, K_ACC, K_COUNT, K_GEN, K_SEQ, K_EVAP, K_TYPES, K_AGENTS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9]

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

local function decode(raw)
  local I, t0, expiry, kind, param, rest = string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  local names = cjson.decode(rest)
  return {I = tonumber(I), t0 = tonumber(t0), expiry = tonumber(expiry), kind = kind, param = tonumber(param),
          agent = names[1], type = names[2], target = names[3], region = names[4], meta = names[5]}
end

local function encode(r)
  local names = r.names or cjson.encode({r.agent, r.type, r.target, r.region, r.meta})
  return string.format('%.17g|%.17g|%.17g|%s|%.17g|%s', r.I, r.t0, r.expiry, r.kind, r.param, names)
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

-- Age at which |value| falls under the threshold.
local function lifetime(r)
  local m = math.abs(r.I)
  if m < THRESHOLD then return 0 end
  if r.kind == 's' then return r.param end
  if r.kind == 'l' then return (m - THRESHOLD) / r.param end
  return math.log(m / THRESHOLD) / r.param
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
    local flat = redis.call('HGETALL', K_ACC)
    for k = 1, #flat, 2 do
      if string.match(flat[k], '^%d\31([^\31]*)\31') == t then
        redis.call('HSET', K_ACC, flat[k], fmt(tonumber(flat[k + 1]) * factor))
      end
    end
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

local function acc_field(scope, signal_type, agent, region)
  return scope .. '\31' .. signal_type .. '\31' .. agent .. '\31' .. region  -- cheaper than format
end

local function acc_fields(r)
  local fields = {}
  local regions = {''}
  if r.region ~= '' then regions[2] = r.region end
  for _, region in ipairs(regions) do
    fields[#fields + 1] = acc_field('0', r.type, '', region)
    if r.target == '' then
      fields[#fields + 1] = acc_field('1', r.type, '', region)
      fields[#fields + 1] = acc_field('2', r.type, r.agent, region)
    elseif r.target ~= r.agent then
      fields[#fields + 1] = acc_field('3', r.type, r.target, region)
    end
  end
  return fields
end

-- One command per chunk of arguments: Lua's unpack() has a stack limit.
local function call_chunked(command, key, args, width)
  local chunk = 4000 - 4000 % width
  for start = 1, #args, chunk do
    redis.call(command, key, unpack(args, start, math.min(start + chunk - 1, #args)))
  end
end

local function hmget(key, fields)
  local out = {}
  for start = 1, #fields, 4000 do
    local got = redis.call('HMGET', key, unpack(fields, start, math.min(start + 3999, #fields)))
    for _, v in ipairs(got) do out[#out + 1] = v end
  end
  return out
end

-- Changes to sums are gathered per field and written once per script, a few commands in all,
-- however many signals a batch deposits, retires or rescales.
local CHANGES = {order = {}, amount = {}, count = {}}

-- Add amount (landmark form) to every sum of the signal; dn changes how many signals each holds.
local function acc_add(r, amount, dn)
  for _, field in ipairs(acc_fields(r)) do
    if CHANGES.amount[field] == nil then
      CHANGES.amount[field], CHANGES.count[field] = 0, 0
      CHANGES.order[#CHANGES.order + 1] = field
    end
    CHANGES.amount[field] = CHANGES.amount[field] + amount
    CHANGES.count[field] = CHANGES.count[field] + dn
  end
end

-- Write the gathered changes; a sum left with no signal is deleted (no rounding residue stays).
local function acc_flush()
  local fields = CHANGES.order
  if #fields == 0 then return end
  local sums, counts = hmget(K_ACC, fields), hmget(K_COUNT, fields)
  local set_sums, set_counts, gone = {}, {}, {}
  for k, field in ipairs(fields) do
    local n = (tonumber(counts[k]) or 0) + CHANGES.count[field]
    if n <= 0 then
      gone[#gone + 1] = field
    else
      set_counts[#set_counts + 1], set_counts[#set_counts + 2] = field, n
      set_sums[#set_sums + 1] = field
      set_sums[#set_sums + 1] = fmt((tonumber(sums[k]) or 0) + CHANGES.amount[field])
    end
  end
  call_chunked('HSET', K_ACC, set_sums, 2)
  call_chunked('HSET', K_COUNT, set_counts, 2)
  call_chunked('HDEL', K_ACC, gone, 1)
  call_chunked('HDEL', K_COUNT, gone, 1)
  CHANGES = {order = {}, amount = {}, count = {}}
end

-- The values of many fields of the acc hash, in order (0 where absent).
local function acc_values(fields)
  local out = {}
  for start = 1, #fields, 4000 do
    local got = redis.call('HMGET', K_ACC, unpack(fields, start, math.min(start + 3999, #fields)))
    for _, v in ipairs(got) do out[#out + 1] = tonumber(v) or 0 end
  end
  return out
end

-- Delete signals (ids with their records; false records are ids already gone) and take them out
-- of their sums. Returns how many existed.
local function forget(ids, raws)
  local existing, generic = {}, {}
  for k, id in ipairs(ids) do
    if raws[k] then
      local r = decode(raws[k])
      existing[#existing + 1] = id
      if summed(r) then acc_add(r, -landmark(r, r.I), -1) else generic[#generic + 1] = id end
    end
  end
  acc_flush()
  call_chunked('HDEL', K_SIG, existing, 1)
  call_chunked('ZREM', K_EXP, ids, 1)
  call_chunked('SREM', K_GEN, generic, 1)
  return #existing
end

-- Retire every signal whose evaporation time has come: readings never include them.
local function expire(now)
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', fmt(now))
  if #due == 0 then return end
  local retired = forget(due, hmget(K_SIG, due))
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

--@@ deposit
-- ARGV[4]: JSON array of records [agent, type, intensity, target, region, kind, param, names-json],
-- names-json being the record's cjson part, [agent, type, target, region, meta-json], made by the client.
-- Sums are updated once per distinct accumulator, however many signals of the batch it takes.
expire(NOW)
local records = cjson.decode(ARGV[4])
local first = redis.call('INCRBY', K_SEQ, #records) - #records + 1
local sig, exp, gen, agents, seen, checked = {}, {}, {}, {}, {}, {}
for k, rec in ipairs(records) do
  local r = {agent = rec[1], type = rec[2], I = rec[3], target = rec[4], region = rec[5], kind = rec[6],
             param = rec[7], names = rec[8], t0 = NOW}
  r.expiry = NOW + lifetime(r)
  local id = tostring(first + k - 1)
  sig[#sig + 1] = id
  sig[#sig + 1] = encode(r)
  exp[#exp + 1] = fmt(r.expiry)
  exp[#exp + 1] = id
  if not checked[r.type] then
    register_type(r.type, summed(r) and rate_of(r) or 0)
    scale(r.type)  -- rebase first if due, so the landmark constant stays small
    checked[r.type] = true
  end
  if summed(r) then
    acc_add(r, landmark(r, r.I), 1)
  else
    gen[#gen + 1] = id
  end
  for _, name in ipairs({r.agent, r.target}) do
    if name ~= '' and not seen[name] then
      seen[name] = true
      agents[#agents + 1] = name
    end
  end
end
acc_flush()
call_chunked('HSET', K_SIG, sig, 2)
call_chunked('ZADD', K_EXP, exp, 2)
call_chunked('SADD', K_GEN, gen, 1)
call_chunked('SADD', K_AGENTS, agents, 1)
touch()
return {fmt(NOW), tostring(first), tostring(#records)}

--@@ pressure
-- ARGV[4] agent ('' with ARGV[5] = '0' means nobody: every signal), ARGV[6] region, ARGV[7..] weights
expire(NOW)
local agent, anyone, region = ARGV[4], ARGV[5] == '0', ARGV[6]
local w = weights_from(7)
local total = 0
for t, weight in pairs(w) do
  local unit = scale(t)
  if weight ~= 0 and unit ~= nil then
    if anyone then
      local v = acc_values({acc_field('0', t, '', region)})
      total = total + weight * unit * v[1]
    else
      local v = acc_values({acc_field('1', t, '', region), acc_field('2', t, agent, region),
                            acc_field('3', t, agent, region)})
      total = total + weight * unit * (v[1] - v[2] + v[3])
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
return fmt(total)

--@@ pressures
-- ARGV[4] region, ARGV[5..] weights, then the agents asked for (none: every agent seen).
-- One HMGET per type for every agent's sums: cost in proportion to the agents asked about.
expire(NOW)
local region = ARGV[4]
local w, i = weights_from(5)
local names = {}
for k = i, #ARGV do names[#names + 1] = ARGV[k] end
if #names == 0 then names = redis.call('SMEMBERS', K_AGENTS) end
local public, own = 0, {}
for k = 1, #names do own[k] = 0 end
for t, weight in pairs(w) do
  local unit = scale(t)
  if weight ~= 0 and unit ~= nil then
    local fields = {acc_field('1', t, '', region)}
    for _, name in ipairs(names) do
      fields[#fields + 1] = acc_field('2', t, name, region)
      fields[#fields + 1] = acc_field('3', t, name, region)
    end
    local v = acc_values(fields)
    local f = weight * unit
    public = public + f * v[1]
    for k = 1, #names do own[k] = own[k] + f * (v[2 * k + 1] - v[2 * k]) end
  end
end
local index = {}
for k, name in ipairs(names) do index[name] = k end
for _, r in ipairs(generic_records()) do
  local weight = w[r.type]
  if weight and weight ~= 0 and (region == '' or r.region == region) then
    local v = weight * value(r, NOW)
    if r.target == '' then
      public = public + v
      if index[r.agent] then own[index[r.agent]] = own[index[r.agent]] - v end
    elseif r.target ~= r.agent and index[r.target] then
      own[index[r.target]] = own[index[r.target]] + v
    end
  end
end
local values = {}
for k = 1, #names do values[k] = public + own[k] end
-- One string, far cheaper to parse than 2n replies; cjson keeps 14 significant digits.
return cjson.encode({names, values})

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
  end
end
out[#out + 1] = fmt(NOW)
return out

--@@ rescale
-- ARGV[4] factor, 5 id ('' = by region/type), 6 region, 7 type; returns changed signals as select does
expire(NOW)
local factor, only, region, kind_of = tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7]
local pairs_ = stored(only)
local out = {}
for k = 1, #pairs_, 2 do
  local id, r = pairs_[k], decode(pairs_[k + 1])
  if (region == '' or r.region == region) and (kind_of == '' or r.type == kind_of) then
    local new = r.I * factor
    if new > 1 then new = 1 elseif new < -1 then new = -1 end
    if new ~= r.I then
      if summed(r) then acc_add(r, landmark(r, new) - landmark(r, r.I), 0) end
      r.I = new
      r.expiry = r.t0 + lifetime(r)
      local raw = encode(r)
      redis.call('HSET', K_SIG, id, raw)
      redis.call('ZADD', K_EXP, fmt(r.expiry), id)
      out[#out + 1] = id
      out[#out + 1] = raw
      out[#out + 1] = fmt(value(r, NOW))
    end
  end
end
acc_flush()
expire(NOW)  -- a signal rescaled under the threshold goes now
touch()
out[#out + 1] = fmt(NOW)
return out

--@@ remove
-- ARGV[4] agent ('' = any), ARGV[5] region ('' = any)
expire(NOW)
local agent, region = ARGV[4], ARGV[5]
local flat = redis.call('HGETALL', K_SIG)
local ids, raws = {}, {}
for k = 1, #flat, 2 do
  local r = decode(flat[k + 1])
  if (agent == '' or r.agent == agent) and (region == '' or r.region == region) then
    ids[#ids + 1], raws[#raws + 1] = flat[k], flat[k + 1]
  end
end
return forget(ids, raws)

--@@ evaporate
expire(NOW)
local count = tonumber(redis.call('GET', K_EVAP) or '0')
redis.call('SET', K_EVAP, '0')
touch()
return count

--@@ now
return fmt(NOW)
