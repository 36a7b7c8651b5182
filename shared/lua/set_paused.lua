-- Pause or resume a project: runs in flight finish, no new one starts until it is resumed.
--
-- KEYS: [1] the project's pause switch (named by the key functions as well)
-- ARGV: [1] project, [2] 1 to pause, 0 to resume
-- Returns: {DONE}
--- @include "fair_share"

local project = ARGV[1]
if ARGV[2] == '1' then pause_project(project) else resume_project(project) end
return {DONE}
