"""The Redis scripts that make each step of a task's life atomic, web side and worker alike.

Keys of one task (``<p>`` is ``async-task-middleware-``, after Celery's ``global_keyprefix``):

- ``<p><id>``: the submission record (JSON: created, app, route, owner hash). It alone tells a
  known task from an unknown one, and a worker runs a task only while it exists.
- ``<p>attempts-<id>``: deliveries counted by the worker (poison requests; "a worker began").
- ``<p>result-<id>``: the outcome: the final response, ready to send
  (``_shared.wire.pack_response``), or ``FAILED`` (Celery's meta holds the details).
- ``<p>body-<id>``: a large result's body, kept apart from its ``result`` (``_shared.wire``), so
  that a poll's ``MGET`` never carries it; it is read in pieces. Written and expiring with it.
- ``<p>events-<id>`` (a pub/sub channel, not a key): a note each time the task begins,
  reports progress or ends; it wakes waiting requests and event streams (``_web.events``).
- ``<p>live-<id>``: a heartbeat, renewed while a worker runs the task; a task that began and
  has none is waiting for redelivery ("retrying").
- ``<p>head-<id>``, ``<p>stream-<id>``: a streamed response while it is produced (``_worker.live``):
  its head (JSON: status, headers, bytes produced, ended, attempt) and its body so far, which
  ``STREAM`` appends to in batches. ``FINISH`` deletes both (the outcome holds every byte);
  ``BEGIN`` too, for a delivery that starts the response again.
- ``<p>refused-<id>``: a tombstone: a submission answered 503 that must never run.
- ``<p>message-<id>``: a copy of the task's broker message (``queue``, ``message``), from the
  submission until a worker begins the task, for the sweep after a Redis restart or failover
  (``_worker.sweep``): the one moment kombu's Redis transport can drop a message.
- ``<p>owner-<hash>``, ``<p>queued-<app> <route>``: sorted sets of unfinished tasks per owner
  and queued tasks per route (score: submission time), kept only when a cap is set.
- ``<p>idempotency-<app> <owner> <sha256 of the key>``: ``<task id> <request fingerprint>``,
  as long as the result lives.
- ``<p>tasks-<hash>``: every task of an owner (score: submission time), for the collection
  (``tasks_path``), kept when one is configured: added by ``SUBMIT``, taken out by ``RETRACT``
  and ``DELETE``, and by ``LIST`` when it meets a task whose record expired; entries older than
  twice a record's lifetime leave at the owner's next submission, and the set expires then too.

Scripts, not MULTI: each is one command, runs atomically, and can decide (caps, tombstones).
"""

from __future__ import annotations

# KEYS: record, queue, tombstone, owner set, queued set, idempotency key, message copy,
#       the owner's collection
#       (an unused queue, idempotency key or collection is the record's: every key a script is
#       given is one an ACL user limited to the library's keys may name)
# ARGV: record, lifetime, message ('' = published through Celery), task id, now,
#       owner cap ('' = none), queued cap ('' = none), deadline on Redis's clock,
#       request fingerprint ('' = no idempotency key), '1' to add it to the owner's collection
# -> {1} accepted, {0} refused (too late, or a tombstone), {-1} owner at cap,
#    {-2} route queue at cap, {2, task id} the key's earlier task, {3} the key with another
#    request
# A script that reaches Redis after its deadline (it waited in a socket while Redis was frozen)
# does nothing: by then the web side has answered 503, and a 503 must have promised nothing.
# A record that exists already is this submission's own, written by an earlier try whose answer
# was lost with its connection (a failover): it is accepted, and nothing is written twice, so
# the web side may run the script again until its deadline.
SUBMIT = """
if redis.call('EXISTS', KEYS[1]) == 1 then return {1} end
local clock = redis.call('TIME')
if tonumber(clock[1]) + tonumber(clock[2]) / 1000000 > tonumber(ARGV[8]) then return {0} end
if redis.call('EXISTS', KEYS[3]) == 1 then return {0} end
if ARGV[9] ~= '' then
  local prior = redis.call('GET', KEYS[6])
  if prior then
    local sep = string.find(prior, ' ', 1, true)
    if string.sub(prior, sep + 1) == ARGV[9] then return {2, string.sub(prior, 1, sep - 1)} end
    return {3}
  end
end
local now = tonumber(ARGV[5])
local horizon = now - tonumber(ARGV[2])
if ARGV[6] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', horizon)
  if redis.call('ZCARD', KEYS[4]) >= tonumber(ARGV[6]) then return {-1} end
end
if ARGV[7] ~= '' then
  redis.call('ZREMRANGEBYSCORE', KEYS[5], '-inf', horizon)
  if redis.call('ZCARD', KEYS[5]) >= tonumber(ARGV[7]) then return {-2} end
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2])
if ARGV[3] ~= '' then
  redis.call('LPUSH', KEYS[2], ARGV[3])
  redis.call('HSET', KEYS[7], 'queue', KEYS[2], 'message', ARGV[3])
  redis.call('EXPIRE', KEYS[7], ARGV[2])
end
if ARGV[6] ~= '' then
  redis.call('ZADD', KEYS[4], now, ARGV[4])
  redis.call('EXPIRE', KEYS[4], ARGV[2])
end
if ARGV[7] ~= '' then
  redis.call('ZADD', KEYS[5], now, ARGV[4])
  redis.call('EXPIRE', KEYS[5], ARGV[2])
end
if ARGV[9] ~= '' then redis.call('SET', KEYS[6], ARGV[4] .. ' ' .. ARGV[9], 'EX', ARGV[2]) end
if ARGV[10] == '1' then
  redis.call('ZREMRANGEBYSCORE', KEYS[8], '-inf', now - 2 * tonumber(ARGV[2]))
  redis.call('ZADD', KEYS[8], now, ARGV[4])
  redis.call('EXPIRE', KEYS[8], 2 * tonumber(ARGV[2]))
end
return {1}
"""

# A submission whose outcome is unknown (the script or Celery's publish outlived its deadline)
# is settled before the client is answered: either a worker already began it (it was accepted:
# answer 303), or it is taken back and a tombstone stops a script still on its way.
# KEYS: record, attempts, tombstone, owner set, queued set, idempotency key (the record's when
#       none), message copy, the owner's collection (the record's when none)
# ARGV: task id, lifetime, '1' with an idempotency key
# -> 1 a worker began it, 0 taken back
RETRACT = """
if redis.call('EXISTS', KEYS[2]) == 1 then return 1 end
redis.call('DEL', KEYS[7])
if ARGV[3] == '1' then
  local prior = redis.call('GET', KEYS[6])
  if prior and string.sub(prior, 1, #ARGV[1]) == ARGV[1] then redis.call('DEL', KEYS[6]) end
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[3], '1', 'EX', ARGV[2])
redis.call('ZREM', KEYS[4], ARGV[1])
redis.call('ZREM', KEYS[5], ARGV[1])
if KEYS[8] ~= KEYS[1] then redis.call('ZREM', KEYS[8], ARGV[1]) end
return 0
"""

# DELETE on the status URL: only by the owner (or anyone, for an anonymous task).
# KEYS: record, meta, attempts, result, heartbeat, message copy, body, webhook delivery state,
#       retry note, streamed head, streamed body
# ARGV: key prefix, task id, the requester's owner hashes (none: anonymous)
# -> {1, the record's webhook as JSON when the task had not ended ('' otherwise)} deleted,
#    {0, ''} unknown (or someone else's: the same answer)
DELETE = """
local raw = redis.call('GET', KEYS[1])
if not raw then return {0, ''} end
local record = cjson.decode(raw)
local owner = record['owner']
if type(owner) == 'string' then
  local allowed = false
  for i = 3, #ARGV do
    if ARGV[i] == owner then allowed = true end
  end
  if not allowed then return {0, ''} end
  redis.call('ZREM', ARGV[1] .. 'owner-' .. owner, ARGV[2])
  redis.call('ZREM', ARGV[1] .. 'tasks-' .. owner, ARGV[2])
end
local hook = ''
if type(record['webhook']) == 'table' and redis.call('EXISTS', KEYS[4]) == 0 then
  hook = cjson.encode(record['webhook'])
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9],
           KEYS[10], KEYS[11])
if type(record['idempotency']) == 'string' then redis.call('DEL', record['idempotency']) end
if type(record['app']) == 'string' and type(record['route']) == 'string' then
  redis.call('ZREM', ARGV[1] .. 'queued-' .. record['app'] .. ' ' .. record['route'], ARGV[2])
end
redis.call('PUBLISH', ARGV[1] .. 'events-' .. ARGV[2], 'deleted')
return {1, hook}
"""

# The worker, before a replay: count the delivery, leave the route's queued set, start the
# heartbeat, and give the record its full lifetime again (a task may wait long in the queue).
# The heartbeat's first value is the delivery's own token: a BEGIN run again for the same
# delivery (its answer was lost with the connection, in a failover) counts nothing twice.
# KEYS: record, attempts, queued set, result, heartbeat, message copy, streamed head, streamed
#       body
# ARGV: lifetime, task id, heartbeat lifetime (ms), events channel, delivery token
# -> the attempt number; 0 when the record is gone (deleted, expired, refused); -1 when the
#    task already has its outcome (a redelivery after its worker stored it, then died)
BEGIN = """
if redis.call('EXISTS', KEYS[4]) == 1 then return -1 end
if redis.call('EXPIRE', KEYS[1], ARGV[1]) == 0 then return 0 end
if redis.call('GET', KEYS[5]) == ARGV[5] then return tonumber(redis.call('GET', KEYS[2])) end
local n = redis.call('INCR', KEYS[2])
redis.call('EXPIRE', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[2])
redis.call('DEL', KEYS[6], KEYS[7], KEYS[8])
redis.call('SET', KEYS[5], ARGV[5], 'PX', ARGV[3])
redis.call('PUBLISH', ARGV[4], 'running')
return n
"""

# The worker, while its replays run (every cancel_check_interval): renew each one's heartbeat
# and its record's lifetime, all in one call.
# KEYS: record, heartbeat of each replay, in pairs  ARGV: lifetime, heartbeat lifetime (ms)
# -> per pair, 0 when the record is gone (the task was deleted: stop it), else 1
BEAT = """
local alive = {}
for i = 1, #KEYS, 2 do
  if redis.call('EXPIRE', KEYS[i], ARGV[1]) == 0 then
    alive[#alive + 1] = 0
  else
    redis.call('SET', KEYS[i + 1], '1', 'PX', ARGV[2])
    alive[#alive + 1] = 1
  end
end
return alive
"""

# The worker, after a replay: store the outcome (the packed response, or FAILED), restart the
# record's lifetime (results live `lifetime` from completion, not from submission), stop the
# heartbeat, leave the owner's set; and for a success, Celery's own result meta, as Celery's
# backend writes it (set, then published on its key). A large body goes first, so that no one
# reads a result without it.
# With a completion webhook on the native Redis broker, its delivery's message goes onto the
# webhook queue in the same call: a worker killed right after the outcome loses no event.
# KEYS: record, result, owner set, heartbeat, body, Celery's meta, webhook queue (the record's
#       when none), streamed head, streamed body
# ARGV: outcome, lifetime, task id, events channel, body kept apart ('' = none),
#       Celery's meta ('' = none: a failure's is Celery's own, written before),
#       the webhook delivery's message ('' = none)
# -> 1 stored, 0 the record is gone (deleted while running: nothing is kept)
FINISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[5] ~= '' then redis.call('SET', KEYS[5], ARGV[5], 'EX', ARGV[2]) end
if ARGV[6] ~= '' then
  redis.call('SET', KEYS[6], ARGV[6], 'EX', ARGV[2])
  redis.call('PUBLISH', KEYS[6], ARGV[6])
end
redis.call('SET', KEYS[2], ARGV[1], 'EX', ARGV[2])
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('DEL', KEYS[4], KEYS[8], KEYS[9])
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('PUBLISH', ARGV[4], 'done')
if ARGV[7] ~= '' then redis.call('LPUSH', KEYS[7], ARGV[7]) end
return 1
"""

# The sweep (``_worker.sweep``), for a task whose message it found in neither the queue nor kombu's
# unacked hash, twice: push the kept copy again, unless the task began meanwhile, was deleted,
# or its copy is gone (begun, retracted).
# KEYS: record, attempts, heartbeat, message copy
# -> 1 pushed again, 0 not needed
REPUBLISH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local copy = redis.call('HMGET', KEYS[4], 'queue', 'message')
if not copy[1] or not copy[2] then return 0 end
redis.call('LPUSH', copy[1], copy[2])
return 1
"""

# The worker, while a streamed response is produced (``_worker.live``): one batch of its body.
# The first batch of a delivery replaces what an earlier one left; none is written once the
# task is deleted or has its outcome (a late batch must not outlive ``FINISH``).
# KEYS: record, result, streamed head, streamed body
# ARGV: the batch, the head (JSON), lifetime, events channel, the offset the batch starts at
#       (0: the delivery's first batch)
# -> 1 written (or written before: an answer lost with its connection, tried again), 0 not (the
#    task is gone or ended, or the body is not the length this batch follows)
STREAM = """
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local at = tonumber(ARGV[5])
if at == 0 then
  redis.call('SET', KEYS[4], ARGV[1], 'EX', ARGV[3])
else
  local have = redis.call('STRLEN', KEYS[4])
  if have == at + #ARGV[1] then return 1 end
  if have ~= at then return 0 end
  redis.call('APPEND', KEYS[4], ARGV[1])
  redis.call('EXPIRE', KEYS[4], ARGV[3])
end
redis.call('SET', KEYS[3], ARGV[2], 'EX', ARGV[3])
redis.call('PUBLISH', ARGV[4], 'piece')
return 1
"""

# One page of an owner's collection, newest first, from the cursor on: each task's state read
# where it lies, the expired ones taken out on the way. At most ``budget`` entries are looked
# at, so that a page costs the same however many tasks the owner has; a page cut short by the
# budget still returns the cursor to go on from.
# KEYS: the owner's collection
# ARGV: key prefix, Celery's meta key prefix, cursor score ('+inf' for the first page), cursor
#       task id ('' for the first page), limit, budget, route ('' = any), statuses (a space-
#       separated list, '' = any)
# -> {next score ('' = the end), next task id, then per task: id, score, status, record,
#    the first 64 bytes of its result ('' = none), Celery's meta ('' = none)}
LIST = """
local prefix, limit, budget = ARGV[1], tonumber(ARGV[5]), tonumber(ARGV[6])
local wanted = {}
for status in string.gmatch(ARGV[8], '%S+') do wanted[status] = true end
local out = {'', ''}
local found, seen, offset = 0, 0, 0
local last_score, last_id = '', ''
local max = ARGV[3]
if ARGV[4] ~= '' then max = '(' .. ARGV[3] end
while seen < budget do
  local batch = redis.call('ZREVRANGEBYSCORE', KEYS[1], max, '-inf', 'WITHSCORES', 'LIMIT',
                           offset, math.min(100, budget - seen))
  if #batch == 0 then return out end
  -- The next batch starts after this one, less what was taken out of it (expired).
  offset = offset + #batch / 2
  for i = 1, #batch, 2 do
    local id, score = batch[i], batch[i + 1]
    seen = seen + 1
    if found == limit then
      out[1], out[2] = last_score, last_id
      return out
    end
    local record = redis.call('GET', prefix .. id)
    if not record then
      redis.call('ZREM', KEYS[1], id)
      offset = offset - 1
    else
      local result = redis.call('GETRANGE', prefix .. 'result-' .. id, 0, 63)
      local status
      if result == 'FAILED' then status = 'failed'
      elseif result ~= '' then status = 'done'
      elseif redis.call('EXISTS', prefix .. 'live-' .. id) == 1 then status = 'running'
      elseif redis.call('EXISTS', prefix .. 'attempts-' .. id) == 1 then status = 'retrying'
      else status = 'queued' end
      local route_ok = ARGV[7] == '' or cjson.decode(record)['route'] == ARGV[7]
      if route_ok and (ARGV[8] == '' or wanted[status]) then
        local meta = redis.call('GET', ARGV[2] .. id) or ''
        table.insert(out, id)
        table.insert(out, score)
        table.insert(out, status)
        table.insert(out, record)
        table.insert(out, result)
        table.insert(out, meta)
        found = found + 1
      end
    end
    last_score, last_id = score, id
  end
end
out[1], out[2] = last_score, last_id
return out
"""

#: The outcome stored for a task that failed; Celery's meta has the exception.
FAILED = b"FAILED"
