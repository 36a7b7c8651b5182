-- What every export script shares: the export's status event on the project's event stream.

local EXPORT_FINAL = {completed = true, failed = true, canceled = true}

-- An entry of the events stream about export `export_id` (its hash `key`), for the project's SSE streams.
local function emit_export(key, export_id)
  local e = redis.call('HMGET', key, 'project', 'status', 'objects_total', 'objects_copied', 'objects_skipped',
                       'objects_failed', 'bytes_copied')
  local copied, skipped, failed = tonumber(e[4] or '0'), tonumber(e[5] or '0'), tonumber(e[6] or '0')
  redis.call('XADD', EVENTS, 'MAXLEN', '~', 100000, '*', 'type', 'export', 'export_id', export_id,
             'project', e[1] or '', 'status', e[2] or '', 'objects_total', e[3] or '',
             'objects_done', copied + skipped + failed, 'objects_copied', copied, 'objects_skipped', skipped,
             'objects_failed', failed, 'bytes_copied', e[7] or '0')
end
