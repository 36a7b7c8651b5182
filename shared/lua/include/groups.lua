-- Positions (1-based) of the KEYS that do not exist: a job's uploads must, before anything is written.
local function missing_keys()
  local found = 0
  for i = 1, #KEYS, 1000 do  -- in slices: unpack() is limited to a few thousand values
    found = found + redis.call('EXISTS', unpack(KEYS, i, math.min(i + 999, #KEYS)))
  end
  local missing = {}
  if found < #KEYS then  -- KEYS are distinct, so EXISTS counted each once
    for i = 1, #KEYS do
      if redis.call('EXISTS', KEYS[i]) == 0 then missing[#missing + 1] = i end
    end
  end
  return missing
end

-- The uploads a new job names (KEYS, their record keys) were used now: retention keeps them.
local function mark_uploads_used(now)
  local args = {}
  for i = 1, #KEYS do
    local upload_id = string.match(KEYS[i], ':upload:([^:]+)$')
    if upload_id then
      args[#args + 1] = now
      args[#args + 1] = upload_id
    end
    if #args >= 1000 or (i == #KEYS and #args > 0) then
      redis.call('ZADD', UPLOADS_BY_USE, 'GT', unpack(args))
      args = {}
    end
  end
end

-- The id of the project's group of that name, created if there is none. Atomic, so two jobs naming
-- a new group at once end up in one group, and no name ever maps to an id whose hash is not written.
local function group_by_name(project, name, new_id, now)
  local existing = redis.call('HGET', project_groups(project), name)
  if existing then return existing end
  redis.call('HSET', project_groups(project), name, new_id)
  redis.call('HSET', group_key(new_id), 'id', new_id, 'name', name, 'project', project, 'created_at', now)
  return new_id
end
