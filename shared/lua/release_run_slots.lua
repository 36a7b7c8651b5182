-- Release the slots a settled run still holds: drop its in-flight entries (left behind by a script
-- that settled the run) and wake its project, which may have waited for one of them.
--
-- KEYS: none (the run's entries are derived from ARGV)
-- ARGV: [1] run_id, [2] project
-- Returns: {DONE}
--- @include "fair_share"

leave_running(ARGV[1], ARGV[2])
return {DONE}
