-- A job's status and what moves with it: counts, quotas, live events, notifications.

-- The operator's bound on a project's images in queued and processing jobs: nil while `more` fits,
-- else {OVER_QUOTA, 'images', seconds to retry after (one run's time: a finished run makes room), images now}.
local function over_images_quota(project, more, quota)
  if quota <= 0 then return nil end
  local live = tonumber(redis.call('GET', project_live_images(project)) or '0')
  if live + more <= quota then return nil end
  local retry_after = math.ceil(tonumber(redis.call('HGET', RUN_SECONDS, 'avg') or '30'))
  return {OVER_QUOTA, 'images', retry_after, live}
end

-- An event for live views (SSE), bounded in length.
local function emit(job_id, kind)
  local j = redis.call('HMGET', job_key(job_id), 'project', 'status', 'images_total', 'images_succeeded',
                       'images_failed', 'runs_total', 'runs_done')
  redis.call('XADD', EVENTS, 'MAXLEN', '~', 100000, '*', 'job_id', job_id, 'type', kind,
             'project', j[1] or '', 'status', j[2] or '', 'images_total', j[3] or '0',
             'images_succeeded', j[4] or '0', 'images_failed', j[5] or '0',
             'runs_total', j[6] or '0', 'runs_done', j[7] or '0')
end

-- A job completed after `seconds`: the project's hourly figures count it, so its metrics read
-- a few fields an hour, never the jobs themselves.
local function count_completion(project, seconds, now)
  local hourly, hour = project_hourly(project), math.floor(now / 3600)
  redis.call('HINCRBY', hourly, hour .. ':jobs', 1)
  redis.call('HINCRBYFLOAT', hourly, hour .. ':seconds', seconds)
  local low = tonumber(redis.call('HGET', hourly, hour .. ':min_seconds') or '')
  if not low or seconds < low then redis.call('HSET', hourly, hour .. ':min_seconds', seconds) end
  local high = tonumber(redis.call('HGET', hourly, hour .. ':max_seconds') or '')
  if not high or seconds > high then redis.call('HSET', hourly, hour .. ':max_seconds', seconds) end
end

-- The one way a job's status changes: keeps the per-project and global counts, the live-images
-- quota, the live and failed indexes and the user-webhook notifications in step with it.
local function set_status(job_id, new, now)
  local key = job_key(job_id)
  local j = redis.call('HMGET', key, 'status', 'project', 'webhook_url', 'redo_images', 'images_total', 'created_at')
  if j[1] == new then return end
  if j[1] and not job_may(j[1], new) then error('job ' .. job_id .. ': no transition from ' .. j[1] .. ' to ' .. new) end
  redis.call('HSET', key, 'status', new)
  local counts = project_counts(j[2])
  if j[1] then
    redis.call('HINCRBY', counts, j[1], -1)
    redis.call('HINCRBY', JOB_COUNTS, j[1], -1)
  end
  redis.call('HINCRBY', counts, new, 1)
  redis.call('HINCRBY', JOB_COUNTS, new, 1)
  -- A job counts all its images, a redone one only those redone.
  local quota_images = tonumber(j[4] or j[5] or '0')
  if LIVE[j[1]] and not LIVE[new] then
    redis.call('DECRBY', project_live_images(j[2]), quota_images)
    redis.call('ZREM', project_live_jobs(j[2]), job_id)
  elseif LIVE[new] and not LIVE[j[1]] then
    redis.call('INCRBY', project_live_images(j[2]), quota_images)
    redis.call('ZADD', project_live_jobs(j[2]), tonumber(j[6] or now), job_id)
  end
  if new == 'failed' then
    redis.call('ZADD', project_failed_jobs(j[2]), tonumber(j[6] or now), job_id)
  elseif j[1] == 'failed' then
    redis.call('ZREM', project_failed_jobs(j[2]), job_id)
  end
  if FINAL[new] then
    redis.call('HSET', key, 'completed_at', now)
    if new == 'completed' then count_completion(j[2], now - tonumber(j[6] or now), now) end
    if j[3] and j[3] ~= '' then redis.call('XADD', NOTIFY, '*', 'job_id', job_id) end
  elseif FINAL[j[1]] then
    redis.call('HDEL', key, 'completed_at')
  end
  emit(job_id, 'status')
end

