#!lua name=eventflow
--[[
EventFlow's Redis Function library: every multi-step operation on EventFlow keys, each atomic.

Loaded once by `eventflow bootstrap` (a Helm hook Job; `eventflow up` locally) with FUNCTION LOAD REPLACE.
Services only call eventflow_version at start and refuse to run on a mismatch.
Python calls these only through eventflow/redis/functions.py; every key arrives in KEYS (cluster-safe
argument discipline), built by eventflow/keys.py. Times are Unix milliseconds supplied by the caller
(functions must not depend on the server clock for replication determinism).

Names are global across libraries, so each starts with eventflow_. A change to KEYS or ARGV of a
function means a new name; a change of behaviour means a new LIBRARY_VERSION.
]]

local LIBRARY_VERSION = '7'

-- Append a lifecycle event (flat field list) to the event stream, approximately capped.
-- The event stream is a notification log, not work: capping it loses no job.
local function add_event(stream, maxlen, fields)
  local args = {'XADD', stream, 'MAXLEN', '~', maxlen, '*'}
  for i = 1, #fields do args[#args + 1] = fields[i] end
  return redis.call(unpack(args))
end

-- Pending-list record of one entry: {id, consumer, idle_ms, deliveries} or nil.
local function pending_of(stream, group, entry_id)
  local rows = redis.call('XPENDING', stream, group, 'IDLE', 0, entry_id, entry_id, 1)
  if #rows == 0 then return nil end
  return rows[1]
end

local function tail(argv, from)
  local out = {}
  for i = from, #argv do out[#out + 1] = argv[i] end
  return out
end

--[[ eventflow_version
Purpose: report the library version so services can refuse a mismatch.
KEYS: none.  ARGV: none.
Reply: the version string.
]]
local function version()
  return LIBRARY_VERSION
end

--[[ eventflow_submit_job
Purpose: idempotent admission. Dedupe by request hash (and Idempotency-Key), check the backlog bound,
  XADD the job, record the job state and a `queued` event -- one step, so a retried command whose reply
  was lost finds its own entry instead of adding a second one.
KEYS[1] job stream          KEYS[2] dedupe key (request hash -> job id)
KEYS[3] idempotency key     KEYS[4] job state hash of the new job
KEYS[5] event stream        KEYS[6] epoch key
ARGV[1] consumer group      ARGV[2] max backlog (entries; lag + pending)
ARGV[3] "1" to use KEYS[3]  ARGV[4] new job id      ARGV[5] request hash
ARGV[6] tenant              ARGV[7] now (ms)        ARGV[8] event stream cap (entries)
ARGV[9] idempotency/dedupe TTL (ms, "0" = keep)     ARGV[10..] job entry fields (flat name, value list)
Reply: {job_id, created (1 new / 0 duplicate), entry id or ""}. A retry of the same call (same job id,
  e.g. redis-py resending after a lost reply) answers created=1 with the original entry id, once.
Errors: EPOCH (server wiped or never bootstrapped), NOGROUP (stream/group missing),
  BACKLOG <n> (backlog at or above the bound; nothing written), IDEMCONFLICT <job_id> (key reused for
  another request).
]]
local function submit_job(keys, argv)
  if redis.call('EXISTS', keys[6]) == 0 then
    return redis.error_reply('EPOCH eventflow epoch key missing: server wiped or not bootstrapped')
  end
  local existing = redis.call('GET', keys[2])
  if existing then
    -- The same job id means this is a client retry of a call whose reply was lost: report it as created.
    if existing == argv[4] then return {existing, 1, redis.call('HGET', keys[4], 'entry_id') or ''} end
    return {existing, 0, ''}
  end
  if argv[3] == '1' then
    local idem = redis.call('GET', keys[3])
    if idem then
      local sep = string.find(idem, ' ', 1, true)
      local idem_job, idem_hash = string.sub(idem, 1, sep - 1), string.sub(idem, sep + 1)
      if idem_hash ~= argv[5] then
        return redis.error_reply('IDEMCONFLICT ' .. idem_job)
      end
      return {idem_job, 0, ''}
    end
  end
  if redis.call('EXISTS', keys[1]) == 0 then
    return redis.error_reply('NOGROUP job stream missing')
  end
  local backlog = nil
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    if info['name'] == argv[1] then
      local lag = info['lag']
      -- lag is NULL after an undelivered entry was deleted (facts #7): fall back to the stream length.
      if not lag then lag = redis.call('XLEN', keys[1]) end
      backlog = lag + info['pending']
    end
  end
  if backlog == nil then return redis.error_reply('NOGROUP consumer group missing') end
  if backlog >= tonumber(argv[2]) then
    return redis.error_reply('BACKLOG ' .. backlog)
  end
  local xadd = {'XADD', keys[1], '*'}
  for i = 10, #argv do xadd[#xadd + 1] = argv[i] end
  local entry_id = redis.call(unpack(xadd))
  local ttl = tonumber(argv[9])
  if ttl > 0 then
    redis.call('SET', keys[2], argv[4], 'PX', ttl)
  else
    redis.call('SET', keys[2], argv[4])
  end
  if argv[3] == '1' then
    if ttl > 0 then
      redis.call('SET', keys[3], argv[4] .. ' ' .. argv[5], 'PX', ttl)
    else
      redis.call('SET', keys[3], argv[4] .. ' ' .. argv[5])
    end
  end
  redis.call('HSET', keys[4], 'job_id', argv[4], 'request_hash', argv[5], 'tenant', argv[6],
    'state', 'queued', 'attempts', 0, 'progress', 0, 'entry_id', entry_id,
    'created_at_ms', argv[7], 'updated_at_ms', argv[7])
  add_event(keys[5], argv[8], {'type', 'queued', 'job_id', argv[4], 'request_hash', argv[5],
    'at_ms', argv[7], 'entry_id', entry_id})
  return {argv[4], 1, entry_id}
end

--[[ eventflow_acquire_lease
Purpose: start an attempt. Take the lease (SET NX PX with the caller's random token), take a fencing
  token (INCR), mark the job running and append a `started` event. Refuses a cancelled job, and one
  whose request already has a committed result (an earlier delivery committed, then died before its
  ack): checking here rather than with a separate EXISTS saves a round trip per job.
KEYS[1] lease key   KEYS[2] fencing counter   KEYS[3] job state hash   KEYS[4] event stream   KEYS[5] result
ARGV[1] lease token   ARGV[2] lease TTL (ms)   ARGV[3] now (ms)   ARGV[4] event stream cap
ARGV[5..] extra `started` event fields (flat list)
Reply: fencing token (>= 1) on success; 0 if another worker holds the lease; -1 if the job is cancelled;
  -2 if the result is already committed.
]]
local function acquire_lease(keys, argv)
  if redis.call('EXISTS', keys[5]) == 1 then return -2 end
  if redis.call('HGET', keys[3], 'state') == 'cancelled' then return -1 end
  if not redis.call('SET', keys[1], argv[1], 'NX', 'PX', argv[2]) then return 0 end
  local fence = redis.call('INCR', keys[2])
  local attempts = redis.call('HINCRBY', keys[3], 'attempts', 1)
  redis.call('HSET', keys[3], 'state', 'running', 'updated_at_ms', argv[3], 'started_at_ms', argv[3])
  local fields = {'type', 'started', 'at_ms', argv[3], 'attempt', attempts}
  for _, v in ipairs(tail(argv, 5)) do fields[#fields + 1] = v end
  add_event(keys[4], argv[4], fields)
  return fence
end

--[[ eventflow_renew_lease
Purpose: extend the lease, only by its owner.
KEYS[1] lease key.  ARGV[1] lease token  ARGV[2] TTL (ms)
Reply: 1 renewed, 0 not the owner (the lease expired or was taken: the caller must stop, self-fenced).
]]
local function renew_lease(keys, argv)
  if redis.call('GET', keys[1]) ~= argv[1] then return 0 end
  redis.call('PEXPIRE', keys[1], argv[2])
  return 1
end

--[[ eventflow_release_lease
Purpose: drop the lease, only by its owner.
KEYS[1] lease key.  ARGV[1] lease token
Reply: 1 released, 0 not the owner.
]]
local function release_lease(keys, argv)
  if redis.call('GET', keys[1]) ~= argv[1] then return 0 end
  redis.call('DEL', keys[1])
  return 1
end

--[[ eventflow_commit_result
Purpose: commit a job's result exactly once. Writes only while the caller holds the lease and its
  fencing token is the highest issued, so a paused zombie that wakes up late cannot overwrite a newer
  attempt. Marks the job succeeded and appends a `succeeded` event.
KEYS[1] result hash   KEYS[2] fencing counter   KEYS[3] lease key   KEYS[4] job state hash
KEYS[5] event stream
ARGV[1] lease token   ARGV[2] fencing token   ARGV[3] result JSON   ARGV[4] now (ms)
ARGV[5] event stream cap   ARGV[6..] extra `succeeded` event fields
Reply: "committed", or "exists" (a result is already committed: nothing written, treat as done),
  or "cancelled" (the job was cancelled: nothing written).
Errors: LEASELOST (caller's token no longer holds the lease), FENCED <highest> (a newer attempt exists).
]]
-- The commit shared by eventflow_commit_result and eventflow_commit_and_ack: KEYS[1..5] and ARGV[1..5]
-- as documented there; the extra `succeeded` event fields start at ARGV[fields_from].
local function commit(keys, argv, fields_from)
  if redis.call('EXISTS', keys[1]) == 1 then return 'exists' end
  if redis.call('GET', keys[3]) ~= argv[1] then
    return redis.error_reply('LEASELOST lease token is not current')
  end
  local highest = tonumber(redis.call('GET', keys[2]) or '0')
  if tonumber(argv[2]) < highest then
    return redis.error_reply('FENCED ' .. highest)
  end
  if redis.call('HGET', keys[4], 'state') == 'cancelled' then return 'cancelled' end
  redis.call('HSET', keys[1], 'fence', argv[2], 'json', argv[3], 'committed_at_ms', argv[4])
  redis.call('HSET', keys[4], 'state', 'succeeded', 'progress', 1, 'updated_at_ms', argv[4],
    'finished_at_ms', argv[4])
  redis.call('HDEL', keys[4], 'error_class', 'error_message')
  local fields = {'type', 'succeeded', 'at_ms', argv[4]}
  for _, v in ipairs(tail(argv, fields_from)) do fields[#fields + 1] = v end
  add_event(keys[5], argv[5], fields)
  return 'committed'
end

local function commit_result(keys, argv)
  return commit(keys, argv, 6)
end

--[[ eventflow_ack_entry
Purpose: the only XACK. Acks an entry only if it is still pending for the calling consumer and, when a
  lease token is given, that token still holds the lease, which the ack then releases (saves the
  separate release round trip). A raw XACK from a zombie would silently drop the new owner's in-flight
  entry (facts #5).
KEYS[1] job stream   KEYS[2] lease key (ignored when ARGV[4] is "")
ARGV[1] group   ARGV[2] entry id   ARGV[3] consumer name   ARGV[4] lease token or ""
Reply: 1 acked, 0 not pending (already acked).
Errors: NOTOWNER <owner> (pending for another consumer), LEASELOST.
]]
local function ack_entry(keys, argv)
  local p = pending_of(keys[1], argv[1], argv[2])
  if not p then return 0 end
  if p[2] ~= argv[3] then return redis.error_reply('NOTOWNER ' .. p[2]) end
  if argv[4] ~= '' then
    if redis.call('GET', keys[2]) ~= argv[4] then
      return redis.error_reply('LEASELOST lease token is not current')
    end
    redis.call('DEL', keys[2])
  end
  return redis.call('XACK', keys[1], argv[1], argv[2])
end

--[[ eventflow_commit_and_ack
Purpose: a job's last step in one call: eventflow_commit_result, then -- only if the commit was not
  refused -- eventflow_ack_entry's owner-checked ack and the lease release. Atomic per job, so a batch
  of these in one pipeline cannot ack a job whose commit was refused, and each entry's ownership is
  checked on its own. When the result already exists (another attempt committed) or the job was
  cancelled, the entry is still acked if it is pending for the caller (as the -2/-1 answers of
  eventflow_acquire_lease lead to); the lease is released only if the caller's token still holds it.
KEYS[1] result hash   KEYS[2] fencing counter   KEYS[3] lease key   KEYS[4] job state hash
KEYS[5] event stream   KEYS[6] job stream
ARGV[1] lease token   ARGV[2] fencing token   ARGV[3] result JSON   ARGV[4] now (ms)
ARGV[5] event stream cap   ARGV[6] group   ARGV[7] entry id   ARGV[8] consumer
ARGV[9..] extra `succeeded` event fields
Reply: {outcome, ack}: outcome "committed", "exists" or "cancelled" (as eventflow_commit_result);
  ack 1 acked, 0 not pending (already acked), or the name of the consumer the entry is now pending for
  (not acked: a zombie must not drop another worker's entry).
Errors: LEASELOST, FENCED <highest> (as eventflow_commit_result: nothing written, nothing acked).
]]
local function commit_and_ack(keys, argv)
  local outcome = commit(keys, argv, 9)
  if type(outcome) == 'table' then return outcome end  -- an error reply: refused, so no ack
  if redis.call('GET', keys[3]) == argv[1] then redis.call('DEL', keys[3]) end
  local p = pending_of(keys[6], argv[6], argv[7])
  if not p then return {outcome, 0} end
  if p[2] ~= argv[8] then return {outcome, p[2]} end
  return {outcome, redis.call('XACK', keys[6], argv[6], argv[7])}
end

--[[ eventflow_schedule_retry
Purpose: remember an attempt's transient failure on its entry (first/last time, class, message, for the
  DLQ record), mark the job retrying with a `retrying` event, and schedule the entry's next delivery
  in the retry set. The entry stays pending; the reaper re-delivers it when due (counting a delivery).
KEYS[1] failure hash   KEYS[2] job state hash   KEYS[3] event stream   KEYS[4] retry schedule (zset)
ARGV[1] failure class   ARGV[2] message   ARGV[3] now (ms)   ARGV[4] event stream cap
ARGV[5] entry id   ARGV[6] due time (ms)   ARGV[7..] extra event fields
Reply: number of failures recorded for this entry.
]]
local function schedule_retry(keys, argv)
  redis.call('HSETNX', keys[1], 'first_failure_ms', argv[3])
  redis.call('HSET', keys[1], 'last_failure_ms', argv[3], 'failure_class', argv[1], 'failure_message', argv[2])
  local n = redis.call('HINCRBY', keys[1], 'failures', 1)
  local state = redis.call('HGET', keys[2], 'state')
  if state and state ~= 'cancelled' and state ~= 'succeeded' then
    redis.call('HSET', keys[2], 'state', 'retrying', 'updated_at_ms', argv[3],
      'error_class', argv[1], 'error_message', argv[2], 'retry_due_ms', argv[6])
  end
  redis.call('ZADD', keys[4], argv[6], argv[5])
  local fields = {'type', 'retrying', 'at_ms', argv[3], 'message', argv[1] .. ': ' .. argv[2]}
  for _, v in ipairs(tail(argv, 7)) do fields[#fields + 1] = v end
  add_event(keys[3], argv[4], fields)
  return n
end

--[[ eventflow_heartbeat_job
Purpose: keep a running job alive: renew its lease and reset its entry's idle time (XCLAIM to the same
  consumer with JUSTID, which does not count a delivery), only while the caller still owns both.
KEYS[1] job stream   KEYS[2] lease key
ARGV[1] group   ARGV[2] entry id   ARGV[3] consumer   ARGV[4] lease token   ARGV[5] lease TTL (ms)
Reply: 1 alive; 0 lease lost; -1 entry no longer pending for this consumer. On 0 or -1 the caller must
  stop the job and write nothing (self-fencing).
]]
local function heartbeat_job(keys, argv)
  if redis.call('GET', keys[2]) ~= argv[4] then return 0 end
  local p = pending_of(keys[1], argv[1], argv[2])
  if not p or p[2] ~= argv[3] then return -1 end
  redis.call('PEXPIRE', keys[2], argv[5])
  redis.call('XCLAIM', keys[1], argv[1], argv[3], 0, argv[2], 'JUSTID')
  return 1
end

--[[ eventflow_reclaim_entry
Purpose: hand one pending entry to a live consumer, counting a delivery (XCLAIM without JUSTID, so the
  delivery ceiling is reached; facts #3). Skips entries whose scheduled retry is not due and entries
  whose owner touched them within the idle threshold (a healthy long job). An entry deleted from the
  stream while pending is recorded as lost work on the dead-letter stream and removed from the
  pending list -- never silently dropped.
KEYS[1] job stream   KEYS[2] retry schedule (zset)   KEYS[3] dead-letter stream   KEYS[4] failure hash
KEYS[5] the lease key of the entry's request hash
ARGV[1] group   ARGV[2] entry id   ARGV[3] target consumer   ARGV[4] min idle (ms)   ARGV[5] now (ms)
ARGV[6] "1" to ignore the idle threshold (a due retry)   ARGV[7] delivery ceiling
Reply: "claimed", "scheduled" (retry not due), "busy" (not idle long enough), "leased" (a worker still
  holds the request's lease: re-delivering now would only burn a delivery), "gone" (no longer pending),
  "ceiling" (at the ceiling: dead-letter it instead), or "lost".
]]
local function reclaim_entry(keys, argv)
  local due = redis.call('ZSCORE', keys[2], argv[2])
  if due and tonumber(due) > tonumber(argv[5]) then return 'scheduled' end
  local p = pending_of(keys[1], argv[1], argv[2])
  if not p then
    redis.call('ZREM', keys[2], argv[2])
    return 'gone'
  end
  if argv[6] ~= '1' and tonumber(p[3]) < tonumber(argv[4]) then return 'busy' end
  if #redis.call('XRANGE', keys[1], argv[2], argv[2]) == 0 then
    redis.call('XADD', keys[3], '*', 'original_entry_id', argv[2], 'delivery_count', p[4],
      'failure_class', 'lost', 'failure_message', 'entry deleted from the job stream while pending',
      'payload', '{}', 'first_failure_ms', argv[5], 'last_failure_ms', argv[5], 'dead_lettered_at_ms', argv[5],
      'job_id', '', 'request_hash', '', 'replay_generation', '0')
    redis.call('XACK', keys[1], argv[1], argv[2])
    redis.call('ZREM', keys[2], argv[2])
    redis.call('DEL', keys[4])
    return 'lost'
  end
  if tonumber(p[4]) >= tonumber(argv[7]) then return 'ceiling' end
  if redis.call('EXISTS', keys[5]) == 1 then return 'leased' end
  redis.call('XCLAIM', keys[1], argv[1], argv[3], 0, argv[2])
  redis.call('ZREM', keys[2], argv[2])
  return 'claimed'
end

--[[ eventflow_dead_letter
Purpose: move one pending entry to the dead-letter stream: append the DLQ record and ack the original
  in one step, so a crash can neither duplicate the record nor leave an entry that is neither pending
  nor dead-lettered. Marks the job dead_lettered with a `dead_lettered` event.
KEYS[1] job stream   KEYS[2] dead-letter stream   KEYS[3] job state hash   KEYS[4] event stream
KEYS[5] failure hash of the entry   KEYS[6] retry schedule (zset)
ARGV[1] group   ARGV[2] entry id   ARGV[3] expected owner consumer, or "" for any (the reaper)
ARGV[4] failure class, or "" to use the recorded one   ARGV[5] failure message (same rule)
ARGV[6] now (ms)   ARGV[7] event stream cap   ARGV[8] minimum delivery count, "0" for none
ARGV[9] job id ("" if unknown)   ARGV[10] request hash
Reply: the DLQ record id, or "" when the entry is not pending (already handled) or under the minimum.
Errors: NOTOWNER <owner>.
]]
local function dead_letter(keys, argv)
  local p = pending_of(keys[1], argv[1], argv[2])
  if not p then return '' end
  if argv[3] ~= '' and p[2] ~= argv[3] then return redis.error_reply('NOTOWNER ' .. p[2]) end
  local deliveries = tonumber(p[4])
  if deliveries < tonumber(argv[8]) then return '' end
  local rows = redis.call('XRANGE', keys[1], argv[2], argv[2])
  local payload = {}
  if #rows == 1 then
    local f = rows[1][2]
    for i = 1, #f, 2 do payload[f[i]] = f[i + 1] end
  end
  local failure = {}
  local fr = redis.call('HGETALL', keys[5])
  for i = 1, #fr, 2 do failure[fr[i]] = fr[i + 1] end
  local class = argv[4]
  local message = argv[5]
  if class == '' then
    class = failure['failure_class'] or 'delivery_ceiling'
    message = failure['failure_message'] or ('delivered ' .. deliveries .. ' times without success')
  end
  if #rows == 0 then
    class = 'lost'
    message = 'entry deleted from the stream while pending'
  end
  local dlq_id = redis.call('XADD', keys[2], '*',
    'original_entry_id', argv[2], 'delivery_count', deliveries,
    'failure_class', class, 'failure_message', message,
    'payload', cjson.encode(payload),
    'first_failure_ms', failure['first_failure_ms'] or argv[6],
    'last_failure_ms', failure['last_failure_ms'] or argv[6],
    'dead_lettered_at_ms', argv[6], 'job_id', argv[9], 'request_hash', argv[10],
    'replay_generation', payload['replay_generation'] or '0')
  redis.call('XACK', keys[1], argv[1], argv[2])
  redis.call('DEL', keys[5])
  redis.call('ZREM', keys[6], argv[2])
  if argv[9] ~= '' then
    redis.call('HSET', keys[3], 'state', 'dead_lettered', 'updated_at_ms', argv[6],
      'error_class', class, 'error_message', message, 'dlq_id', dlq_id)
    add_event(keys[4], argv[7], {'type', 'dead_lettered', 'job_id', argv[9], 'request_hash', argv[10],
      'at_ms', argv[6], 'entry_id', argv[2], 'attempt', deliveries, 'message', class .. ': ' .. message})
  end
  return dlq_id
end

--[[ eventflow_report_progress
Purpose: record progress on the job state and append a `progress` event.
KEYS[1] job state hash   KEYS[2] event stream
ARGV[1] fraction done (0..1)   ARGV[2] now (ms)   ARGV[3] event stream cap   ARGV[4..] extra event fields
Reply: the job's state (so a worker learns about a cancellation on its next progress report).
]]
local function report_progress(keys, argv)
  local state = redis.call('HGET', keys[1], 'state')
  if state ~= 'running' then return state or '' end
  redis.call('HSET', keys[1], 'progress', argv[1], 'updated_at_ms', argv[2])
  local fields = {'type', 'progress', 'progress', argv[1], 'at_ms', argv[2]}
  for _, v in ipairs(tail(argv, 4)) do fields[#fields + 1] = v end
  add_event(keys[2], argv[3], fields)
  return state
end

--[[ eventflow_cancel_job
Purpose: cancel a job that has not finished; consumers skip it or stop it. The request's dedupe key is
  released (if it still names this job), so submitting the same request again makes a new job instead
  of answering with the cancelled one; an Idempotency-Key keeps naming the cancelled job.
KEYS[1] job state hash   KEYS[2] event stream   KEYS[3] dedupe key of the job's request hash
ARGV[1] now (ms)   ARGV[2] event stream cap   ARGV[3] the request hash KEYS[3] was built from
Reply: the state after the call ("cancelled", or the terminal state it already had); "" if no such job.
]]
local function cancel_job(keys, argv)
  local state = redis.call('HGET', keys[1], 'state')
  if not state then return '' end
  if state == 'succeeded' or state == 'failed' or state == 'dead_lettered' or state == 'cancelled' then
    return state
  end
  local job_id = redis.call('HGET', keys[1], 'job_id')
  redis.call('HSET', keys[1], 'state', 'cancelled', 'updated_at_ms', argv[1], 'cancelled_at_ms', argv[1])
  -- Only this job's own dedupe entry: a caller passing another hash's key must not release that one.
  if redis.call('HGET', keys[1], 'request_hash') == argv[3] and redis.call('GET', keys[3]) == job_id then
    redis.call('DEL', keys[3])
  end
  add_event(keys[2], argv[2], {'type', 'cancelled', 'job_id', job_id, 'at_ms', argv[1]})
  return 'cancelled'
end

--[[ eventflow_consumer_heartbeat
Purpose: a consumer announces it is alive: heartbeat key with a TTL, its entry in the consumer
  registry, and its membership of the group (XGROUP CREATECONSUMER). Redis 7.0 does not add a
  consumer on a blocking XREADGROUP that returns nothing, so without this an idle new consumer is
  invisible to the reaper.
KEYS[1] heartbeat key   KEYS[2] consumer registry (zset)   KEYS[3] job stream
ARGV[1] group   ARGV[2] consumer   ARGV[3] heartbeat TTL (ms)   ARGV[4] now (ms)   ARGV[5] heartbeat value
Reply: 1.
]]
local function consumer_heartbeat(keys, argv)
  redis.call('SET', keys[1], argv[5], 'PX', argv[3])
  redis.call('ZADD', keys[2], argv[4], argv[2])
  redis.call('XGROUP', 'CREATECONSUMER', keys[3], argv[1], argv[2])
  return 1
end

--[[ eventflow_reap_consumer
Purpose: delete a dead consumer from the group and the registry only if its heartbeat is gone AND its
  pending list is empty, in one step: XGROUP DELCONSUMER drops pending entries for good (facts #4).
KEYS[1] job stream   KEYS[2] the consumer's heartbeat key   KEYS[3] consumer registry (zset)
ARGV[1] group   ARGV[2] consumer name
Reply: 1 deleted; 0 kept (alive, or still owns pending entries).
]]
local function reap_consumer(keys, argv)
  if redis.call('EXISTS', keys[2]) == 1 then return 0 end
  local rows = redis.call('XPENDING', keys[1], argv[1], '-', '+', 1, argv[2])
  if #rows > 0 then return 0 end
  redis.call('XGROUP', 'DELCONSUMER', keys[1], argv[1], argv[2])
  redis.call('ZREM', keys[3], argv[2])
  return 1
end

-- Stream ids as {ms, seq} numbers, so they compare correctly (string comparison does not).
local function parse_id(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end

local function id_less(a, b)
  local am, as = parse_id(a)
  local bm, bs = parse_id(b)
  return am < bm or (am == bm and as < bs)
end

--[[ eventflow_trim_stream
Purpose: the only trimming of the job stream (retention). Computes, atomically, the lowest id any
  consumer group still needs -- its oldest pending entry, and the entry after its last-delivered id --
  and trims with MINID strictly below it and below the age cutoff, so no pending or undelivered entry
  is ever deleted (facts #2). XTRIM MINID keeps entries with id >= MINID.
KEYS[1] job stream
ARGV[1] age cutoff id ("<ms>-0": entries older than the retention period)
Reply: {entries deleted, the MINID used (or "" when nothing may be trimmed)}.
]]
local function trim_stream(keys, argv)
  if redis.call('EXISTS', keys[1]) == 0 then return {0, ''} end
  local floor = argv[1]
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', keys[1])) do
    local info = {}
    for i = 1, #g, 2 do info[g[i]] = g[i + 1] end
    -- The first undelivered entry of this group is the one after last-delivered-id.
    local ms, seq = parse_id(info['last-delivered-id'])
    local undelivered = ms .. '-' .. (seq + 1)
    if id_less(undelivered, floor) then floor = undelivered end
    local oldest = redis.call('XPENDING', keys[1], info['name'])
    if oldest[2] and oldest[2] ~= false and id_less(oldest[2], floor) then floor = oldest[2] end
  end
  if floor == '0-0' or floor == '0-1' then return {0, ''} end
  local deleted = redis.call('XTRIM', keys[1], 'MINID', floor)
  return {deleted, floor}
end

--[[ eventflow_replay_dead_letter
Purpose: put one dead-lettered job back on the job stream with its original fields (same job id and
  request hash, so a job that meanwhile succeeded is not run twice: the consumer finds its result) and
  a replay generation one higher. Idempotent: a marker records each replayed DLQ id, so an interrupted
  replay run can simply be run again.
KEYS[1] dead-letter stream   KEYS[2] job stream   KEYS[3] replay marker hash   KEYS[4] job state hash
KEYS[5] event stream   KEYS[6] result hash of the request
ARGV[1] DLQ record id   ARGV[2] now (ms)   ARGV[3] event stream cap
Reply: {outcome, detail}: {"replayed", new entry id}, {"already", earlier entry id},
  {"succeeded", ""} (a result exists: nothing enqueued), {"missing", ""}, {"no_payload", ""} (lost work).
]]
local function replay_dead_letter(keys, argv)
  local earlier = redis.call('HGET', keys[3], argv[1])
  if earlier then return {'already', earlier} end
  local rows = redis.call('XRANGE', keys[1], argv[1], argv[1])
  if #rows == 0 then return {'missing', ''} end
  local record = {}
  local f = rows[1][2]
  for i = 1, #f, 2 do record[f[i]] = f[i + 1] end
  local payload = cjson.decode(record['payload'] or '{}')
  if not payload['job_id'] or not payload['payload'] then return {'no_payload', ''} end
  if redis.call('EXISTS', keys[6]) == 1 then
    redis.call('HSET', keys[3], argv[1], 'result-exists')
    return {'succeeded', ''}
  end
  local generation = tonumber(payload['replay_generation'] or '0') + 1
  payload['replay_generation'] = tostring(generation)
  local xadd = {'XADD', keys[2], '*'}
  for name, value in pairs(payload) do
    xadd[#xadd + 1] = name
    xadd[#xadd + 1] = value
  end
  local entry_id = redis.call(unpack(xadd))
  redis.call('HSET', keys[3], argv[1], entry_id)
  redis.call('HSET', keys[4], 'state', 'queued', 'entry_id', entry_id, 'updated_at_ms', argv[2],
    'replay_generation', generation, 'progress', 0)
  redis.call('HDEL', keys[4], 'error_class', 'error_message', 'dlq_id', 'retry_due_ms')
  add_event(keys[5], argv[3], {'type', 'queued', 'job_id', payload['job_id'], 'request_hash',
    payload['request_hash'] or '', 'at_ms', argv[2], 'entry_id', entry_id,
    'message', 'replayed from ' .. argv[1] .. ' (generation ' .. generation .. ')'})
  return {'replayed', entry_id}
end

--[[ eventflow_purge_dead_letter
Purpose: delete one DLQ record (an operator decided it will never be replayed) and its replay marker.
KEYS[1] dead-letter stream   KEYS[2] replay marker hash
ARGV[1] DLQ record id
Reply: 1 deleted, 0 not found.
]]
local function purge_dead_letter(keys, argv)
  redis.call('HDEL', keys[2], argv[1])
  return redis.call('XDEL', keys[1], argv[1])
end

--[[ eventflow_breaker_allow
Purpose: may the caller start new work that needs these dependencies? One circuit breaker per
  dependency, shared by all consumers. closed: go. open: wait until its cool-down ends; then it turns
  half_open and exactly one caller gets a probe (one job); everyone else waits until the probe reports
  (eventflow_breaker_record) or its probe TTL passes (its consumer died), when another caller may probe.
KEYS[1..n] breaker hashes
ARGV[1] now (ms)   ARGV[2] caller (consumer name)   ARGV[3] probe TTL (ms)
Reply: {decision, wait_ms, state_1, ..., state_n}; decision 'go' | 'probe' | 'wait'; a state is closed,
  counting (closed, failures being counted: report successes so they reset), half_open or open.
]]
local function breaker_allow(keys, argv)
  local now, caller, probe_ttl = tonumber(argv[1]), argv[2], tonumber(argv[3])
  local states = {}
  local wait_ms, probe_needed = 0, false
  for i, key in ipairs(keys) do
    local b = redis.call('HMGET', key, 'state', 'open_until', 'probe_until', 'failures', 'probe')
    local state = b[1] or 'closed'
    if state == 'closed' and b[4] and tonumber(b[4]) > 0 then state = 'counting' end
    if state == 'open' then
      local left = tonumber(b[2]) - now
      if left > 0 then
        wait_ms = math.max(wait_ms, left)
      else
        state = 'half_open'
        probe_needed = true
      end
    elseif state == 'half_open' then
      local left = tonumber(b[3] or '0') - now
      if left <= 0 or b[5] == caller then
        probe_needed = true  -- expired probe, or the caller's own (asking again is not a second probe)
      else
        wait_ms = math.max(wait_ms, math.min(left, 1000))
      end
    end
    states[i] = state
  end
  local reply = {}
  if wait_ms > 0 then
    reply = {'wait', wait_ms}
  elseif probe_needed then
    for i, key in ipairs(keys) do
      if states[i] == 'half_open' then
        redis.call('HSET', key, 'state', 'half_open', 'probe', caller, 'probe_until', now + probe_ttl)
      end
    end
    reply = {'probe', 0}
  else
    reply = {'go', 0}
  end
  for i = 1, #keys do reply[#reply + 1] = states[i] end
  return reply
end

--[[ eventflow_breaker_record
Purpose: report what a job saw of one dependency. 'fail' in closed counts toward the threshold within
  the window (a 'ok' resets the count: the breaker opens on consecutive failures); reaching it opens the
  breaker for the cool-down. 'fail' while half_open re-opens it; 'ok' closes it. 'none' (the probe job
  never reached the dependency, e.g. it was cancelled) hands the probe back.
KEYS[1] breaker hash
ARGV[1] now (ms)   ARGV[2] outcome ok|fail|none   ARGV[3] threshold   ARGV[4] window (ms)
ARGV[5] open cool-down (ms)   ARGV[6] caller   ARGV[7] failure message
Reply: {state, changed} changed 1 when this call moved the breaker to another state.
]]
local function breaker_record(keys, argv)
  local now, outcome = tonumber(argv[1]), argv[2]
  local threshold, window, open_ms = tonumber(argv[3]), tonumber(argv[4]), tonumber(argv[5])
  local b = redis.call('HMGET', keys[1], 'state', 'failures', 'window_start', 'probe')
  local state = b[1] or 'closed'
  if outcome == 'none' then
    if state == 'half_open' and b[4] == argv[6] then redis.call('HSET', keys[1], 'probe_until', 0) end
    return {state, 0}
  end
  if outcome == 'ok' then
    if state == 'closed' and not b[2] then return {'closed', 0} end
    if state == 'open' then return {'open', 0} end  -- a job that started before the trip: not a probe
    redis.call('DEL', keys[1])
    return {'closed', state == 'closed' and 0 or 1}
  end
  redis.call('HSET', keys[1], 'last_failure', argv[7], 'last_failure_ms', now)
  if state == 'half_open' or state == 'open' then
    redis.call('HSET', keys[1], 'state', 'open', 'open_until', now + open_ms, 'failures', 0)
    redis.call('HDEL', keys[1], 'probe', 'probe_until')
    return {'open', state == 'open' and 0 or 1}
  end
  local failures = tonumber(b[2] or '0')
  if not b[3] or now - tonumber(b[3]) > window then
    failures = 0
    redis.call('HSET', keys[1], 'window_start', now)
  end
  failures = failures + 1
  if failures >= threshold then
    redis.call('HSET', keys[1], 'state', 'open', 'open_until', now + open_ms, 'opened_ms', now, 'failures', 0)
    return {'open', 1}
  end
  redis.call('HSET', keys[1], 'failures', failures)
  return {'closed', 0}
end

redis.register_function{function_name = 'eventflow_version', callback = version,
  flags = {'no-writes', 'allow-stale'}}
redis.register_function('eventflow_submit_job', submit_job)
redis.register_function('eventflow_acquire_lease', acquire_lease)
redis.register_function('eventflow_renew_lease', renew_lease)
redis.register_function('eventflow_release_lease', release_lease)
redis.register_function('eventflow_commit_result', commit_result)
redis.register_function('eventflow_ack_entry', ack_entry)
redis.register_function('eventflow_commit_and_ack', commit_and_ack)
redis.register_function('eventflow_schedule_retry', schedule_retry)
redis.register_function('eventflow_heartbeat_job', heartbeat_job)
redis.register_function('eventflow_reclaim_entry', reclaim_entry)
redis.register_function('eventflow_dead_letter', dead_letter)
redis.register_function('eventflow_report_progress', report_progress)
redis.register_function('eventflow_cancel_job', cancel_job)
redis.register_function('eventflow_reap_consumer', reap_consumer)
redis.register_function('eventflow_consumer_heartbeat', consumer_heartbeat)
redis.register_function('eventflow_trim_stream', trim_stream)
redis.register_function('eventflow_replay_dead_letter', replay_dead_letter)
redis.register_function('eventflow_purge_dead_letter', purge_dead_letter)
redis.register_function('eventflow_breaker_allow', breaker_allow)
redis.register_function('eventflow_breaker_record', breaker_record)
