-- The project's group of that name, created if there is none (POST /api/groups).
--
-- KEYS: none (the project's groups hash is derived from ARGV[3])
-- ARGV: [1] name, [2] the id for the group if it is new, [3] project, [4] now
-- Returns: {DONE, group id} if it was created now, else {REFUSED, the existing group's id}
--- @include "groups"

local group_id = group_by_name(ARGV[3], ARGV[1], ARGV[2], ARGV[4])
return {group_id == ARGV[2] and DONE or REFUSED, group_id}
