-- stigmergy field scripts for Redis. Each script is this prelude plus one body.
--
-- KEYS (all share one hash tag, so they live in one cluster slot):
--   1 sig     hash  id -> record: "I|t0|expiry|kind|param|" .. cjson([agent, type, target, region, meta])
--   2 exp     zset  id -> expiry (every signal; retired when expiry <= now)
--   3 acc     hash  scope \31 type \31 agent \31 region -> "S|t|n|rate" (decayed sums of 'e' and 's' signals)
--   4 gen     set   ids of signals evaluated one by one ('l' linear, 'x' own-rate exponential)
--   5 seq     string  id counter
--   6 evap    string  signals retired since the last evaporate()
--   7 types   set   signal types seen
--   8 agents  set   agents seen (depositors and targets)
-- ARGV[1] = now ('' = the server's TIME), ARGV[2] = evaporation threshold, ARGV[3] = idle TTL (s).
-- Kinds: e = exponential (param: rate), s = step (param: ttl), l = linear (param: rate per s),
--        x = exponential with its own rate, not summed (stochastic decay draws one per signal).
-- Scopes: 0 any signal, 1 untargeted, 2 untargeted from agent, 3 targeted at agent (by another).

local K_SIG, K_EXP, K_ACC, K_GEN, K_SEQ, K_EVAP, K_TYPES, K_AGENTS =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]

local function clock()
  if ARGV[1] ~= '' then return tonumber(ARGV[1]) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

local NOW = clock()
local THRESHOLD = tonumber(ARGV[2])
local IDLE_TTL = tonumber(ARGV[3])
local SEP = '\31'

local function fmt(x) return string.format('%.17g', x) end

local function decode(raw)
  local I, t0, expiry, kind, param, rest = string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)|([^|]*)|(.*)$')
  local names = cjson.decode(rest)
  return {I = tonumber(I), t0 = tonumber(t0), expiry = tonumber(expiry), kind = kind, param = tonumber(param),
          agent = names[1], type = names[2], target = names[3], region = names[4], meta = names[5]}
end

local function encode(r)
  return fmt(r.I) .. '|' .. fmt(r.t0) .. '|' .. fmt(r.expiry) .. '|' .. r.kind .. '|' .. fmt(r.param) .. '|' ..
    cjson.encode({r.agent, r.type, r.target, r.region, r.meta})
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

local function acc_fields(r)
  local fields = {}
  local regions = {''}
  if r.region ~= '' then regions[2] = r.region end
  for _, region in ipairs(regions) do
    fields[#fields + 1] = '0' .. SEP .. r.type .. SEP .. SEP .. region
    if r.target == '' then
      fields[#fields + 1] = '1' .. SEP .. r.type .. SEP .. SEP .. region
      fields[#fields + 1] = '2' .. SEP .. r.type .. SEP .. r.agent .. SEP .. region
    elseif r.target ~= r.agent then
      fields[#fields + 1] = '3' .. SEP .. r.type .. SEP .. r.target .. SEP .. region
    end
  end
  return fields
end

local function acc_read(raw, now)
  local S, t, n, rate = string.match(raw, '^([^|]*)|([^|]*)|([^|]*)|([^|]*)$')
  return tonumber(S) * math.exp(-tonumber(rate) * (now - tonumber(t))), tonumber(n)
end

-- Add delta (decayed to now) to every sum the signal belongs to; dn changes the member count.
local function acc_add(r, delta, dn, now)
  local rate = rate_of(r)
  for _, field in ipairs(acc_fields(r)) do
    local raw = redis.call('HGET', K_ACC, field)
    local S, n = 0, 0
    if raw then S, n = acc_read(raw, now) end
    S, n = S + delta, n + dn
    if n <= 0 then
      redis.call('HDEL', K_ACC, field)
    else
      redis.call('HSET', K_ACC, field, fmt(S) .. '|' .. fmt(now) .. '|' .. n .. '|' .. fmt(rate))
    end
  end
end

local function forget(id, r, now, live)
  if live and summed(r) then acc_add(r, -value(r, now), -1, now) end
  redis.call('HDEL', K_SIG, id)
  redis.call('ZREM', K_EXP, id)
  if not summed(r) then redis.call('SREM', K_GEN, id) end
end

-- Retire every signal whose evaporation time has come: readings never include them.
local function expire(now)
  local due = redis.call('ZRANGEBYSCORE', K_EXP, '-inf', fmt(now))
  local retired = 0
  for _, id in ipairs(due) do
    local raw = redis.call('HGET', K_SIG, id)
    if raw then
      forget(id, decode(raw), now, true)
      retired = retired + 1
    else
      redis.call('ZREM', K_EXP, id)
    end
  end
  if retired > 0 then redis.call('INCRBY', K_EVAP, retired) end
end

local function touch()
  for i = 1, 8 do redis.call('EXPIRE', KEYS[i], IDLE_TTL) end
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
    for _, t in ipairs(redis.call('SMEMBERS', K_TYPES)) do w[t] = 1.0 end
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

local function generic_records()
  local out = {}
  for _, id in ipairs(redis.call('SMEMBERS', K_GEN)) do
    local raw = redis.call('HGET', K_SIG, id)
    if raw then out[#out + 1] = decode(raw) end
  end
  return out
end

--@@ deposit
-- ARGV[4..]: records of 8: agent, type, intensity, target, region, meta-json, kind, param (8 fields)
expire(NOW)
local ids = {fmt(NOW)}
local i = 4
while i <= #ARGV do
  local r = {agent = ARGV[i], type = ARGV[i + 1], I = tonumber(ARGV[i + 2]), target = ARGV[i + 3],
             region = ARGV[i + 4], meta = ARGV[i + 5], kind = ARGV[i + 6], param = tonumber(ARGV[i + 7]),
             t0 = NOW}
  r.expiry = NOW + lifetime(r)
  local id = tostring(redis.call('INCR', K_SEQ))
  redis.call('HSET', K_SIG, id, encode(r))
  redis.call('ZADD', K_EXP, fmt(r.expiry), id)
  if summed(r) then acc_add(r, r.I, 1, NOW) else redis.call('SADD', K_GEN, id) end
  redis.call('SADD', K_TYPES, r.type)
  redis.call('SADD', K_AGENTS, r.agent)
  if r.target ~= '' then redis.call('SADD', K_AGENTS, r.target) end
  ids[#ids + 1] = id
  i = i + 8
end
touch()
return ids

--@@ pressure
-- ARGV[4] agent ('' with ARGV[5] = '0' means nobody: every signal), ARGV[6] region, ARGV[7..] weights
expire(NOW)
local agent, anyone, region = ARGV[4], ARGV[5] == '0', ARGV[6]
local w = weights_from(7)
local total = 0
for t, weight in pairs(w) do
  if weight ~= 0 then
    local parts
    if anyone then
      parts = {{'0' .. SEP .. t .. SEP .. SEP .. region, 1}}
    else
      parts = {{'1' .. SEP .. t .. SEP .. SEP .. region, 1}, {'2' .. SEP .. t .. SEP .. agent .. SEP .. region, -1},
               {'3' .. SEP .. t .. SEP .. agent .. SEP .. region, 1}}
    end
    for _, part in ipairs(parts) do
      local raw = redis.call('HGET', K_ACC, part[1])
      if raw then
        local S = acc_read(raw, NOW)
        total = total + part[2] * weight * S
      end
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
-- ARGV[4] region, ARGV[5..] weights, then the agents asked for (none: every agent seen)
expire(NOW)
local region = ARGV[4]
local w, i = weights_from(5)
local names = {}
for k = i, #ARGV do names[#names + 1] = ARGV[k] end
if #names == 0 then names = redis.call('SMEMBERS', K_AGENTS) end
local public, own = 0, {}
local flat = redis.call('HGETALL', K_ACC)
for k = 1, #flat, 2 do
  local scope, t, who, where = string.match(flat[k], '^(%d)\31([^\31]*)\31([^\31]*)\31(.*)$')
  local weight = w[t]
  if weight and weight ~= 0 and where == region and scope ~= '0' then
    local S = acc_read(flat[k + 1], NOW) * weight
    if scope == '1' then
      public = public + S
    elseif scope == '2' then
      own[who] = (own[who] or 0) - S
    else
      own[who] = (own[who] or 0) + S
    end
  end
end
for _, r in ipairs(generic_records()) do
  local weight = w[r.type]
  if weight and weight ~= 0 and (region == '' or r.region == region) then
    local v = weight * value(r, NOW)
    if r.target == '' then
      public = public + v
      own[r.agent] = (own[r.agent] or 0) - v
    elseif r.target ~= r.agent then
      own[r.target] = (own[r.target] or 0) + v
    end
  end
end
local out = {}
for _, name in ipairs(names) do
  out[#out + 1] = name
  out[#out + 1] = fmt(public + (own[name] or 0))
end
return out

--@@ select
-- ARGV[4] id ('' = all), 5 visible_to, 6 agent, 7 exclude agent, 8 region, 9 types ('' = all, else joined by \31)
expire(NOW)
local only, viewer, agent, exclude, region, types = ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9]
local wanted = nil
if types ~= '' then
  wanted = {}
  for t in string.gmatch(types, '([^\31]+)') do wanted[t] = true end
end
local pairs_ = {}
if only ~= '' then
  local raw = redis.call('HGET', K_SIG, only)
  if raw then pairs_ = {only, raw} end
else
  pairs_ = redis.call('HGETALL', K_SIG)
end
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
local pairs_ = {}
if only ~= '' then
  local raw = redis.call('HGET', K_SIG, only)
  if raw then pairs_ = {only, raw} end
else
  pairs_ = redis.call('HGETALL', K_SIG)
end
local out = {}
for k = 1, #pairs_, 2 do
  local id, r = pairs_[k], decode(pairs_[k + 1])
  if (region == '' or r.region == region) and (kind_of == '' or r.type == kind_of) then
    local new = r.I * factor
    if new > 1 then new = 1 elseif new < -1 then new = -1 end
    if new ~= r.I then
      if summed(r) then acc_add(r, (new - r.I) * math.exp(-rate_of(r) * (NOW - r.t0)), 0, NOW) end
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
expire(NOW)  -- a signal rescaled under the threshold goes now
touch()
out[#out + 1] = fmt(NOW)
return out

--@@ remove
-- ARGV[4] agent ('' = any), ARGV[5] region ('' = any)
expire(NOW)
local agent, region = ARGV[4], ARGV[5]
local flat = redis.call('HGETALL', K_SIG)
local removed = 0
for k = 1, #flat, 2 do
  local r = decode(flat[k + 1])
  if (agent == '' or r.agent == agent) and (region == '' or r.region == region) then
    forget(flat[k], r, NOW, true)
    removed = removed + 1
  end
end
return removed

--@@ evaporate
expire(NOW)
local count = tonumber(redis.call('GET', K_EVAP) or '0')
redis.call('SET', K_EVAP, '0')
touch()
return count

--@@ now
return fmt(NOW)
