-- A status view's queue figures in one round trip, read at one instant, and with them the job's
-- FIELDS (a list the loader writes in front of this script). Under fair share a job waits only for
-- its own project's work, so every figure is the project's, and each costs O(log n) at most: its
-- jobs ahead (a rank), counted only while the job has no run started, and the runs ahead of it: the
-- project's runs in flight and due retries, plus its jobs ahead at the average runs left per queued
-- job (from the count of runs waiting the scripts keep). The project's share of the capacity is its
-- weight over the weight of every project with work. Runs are counted only when an average run
-- time exists: without one there is no ETA to compute.
--
-- KEYS: [1] the job's hash
-- ARGV: [1] job_id
-- Returns: {DONE, {the FIELDS' values}, its queue score or nil, jobs ahead, runs ahead, average run
--          seconds or nil, the project's share of the capacity (0 to 1) as a string}
--- @include "fair_share"

local job_id = ARGV[1]
local key = KEYS[1]
local record = {}
if #FIELDS > 0 then record = redis.call('HMGET', key, unpack(FIELDS)) end
local j = redis.call('HMGET', key, 'project', 'status', 'runs_started')
if not LIVE[j[2]] then return {DONE, record, false, 0, 0, false, '1'} end
local project = j[1]
local queue = project_queue(project)
local score = redis.call('ZSCORE', queue, job_id)
local avg = redis.call('HGET', RUN_SECONDS, 'avg')
local ahead, runs = 0, 0
if score and tonumber(j[3] or '0') == 0 then
  ahead = redis.call('ZCOUNT', queue, '-inf', '(' .. score)
  if avg then
    runs = redis.call('ZCARD', project_running(project)) + redis.call('ZCARD', project_retries(project))
    local waiting = tonumber(redis.call('GET', project_runs_waiting(project)) or '0')
    runs = runs + math.floor(ahead * waiting / redis.call('ZCARD', queue) + 0.5)
  end
end
local w = weight(project)
local share = w / math.max(w, tonumber(redis.call('GET', BACKLOG_WEIGHT) or '0'))
return {DONE, record, score, ahead, runs, avg, tostring(share)}
