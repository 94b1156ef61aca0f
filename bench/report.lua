-- wrk script: a fleet of agent-shaped workers.status_report requests.
--
--   BENCH_TOKEN=... BENCH_WORKERS=2000 BENCH_START_MS=... BENCH_INDEX_BASE=0 \
--   wrk -t1 -c64 -d12s --latency -s bench/report.lua http://127.0.0.1:8008/
--
-- Environment:
--   BENCH_TOKEN       Bearer token (required)
--   BENCH_WORKERS     fleet size N: request idx reports as worker "bench-" .. (idx % N)
--   BENCH_START_MS    timestamp (ms) of index 0: request idx has timestamp START_MS + idx
--   BENCH_INDEX_BASE  first index of this run (give each run a disjoint range)
--   BENCH_THREADS     the -t given to wrk (default 1); indices are unique across threads
--   BENCH_SEND_MS     stop sending new requests this many ms after the start and let the
--                     ones in flight finish (run wrk for longer than this): every request
--                     sent is then answered before wrk stops. 0 (default): send until wrk stops.
--   BENCH_TIMELINE    "1": also count statuses per second since the start
--
-- Request idx carries values v(k) = ((idx*7919 + k*104729) % 100000) / 1000, written with
-- three decimals, k = 0, 1, ... the value's position in the report (bench/ingest.py
-- regenerates them exactly). The shape depends on the worker number w = idx % N:
-- cores = {4, 8, 16}[w % 3], gpus = {0, 0, 0, 1, 1, 2, 2, 4}[(w // 3) % 8], about 22 values.
--
-- done() prints one line: BENCH_RESULT {json}.

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec_t;
int clock_gettime(int clock_id, bench_timespec_t *tp);
]]
local CLOCK_MONOTONIC = 1
local timespec = ffi.new("bench_timespec_t")

local function now_ms()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, timespec)
    return tonumber(timespec.tv_sec) * 1000 + tonumber(timespec.tv_nsec) / 1e6
end

local floor, concat = math.floor, table.concat

local function env_number(name, default)
    local text = os.getenv(name)
    if text == nil or text == "" then
        if default == nil then error("bench/report.lua: " .. name .. " is not set") end
        return default
    end
    local value = tonumber(text)
    if value == nil then error("bench/report.lua: " .. name .. " is not a number: " .. text) end
    return value
end

local TOKEN = os.getenv("BENCH_TOKEN") or error("bench/report.lua: BENCH_TOKEN is not set")
local N = env_number("BENCH_WORKERS", 2000)
local START_MS = env_number("BENCH_START_MS")
local INDEX_BASE = env_number("BENCH_INDEX_BASE", 0)
local NTHREADS = env_number("BENCH_THREADS", 1)
local SEND_MS = env_number("BENCH_SEND_MS", 0)
local TIMELINE = os.getenv("BENCH_TIMELINE") == "1"

local CORES = { 4, 8, 16 }
local GPUS = { 0, 0, 0, 1, 1, 2, 2, 4 }
local SCALARS = { "memory_used", "memory_free", "disk_free_home", "disk_read", "disk_write", "network_tx", "network_rx" }
local GPU_KEYS = { "gpu_usage", "gpu_temperature", "gpu_memory_used", "gpu_memory_free" }
local MODULUS, STEP_IDX, STEP_K = 100000, 7919, 104729

-- ---------------------------------------------------------------- setup / done (main state)

local threads = {}

function setup(thread)
    threads[#threads + 1] = thread
    thread:set("id", #threads) -- 1-based
end

-- ---------------------------------------------------------------- running (thread states)

local VALUE_TEXT = nil  -- [m + 1] = string.format("%.3f", m / 1000), built in init()
local STEP_K_MOD = {}   -- [k + 1] = (k * STEP_K) % MODULUS
local shapes = {}       -- worker number -> { pieces, slots, nvalues }
local prefix = nil      -- the request line and headers, up to the Content-Length value

-- The body of a report of worker w as a list of strings in which some entries are
-- slots, filled in per request: slots[1] the timestamp, slots[k + 2] value k.
-- Built once per worker, interpreted: this LuaJIT 2.1 beta miscompiled an earlier
-- version of this code (commas went missing once the loops were traced).
local function add_text(entry, s)
    if entry.last_is_slot then
        entry.npieces = entry.npieces + 1
        entry.pieces[entry.npieces] = s
    else
        entry.pieces[entry.npieces] = entry.pieces[entry.npieces] .. s
    end
    entry.last_is_slot = false
end

local function add_slots(entry, count, separator)
    for i = 1, count do
        if i > 1 then add_text(entry, separator) end
        entry.npieces = entry.npieces + 1
        entry.pieces[entry.npieces] = ""
        entry.nslots = entry.nslots + 1
        entry.slots[entry.nslots] = entry.npieces
        entry.last_is_slot = true
    end
end

local function shape(w)
    local cores = CORES[w % 3 + 1]
    local gpus = GPUS[floor(w / 3) % 8 + 1]
    local entry = { pieces = {}, slots = {}, npieces = 0, nslots = 0, last_is_slot = true }
    add_text(entry, '{"worker":"bench-' .. w .. '","timestamp":')
    add_slots(entry, 1, "")
    add_text(entry, ',"machine_stats":{"cpu_usage":[')
    add_slots(entry, cores, ",")
    add_text(entry, '],"cpu_temperature":[')
    add_slots(entry, 1, ",")
    add_text(entry, "]")
    for _, key in ipairs(SCALARS) do
        add_text(entry, ',"' .. key .. '":')
        add_slots(entry, 1, "")
    end
    if gpus > 0 then
        for _, key in ipairs(GPU_KEYS) do
            add_text(entry, ',"' .. key .. '":[')
            add_slots(entry, gpus, ",")
            add_text(entry, "]")
        end
    end
    add_text(entry, "}}")
    entry.nvalues = entry.nslots - 1
    return entry
end
jit.off(add_text)
jit.off(add_slots)
jit.off(shape)

-- Per-thread state; globals so that done() can read them with thread:get().
-- `id` is set by setup().
local thread_id = 1
counter, started, sent, responses, ok = 0, false, 0, 0, 0
t0, draining, t_deadline, ok_at_deadline, responses_at_deadline = 0, false, 0, 0, 0
statuses, timeline = {}, {}
local deadline = math.huge

function init(args)
    thread_id = id or 1
    VALUE_TEXT = {}
    for m = 0, MODULUS - 1 do
        VALUE_TEXT[m + 1] = string.format("%.3f", m / 1000)
    end
    for k = 0, 127 do
        STEP_K_MOD[k + 1] = (k * STEP_K) % MODULUS
    end
    for w = 0, N - 1 do
        shapes[w] = shape(w)
    end
    local host = wrk.headers["Host"] or (wrk.port and (wrk.host .. ":" .. wrk.port) or wrk.host)
    prefix = "POST /workers.status_report HTTP/1.1\r\n"
        .. "Host: " .. host .. "\r\n"
        .. "Authorization: Bearer " .. TOKEN .. "\r\n"
        .. "Content-Type: application/json\r\n"
        .. "Content-Length: "
end

local function build(idx)
    local w = idx % N
    local entry = shapes[w]
    local pieces, slots = entry.pieces, entry.slots
    pieces[slots[1]] = string.format("%.0f", START_MS + idx)
    local base = (idx * STEP_IDX) % MODULUS
    for k = 0, entry.nvalues - 1 do
        pieces[slots[k + 2]] = VALUE_TEXT[(base + STEP_K_MOD[k + 1]) % MODULUS + 1]
    end
    local body = concat(pieces)
    return prefix .. #body .. "\r\n\r\n" .. body
end

-- Called once per request before it is sent (wrk calls it because it is defined).
function delay()
    local now = now_ms()
    if not started then
        started = true
        t0 = now
        if SEND_MS > 0 then deadline = t0 + SEND_MS end
    end
    if now >= deadline then
        if not draining then
            draining = true
            t_deadline, ok_at_deadline, responses_at_deadline = now, ok, responses
        end
        return 100000000 -- never: wrk stops long before
    end
    return 0
end

function request()
    if not started then
        -- wrk calls request() once before the run to check it: not sent, not counted.
        return build(INDEX_BASE + thread_id - 1)
    end
    local idx = INDEX_BASE + counter * NTHREADS + (thread_id - 1)
    counter = counter + 1
    sent = sent + 1
    return build(idx)
end

function response(status, headers, body)
    responses = responses + 1
    if status == 200 then ok = ok + 1 end
    statuses[status] = (statuses[status] or 0) + 1
    if TIMELINE then
        local key = floor((now_ms() - t0) / 1000) .. ":" .. status
        timeline[key] = (timeline[key] or 0) + 1
    end
end

-- ---------------------------------------------------------------- done (main state)

local function json_string(s)
    return '"' .. tostring(s):gsub('[%c"\\]', function(c) return string.format("\\u%04x", c:byte()) end) .. '"'
end

local function json_object(t)
    local keys = {}
    for key in pairs(t) do keys[#keys + 1] = key end
    table.sort(keys, function(a, b) return tostring(a) < tostring(b) end)
    local parts = {}
    for _, key in ipairs(keys) do
        parts[#parts + 1] = json_string(key) .. ":" .. string.format("%.17g", t[key])
    end
    return "{" .. concat(parts, ",") .. "}"
end

function done(summary, latency, requests)
    local all_statuses, all_timeline = {}, {}
    local total_sent, total_responses, total_ok, max_counter = 0, 0, 0, 0
    local first_t0, last_deadline, ok_before, responses_before, drained = math.huge, 0, 0, 0, true
    for _, thread in ipairs(threads) do
        for status, count in pairs(thread:get("statuses") or {}) do
            all_statuses[status] = (all_statuses[status] or 0) + count
        end
        for key, count in pairs(thread:get("timeline") or {}) do
            all_timeline[key] = (all_timeline[key] or 0) + count
        end
        total_sent = total_sent + thread:get("sent")
        total_responses = total_responses + thread:get("responses")
        total_ok = total_ok + thread:get("ok")
        max_counter = math.max(max_counter, thread:get("counter"))
        first_t0 = math.min(first_t0, thread:get("t0"))
        if thread:get("draining") then
            last_deadline = math.max(last_deadline, thread:get("t_deadline"))
            ok_before = ok_before + thread:get("ok_at_deadline")
            responses_before = responses_before + thread:get("responses_at_deadline")
        else
            drained = false
        end
    end
    local window_s
    if drained and last_deadline > first_t0 then
        window_s = (last_deadline - first_t0) / 1000
    else
        -- No send deadline (or a thread never reached it): the whole run.
        window_s, ok_before, responses_before = summary.duration / 1e6, total_ok, total_responses
    end
    local errors = summary.errors
    local fields = {
        '"requests":' .. summary.requests,
        '"sent":' .. total_sent,
        '"responses":' .. total_responses,
        '"ok":' .. total_ok,
        '"unanswered":' .. (total_sent - total_responses),
        '"window_s":' .. string.format("%.6f", window_s),
        '"ok_in_window":' .. ok_before,
        '"responses_in_window":' .. responses_before,
        '"index_base":' .. string.format("%.0f", INDEX_BASE),
        '"index_end":' .. string.format("%.0f", INDEX_BASE + max_counter * NTHREADS),
        '"statuses":' .. json_object(all_statuses),
        '"p50_ms":' .. string.format("%.3f", latency:percentile(50) / 1000),
        '"p90_ms":' .. string.format("%.3f", latency:percentile(90) / 1000),
        '"p99_ms":' .. string.format("%.3f", latency:percentile(99) / 1000),
        '"max_ms":' .. string.format("%.3f", latency.max / 1000),
        '"mean_ms":' .. string.format("%.3f", latency.mean / 1000),
        '"duration_s":' .. string.format("%.6f", summary.duration / 1e6),
        '"t0_monotonic_ms":' .. string.format("%.3f", first_t0),
        '"errors":' .. json_object({
            connect = errors.connect, read = errors.read, write = errors.write,
            status = errors.status, timeout = errors.timeout,
        }),
        '"timeline":' .. json_object(all_timeline),
    }
    io.write("BENCH_RESULT {" .. concat(fields, ",") .. "}\n")
end
