-- What a job names: a group id of this project, else the project's group of that name, created if
-- there is none; but first, that the keys the job needs (its uploads) exist, else nothing changes.
--
-- KEYS: the job's uploads' records (distinct): each must exist
-- ARGV: [1] group id or name, [2] project, [3] the id for the group if it is new, [4] now
-- Returns: {DONE, group id, group name}, or {MISSING, {1-based positions in KEYS}}
--- @include "groups"

local missing = missing_keys()
if #missing > 0 then return {MISSING, missing} end
mark_uploads_used(ARGV[4])
local g = redis.call('HMGET', group_key(ARGV[1]), 'project', 'name')
if g[1] == ARGV[2] then return {DONE, ARGV[1], g[2]} end
return {DONE, group_by_name(ARGV[2], ARGV[1], ARGV[3], ARGV[4]), ARGV[1]}
