-- Trim from a stream what every one of its consumer groups is done with: the entries before the
-- oldest one a group has not acknowledged and not after the last one it was handed. Never an entry
-- some group has not read, nor one read and not acknowledged (a dead consumer's, waiting to be
-- claimed). Whole stream nodes only (MINID ~): cheap, and what is left is trimmed by a later call.
--
-- KEYS: [1] the stream
-- ARGV: none
-- Returns: {DONE, the number of entries trimmed}

local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function earlier(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
if redis.call('EXISTS', KEYS[1]) == 0 then return {DONE, 0} end
local floor = nil
for _, flat in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local group = {}
  for i = 1, #flat, 2 do group[flat[i]] = flat[i + 1] end
  local bound = group['last-delivered-id']
  local pending = redis.call('XPENDING', KEYS[1], group.name)
  if pending[1] > 0 and earlier(pending[2], bound) then bound = pending[2] end
  if not floor or earlier(bound, floor) then floor = bound end
end
if not floor then return {DONE, 0} end
return {DONE, redis.call('XTRIM', KEYS[1], 'MINID', '~', floor)}
