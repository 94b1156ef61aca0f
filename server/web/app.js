// The fleet page: sign in with an access key, then read the workers.* API every few seconds.
//
// Worker ids, tags, queues, tasks and metric keys are whatever daemons send: they only ever
// reach the page as text (textContent, text nodes, uPlot's labels, which are textContent too).
"use strict";

const REFRESH_SECONDS = 5;
const TOKEN_KEY = "workers-fleet-token"; // sessionStorage: gone with the tab, never in a URL
const ZONE_KEY = "workers-fleet-zone"; // localStorage: "utc" once chosen (the default is local time)
const TARGET_POINTS = 300;
const NICE_INTERVALS = [10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
const AUTO_SELECTED = 4; // workers charted before anyone picks some
const MAX_CHARTED = 10; // more series than this would not be read anyway
const ITEMS_PER_CALL = 30; // get_stats items (the server's default limit is 64)
const IDS_PER_CALL = 1000; // worker_ids of one get_activity_report (WORKERS_MAX_STATS_WORKER_IDS' default)
// Buckets across the GPU heatmap: at most about this many, whatever the range. 150 rather than
// 120 so that 24 h lands on 10-minute buckets, which the 10-minute rollups serve as they are
// (900 s would combine every worker's 1,440 minutes: 3x the time at 2,000 workers).
const HEATMAP_COLUMNS = 150;
const HEATMAP_HEIGHT = 320; // pixels at most: more workers than rows share a row (their mean)
const HEATMAP_ROW_PIXELS = 12; // at most, for a few workers
const CHART_HEIGHT = 200;
const TOP_WORKERS = 5; // in each busiest / idlest list
const IDLE_GPUS_SHOWN = 10; // the longest idle; the rest counted
const FIRST_CATEGORIES = ["cpu", "gpu", "memory"];
const PALETTE = [
  "#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#4d7c0f", "#9333ea", "#475569",
];
const UNITS = {
  cpu_usage: "%", gpu_usage: "%", cpu_temperature: "°C", gpu_temperature: "°C",
  memory_used: "MB", memory_free: "MB", gpu_memory_used: "MB", gpu_memory_free: "MB",
  network_rx: "MB/s", network_tx: "MB/s", disk_read: "MB/s", disk_write: "MB/s",
};

const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  session: 0, // changes at every sign-in and sign-out: answers for an older session are dropped
  range: 3600,
  sort: { key: "id", direction: 1 },
  selected: new Set(),
  selectionTouched: false,
  utc: localStorage.getItem(ZONE_KEY) === "utc",
  workers: [],
  health: null, // the rules get_all's extension `health` answers with
  queue: null, // the queue charted in the queue view
  busy: false, // a refresh is in flight
  again: false, // and another was asked for meanwhile
  timer: 0,
};

// --- the API -------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(code, subcode, message) {
    super(message);
    this.code = code;
    this.subcode = subcode;
  }
}

class Unreachable extends Error {}

async function post(endpoint, body, authorization) {
  let response;
  try {
    response = await fetch(endpoint, {
      method: "POST",
      headers: { "Content-Type": "application/json", Authorization: authorization },
      body: JSON.stringify(body),
      cache: "no-store",
      credentials: "omit",
    });
  } catch (error) {
    throw new Unreachable(error.message);
  }
  let envelope = null;
  try {
    envelope = await response.json();
  } catch {
    // not the API's answer (a proxy's error page, say)
  }
  const meta = envelope && envelope.meta;
  if (!meta) throw new ApiError(response.status, 0, `HTTP ${response.status}`);
  if (meta.result_code !== 200) throw new ApiError(meta.result_code, meta.result_subcode, meta.result_msg);
  return envelope.data;
}

const api = (endpoint, body) => post(endpoint, body, `Bearer ${state.token}`);

function basicAuthorization(key, secret) {
  const bytes = new TextEncoder().encode(`${key}:${secret}`);
  return "Basic " + btoa(Array.from(bytes, (byte) => String.fromCharCode(byte)).join(""));
}

function identityOf(token) {
  try {
    const part = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const bytes = Uint8Array.from(atob(part.padEnd(Math.ceil(part.length / 4) * 4, "=")), (c) => c.charCodeAt(0));
    return JSON.parse(new TextDecoder().decode(bytes)).identity || {};
  } catch {
    return {};
  }
}

// --- signing in and out --------------------------------------------------------------------

function showSignInMessage(text) {
  $("sign-in-message").textContent = text;
  $("sign-in-message").hidden = !text;
}

function signInProblem(error) {
  if (error instanceof Unreachable) return "Cannot reach the server. Check that it is running and try again.";
  if (error.code === 401) return "Wrong access key or secret.";
  if (error.code === 503) return "The server is unavailable right now (503). Try again in a moment.";
  return `Sign-in failed: ${error.message}`;
}

async function signIn(event) {
  event.preventDefault();
  const button = $("sign-in-button");
  button.disabled = true;
  showSignInMessage("");
  try {
    const data = await post("auth.login", {}, basicAuthorization($("access-key").value.trim(), $("secret-key").value));
    $("secret-key").value = "";
    startSession(data.token);
  } catch (error) {
    showSignInMessage(signInProblem(error));
  } finally {
    button.disabled = false;
  }
}

function startSession(token) {
  state.token = token;
  state.session += 1;
  sessionStorage.setItem(TOKEN_KEY, token);
  const identity = identityOf(token);
  $("identity").textContent = [identity.user_name, identity.company_name].filter(Boolean).join(" · ");
  $("sign-in-view").hidden = true;
  $("fleet-view").hidden = false;
  $("sign-out").hidden = false;
  refresh();
}

function signOut(message = "") {
  state.token = null;
  state.session += 1;
  sessionStorage.removeItem(TOKEN_KEY);
  clearTimeout(state.timer);
  state.workers = [];
  state.health = null;
  state.selected.clear();
  state.selectionTouched = false;
  for (const id of [...charts.keys()]) removeChart(id);
  rows.clear();
  document.querySelector("#workers tbody").replaceChildren();
  $("count").textContent = "";
  renderHealth();
  $("identity").textContent = "";
  showProblem(null);
  $("fleet-view").hidden = true;
  $("sign-out").hidden = true;
  $("sign-in-view").hidden = false;
  showSignInMessage(message);
  $("access-key").focus();
}

// --- refreshing ----------------------------------------------------------------------------

// One refresh at a time: a refresh asked for while one is in flight runs right after it,
// and the next periodic one is scheduled only once the last has finished.
async function refresh() {
  if (state.busy) {
    state.again = true;
    return;
  }
  clearTimeout(state.timer);
  state.busy = true;
  state.again = false;
  const session = state.session;
  try {
    await load(session);
    if (session === state.session) showProblem(null);
  } catch (error) {
    if (session === state.session) handleFailure(error);
  } finally {
    state.busy = false;
    if (state.token) {
      if (state.again) refresh();
      else state.timer = setTimeout(refresh, REFRESH_SECONDS * 1000);
    }
  }
}

function handleFailure(error) {
  if (error instanceof Unreachable) {
    showProblem(`Cannot reach the server. Retrying every ${REFRESH_SECONDS} s…`);
  } else if (error instanceof ApiError && error.code === 401) {
    signOut(`Signed out: the server no longer accepts this session (${error.message}). Sign in again.`);
  } else if (error instanceof ApiError && error.code === 503) {
    showProblem(`The server is unavailable (503: ${error.message}). Retrying every ${REFRESH_SECONDS} s…`);
  } else if (error instanceof ApiError) {
    showProblem(`The server answered ${error.code}/${error.subcode}: ${error.message}`);
  } else {
    console.error(error);
    showProblem(`The page failed: ${error.message}`);
  }
}

function showProblem(text) {
  $("problem").textContent = text || "";
  $("problem").hidden = !text;
  $("fleet-view").classList.toggle("stale", Boolean(text));
}

function workerFilter() {
  const filter = {};
  const tags = $("tag-filter").value.split(/[\s,]+/).filter(Boolean);
  if (tags.length) filter.tags = tags;
  const pattern = $("worker-pattern").value.trim();
  if (pattern) filter.worker_pattern = pattern;
  return filter;
}

// The range ends now, its last bucket included while it fills (the extension
// include_partial_bucket: the API leaves it out by default), so that every range shows the
// newest reports.
function chartSpan() {
  const now = Math.floor(Date.now() / 1000);
  const interval = niceInterval(state.range / TARGET_POINTS);
  return { from_date: now - state.range, to_date: now, interval, include_partial_bucket: true };
}

const niceInterval = (wanted) => NICE_INTERVALS.find((nice) => nice >= wanted) || Math.ceil(wanted);

// Worker ids in lists of at most IDS_PER_CALL (the server's bound on worker_ids).
const idLists = (ids) => Array.from({ length: Math.ceil(ids.length / IDS_PER_CALL) }, (_, i) =>
  ids.slice(i * IDS_PER_CALL, (i + 1) * IDS_PER_CALL));

async function load(session) {
  const filter = workerFilter();
  const filtered = Object.keys(filter).length > 0;
  const span = chartSpan();
  const [all, count, everyone] = await Promise.all([
    api("workers.get_all", { ...filter, last_seen: 0, health: true }), // the extension: silent, idle GPUs
    api("workers.get_count", filter),
    filtered ? null : api("workers.get_activity_report", span),
  ]);
  if (session !== state.session) return;
  state.workers = all.workers;
  state.health = all.health;
  $("count").textContent = `${count.count} worker${count.count === 1 ? "" : "s"}`;
  renderTable();
  renderHealth();
  // With a filter, the activity is that of the workers in the table (the extension worker_ids).
  const activity = filtered ? await activityOf(state.workers.map((w) => w.id), span) : everyone;
  if (session !== state.session) return;
  renderActivity(activity, span, filtered);
  const queues = await api("workers.get_queues", span); // the extension: every worker's queues
  if (session !== state.session) return;
  renderQueues(queues, span);
  // A fleet of more workers than one call may name is asked in lists of the table's workers:
  // each call stays within WORKERS_MAX_STATS_SERIES_BUCKETS (2,000 workers x 144 buckets
  // of 24 h is past its default).
  const large = state.workers.length > IDS_PER_CALL;
  const heat = await gpuHeatmap(filtered || large ? state.workers.map((w) => w.id) : null, span);
  if (session !== state.session) return;
  renderHeatmap(heat);
  const charted = chartedWorkers();
  const metrics = charted.length ? await metricStats(charted, span) : { keys: [], workers: [] };
  if (session !== state.session) return;
  renderMetrics(charted, metrics, span);
}

// Disjoint sets of workers: their counts add up. Later calls ask for the interval the first
// answer came at, and are summed by date.
async function activityOf(ids, span) {
  if (!ids.length) return null;
  const [head, ...tail] = idLists(ids);
  const first = await api("workers.get_activity_report", { ...span, worker_ids: head });
  const dates = first.total.dates;
  const step = dates.length > 1 ? (dates[1] - dates[0]) / 1000 : span.interval;
  const rest = tail.map((list) => api("workers.get_activity_report", { ...span, interval: step, worker_ids: list }));
  for (const answer of await Promise.all(rest)) {
    for (const name of ["total", "active"]) {
      const byDate = new Map(answer[name].dates.map((date, i) => [date, answer[name].counts[i]]));
      first[name].counts = first[name].counts.map((count, i) => count + (byDate.get(dates[i]) || 0));
    }
  }
  return first;
}

function orderedMetricKeys(categories) {
  const rank = (name) => (FIRST_CATEGORIES.includes(name) ? FIRST_CATEGORIES.indexOf(name) : FIRST_CATEGORIES.length);
  return [...categories]
    .sort((a, b) => rank(a.name) - rank(b.name) || compareText(a.name, b.name))
    .flatMap((category) => [...category.metric_keys].sort(compareText));
}

async function metricStats(workerIds, span) {
  let keys;
  try {
    keys = orderedMetricKeys((await api("workers.get_metric_keys", { worker_ids: workerIds })).categories);
  } catch (error) {
    if (error instanceof ApiError && error.code === 400 && error.subcode === 1005) return { keys: [], workers: [] };
    throw error;
  }
  // One worker: its min and max around the average, and its GPU metrics per GPU
  // (split_by_variant); several: the average of each. A few keys per call, within the
  // server's limits on items and series per get_stats.
  const single = workerIds.length === 1;
  const perGpu = single ? keys.filter(isGpuKey) : [];
  const aggregations = single ? ["avg", "min", "max"] : ["avg"];
  const calls = [
    ...statsCalls(keys.filter((key) => !perGpu.includes(key)), aggregations, workerIds, span, false),
    ...statsCalls(perGpu, ["avg"], workerIds, span, true),
  ];
  const answers = await Promise.all(calls);
  const partial = answers.find((answer) => answer.partial_since !== undefined);
  return { keys, workers: answers.flatMap((answer) => answer.workers), partialSince: partial?.partial_since };
}

const isGpuKey = (key) => key.startsWith("gpu_");

function statsCalls(keys, aggregations, workerIds, span, splitByVariant) {
  const perCall = Math.max(1, Math.floor(ITEMS_PER_CALL / aggregations.length));
  const calls = [];
  for (let i = 0; i < keys.length; i += perCall) {
    const items = keys.slice(i, i + perCall).flatMap((key) => aggregations.map((aggregation) => ({ key, aggregation })));
    // null where a worker sent nothing (the extension empty_buckets): gaps, not zeros
    const body = { ...span, worker_ids: workerIds, items, empty_buckets: "null", split_by_variant: splitByVariant };
    calls.push(api("workers.get_stats", body));
  }
  return calls;
}

// Every worker's GPU utilisation (its GPUs' average) at about HEATMAP_COLUMNS buckets: of
// the table's workers when filtered (lists of at most IDS_PER_CALL), else of every worker.
async function gpuHeatmap(ids, span) {
  if (ids && !ids.length) return [];
  const interval = niceInterval(state.range / HEATMAP_COLUMNS);
  const body = { ...span, interval, items: [{ key: "gpu_usage", aggregation: "avg" }], empty_buckets: "null" };
  const lists = ids ? idLists(ids) : [undefined];
  const answers = await Promise.all(lists.map((list) => api("workers.get_stats", { ...body, worker_ids: list })));
  return answers.flatMap((answer) => answer.workers).flatMap((worker) => {
    const metric = worker.metrics.find((m) => m.metric === "gpu_usage" && m.variant === undefined);
    return metric ? [{ id: worker.worker, dates: metric.dates, values: metric.stats[0].values }] : [];
  });
}

// --- the table -----------------------------------------------------------------------------

const collator = new Intl.Collator(undefined, { numeric: true });
const compareText = (a, b) => collator.compare(a, b);

const idsOf = (items) => (items || []).map((item) => item.id);

// What tells a worker's health first (on a phone the rest scrolls sideways).
const COLUMNS = [
  { key: "id", className: "worker", text: (w) => w.id },
  // Silent workers first (the longest silent first), then the newest report; the oldest
  // registration first.
  { key: "last_report", className: "", text: (w) => (isSilent(w) ? "silent " : "") + ago(w.last_report_time),
    order: (w) => (isSilent(w) ? timeOf(w.last_report_time) - SILENT_FIRST : -timeOf(w.last_report_time)),
    title: lastReportTitle, render: renderLastReport },
  { key: "task", className: "mono clip", text: (w) => (w.task ? w.task.id : "") },
  { key: "queue", className: "", text: (w) => (w.queue ? w.queue.id : idsOf(w.queues).join(", ")) },
  { key: "tags", className: "tags", text: (w) => (w.tags || []).join(" "), render: renderTags },
  { key: "ip", className: "mono", text: (w) => w.ip || "" },
  { key: "registered", className: "", text: (w) => (w.register_time ? formatTime(timeOf(w.register_time)) : ""),
    order: (w) => timeOf(w.register_time) },
];

const rows = new Map(); // worker id -> {row, checkbox, cells, shown}: rows are updated in place

// --- health: silent workers (get_all's extension `health`) ----------------------------------------

const SILENT_FIRST = 1e14; // ms: sorts a silent worker's last report before any other's
const isSilent = (w) => Boolean(w.health && w.health.silent);

// "30 s", "4.5 s", "12 min": a period or a duration, roughly.
function roughDuration(seconds) {
  if (seconds < 10) return `${+seconds.toFixed(1)} s`;
  if (seconds < 120) return `${Math.round(seconds)} s`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min`;
  return `${Math.round(seconds / 3600)} h`;
}

function lastReportTitle(w) {
  if (!w.last_report_time) return "";
  const when = `${formatTime(timeOf(w.last_report_time))} ${zoneLabel()}`;
  const period = w.health?.report_period;
  if (period == null) return when;
  const pace = `it reports every ~${roughDuration(period)}`;
  if (!isSilent(w)) return `${when}; ${pace}`;
  const periods = state.health ? `${state.health.silent_periods} of its report periods` : "several of its periods";
  return `Silent since ${formatTime(timeOf(w.health.silent_since))}: no report for ${periods} (${pace}). Last report ${when}`;
}

function renderLastReport(cell, w) {
  if (!isSilent(w)) {
    cell.textContent = ago(w.last_report_time);
    return;
  }
  const mark = document.createElement("span");
  mark.className = "silent-mark";
  mark.textContent = "silent";
  cell.replaceChildren(mark, document.createTextNode(` ${ago(w.last_report_time)}`));
}

function timeOf(iso) {
  const time = iso ? Date.parse(iso) : NaN;
  return Number.isNaN(time) ? 0 : time;
}

function ago(iso) {
  if (!iso) return "never";
  const seconds = Math.max(0, Math.round((Date.now() - timeOf(iso)) / 1000));
  if (seconds < 60) return `${seconds} s ago`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h ago`;
  return `${Math.floor(seconds / 86400)} d ago`;
}

// --- time: one format (2026-12-07 14:05:09), in UTC or local time, the zone always said ------

const pad = (n) => String(n).padStart(2, "0");

function timeParts(ms) {
  const t = new Date(ms);
  return state.utc
    ? [t.getUTCFullYear(), t.getUTCMonth() + 1, t.getUTCDate(), t.getUTCHours(), t.getUTCMinutes(), t.getUTCSeconds()]
    : [t.getFullYear(), t.getMonth() + 1, t.getDate(), t.getHours(), t.getMinutes(), t.getSeconds()];
}

// The whole format, or the part a chart's axis needs: "date", "time" (HH:MM), "seconds".
function formatTime(ms, part = "full") {
  const [year, month, day, hours, minutes, secs] = timeParts(ms);
  const date = `${year}-${pad(month)}-${pad(day)}`;
  const time = `${pad(hours)}:${pad(minutes)}`;
  if (part === "date") return date;
  if (part === "day-time") return `${pad(month)}-${pad(day)} ${time}`;
  if (part === "time") return time;
  if (part === "seconds") return `${time}:${pad(secs)}`;
  return `${date} ${time}:${pad(secs)}`;
}

function utcOffset() {
  const minutes = -new Date().getTimezoneOffset();
  const sign = minutes < 0 ? "−" : "+";
  return `UTC${sign}${pad(Math.floor(Math.abs(minutes) / 60))}:${pad(Math.abs(minutes) % 60)}`;
}

function zoneLabel() {
  if (state.utc) return "UTC";
  const name = Intl.DateTimeFormat().resolvedOptions().timeZone;
  return name && name !== "UTC" && name !== "Etc/UTC" ? `${name} (${utcOffset()})` : utcOffset();
}

function setZone(utc) {
  state.utc = utc;
  if (utc) localStorage.setItem(ZONE_KEY, "utc");
  else localStorage.removeItem(ZONE_KEY);
  showZone();
  for (const entry of rows.values()) entry.shown = []; // rewrite every time shown
  for (const id of [...charts.keys()]) removeChart(id); // axes in the other zone
  renderTable();
  refresh();
}

function showZone() {
  for (const button of document.querySelectorAll("[data-zone]")) {
    button.setAttribute("aria-pressed", String((button.dataset.zone === "utc") === state.utc));
  }
  $("zone-note").textContent = `times in ${zoneLabel()}`;
}

function renderTags(cell, worker) {
  const chips = (worker.tags || []).flatMap((tag, i) => {
    const chip = document.createElement("span");
    chip.className = "tag";
    chip.textContent = tag;
    return i ? [document.createTextNode(" "), chip] : [chip];
  });
  cell.replaceChildren(...chips);
}

function sortedWorkers() {
  const column = COLUMNS.find((c) => c.key === state.sort.key);
  const value = column.order || column.text;
  const compare = (a, b) => {
    const x = value(a), y = value(b);
    return typeof x === "number" ? x - y : compareText(x, y);
  };
  return [...state.workers].sort((a, b) => state.sort.direction * compare(a, b) || compareText(a.id, b.id));
}

function createRow(id) {
  const row = document.createElement("tr");
  const selectCell = document.createElement("td");
  selectCell.className = "select";
  const checkbox = document.createElement("input");
  checkbox.type = "checkbox";
  checkbox.setAttribute("aria-label", `Chart ${id}`);
  checkbox.addEventListener("change", () => selectWorkers([id], checkbox.checked));
  selectCell.append(checkbox);
  row.append(selectCell);
  const cells = COLUMNS.map((column) => {
    const cell = document.createElement("td");
    cell.className = column.className;
    row.append(cell);
    return cell;
  });
  return { row, checkbox, cells, shown: [] };
}

function updateRow(entry, worker) {
  COLUMNS.forEach((column, i) => {
    const text = column.text(worker);
    if (entry.shown[i] === text) return;
    entry.shown[i] = text;
    const cell = entry.cells[i];
    if (column.render) column.render(cell, worker);
    else cell.textContent = text;
    cell.title = column.title ? column.title(worker) : text;
  });
  entry.checkbox.checked = state.selected.has(worker.id);
  entry.row.classList.toggle("silent", isSilent(worker));
}

function renderTable() {
  const workers = sortedWorkers();
  if (!state.selectionTouched && !workers.some((w) => state.selected.has(w.id))) {
    workers.slice(0, AUTO_SELECTED).forEach((w) => state.selected.add(w.id));
  }
  const seen = new Set();
  const ordered = workers.map((worker) => {
    seen.add(worker.id);
    let entry = rows.get(worker.id);
    if (!entry) rows.set(worker.id, (entry = createRow(worker.id)));
    updateRow(entry, worker);
    return entry.row;
  });
  for (const id of [...rows.keys()]) if (!seen.has(id)) rows.delete(id);
  const body = document.querySelector("#workers tbody");
  if (ordered.length !== body.children.length || ordered.some((row, i) => body.children[i] !== row)) {
    body.replaceChildren(...ordered);
  }
  $("no-workers").hidden = workers.length > 0;
  const silent = workers.filter(isSilent).length;
  $("silent-count").textContent = `${silent} silent`;
  $("silent-count").hidden = silent === 0;
  const selectedShown = workers.filter((w) => state.selected.has(w.id)).length;
  $("select-all").checked = workers.length > 0 && selectedShown === workers.length;
  $("select-all").indeterminate = selectedShown > 0 && selectedShown < workers.length;
  for (const th of document.querySelectorAll("#workers th[data-sort]")) {
    if (th.dataset.sort !== state.sort.key) th.removeAttribute("aria-sort");
    else th.setAttribute("aria-sort", state.sort.direction > 0 ? "ascending" : "descending");
  }
}

function chartedWorkers() {
  return sortedWorkers().map((w) => w.id).filter((id) => state.selected.has(id)).slice(0, MAX_CHARTED);
}

function selectWorkers(ids, selected) {
  state.selectionTouched = true;
  for (const id of ids) {
    if (selected) state.selected.add(id);
    else state.selected.delete(id);
  }
  renderTable();
  refresh();
}

function showSilentFirst() {
  state.sort = { key: "last_report", direction: 1 };
  renderTable();
}

function sortBy(key) {
  state.sort = { key, direction: state.sort.key === key ? -state.sort.direction : 1 };
  renderTable();
}

// --- the health panel: idle GPUs, the busiest and idlest workers ------------------------------

// An <ol> of [name, detail, value] items, `more` (a count of those left out) after them.
function fillList(list, items, more = "") {
  const entries = items.map(([name, detail, value]) => {
    const item = document.createElement("li");
    const parts = [["name", name], ["detail", detail], ["value", value]].filter(([, text]) => text);
    item.append(...parts.map(([className, text]) => {
      const part = document.createElement("span");
      part.className = className;
      part.textContent = text;
      if (className === "name") part.title = text; // an id too long for the list is cut short
      return part;
    }));
    return item;
  });
  if (!items.length || more) {
    const item = document.createElement("li");
    item.className = "empty";
    item.textContent = items.length ? more : "none";
    entries.push(item);
  }
  list.replaceChildren(...entries);
}

const percent = (value) => `${value.toFixed(value >= 10 ? 0 : 1)} %`;

function idleFor(since) {
  return roughDuration(Math.max(0, (Date.now() - since) / 1000));
}

// From the table's workers: their idle GPUs, the longest idle first, and, of those not
// silent, the TOP_WORKERS with the highest and lowest mean CPU and GPU usage.
function renderHealth() {
  const rules = state.health;
  $("health-rules").textContent = rules
    ? `Silent: no report for ${rules.silent_periods} of its own report periods. Idle GPU: below ` +
      `${rules.idle_gpu_percent} % in every report for ${rules.idle_gpu_minutes} min. Busiest and idlest: ` +
      `mean usage over about the last ${rules.utilisation_minutes} min, silent workers left out.`
    : "";
  const gpus = state.workers.flatMap((w) => (w.health ? w.health.gpus.map((gpu) => ({ worker: w.id, ...gpu })) : []));
  const idle = gpus.filter((gpu) => gpu.idle).map((gpu) => ({ ...gpu, since: timeOf(gpu.below_threshold_since) }));
  idle.sort((a, b) => a.since - b.since || compareText(a.worker, b.worker) || a.index - b.index);
  const more = idle.length > IDLE_GPUS_SHOWN ? `and ${idle.length - IDLE_GPUS_SHOWN} more` : "";
  fillList($("idle-gpus"), idle.slice(0, IDLE_GPUS_SHOWN).map((gpu) => [gpu.worker, `GPU ${gpu.index}`, idleFor(gpu.since)]), more);
  $("idle-gpu-count").textContent = gpus.length ? `${idle.length} of ${gpus.length}` : "";
  const silent = state.workers.filter(isSilent).length;
  $("health-note").textContent = rules ? `${silent} silent of ${state.workers.length} workers in the table` : "";
  const heard = state.workers.filter((w) => w.health && !w.health.silent);
  for (const kind of ["cpu", "gpu"]) {
    const key = `${kind}_usage`;
    const ranked = heard.filter((w) => w.health[key] != null);
    const listed = (direction) => [...ranked]
      .sort((a, b) => direction * (a.health[key] - b.health[key]) || compareText(a.id, b.id))
      .slice(0, TOP_WORKERS)
      .map((w) => [w.id, "", percent(w.health[key])]);
    fillList($(`busiest-${kind}`), listed(-1));
    fillList($(`idlest-${kind}`), listed(1));
  }
}

// --- the charts ----------------------------------------------------------------------------

// chart id -> {plot, figure, body, legend, signature, ...}: redrawn with setData, not rebuilt
const charts = new Map();

const resizer = new ResizeObserver((entries) => {
  for (const entry of entries) {
    const chart = [...charts.values()].find((c) => c.body === entry.target);
    const width = Math.floor(entry.contentRect.width);
    if (chart && width > 0 && width !== chart.plot.width) chart.plot.setSize({ width, height: CHART_HEIGHT });
  }
});

function formatValue(value, unit) {
  if (value == null) return "–";
  const digits = Math.abs(value) >= 100 ? 0 : Math.abs(value) >= 10 ? 1 : 2;
  return `${value.toFixed(digits)}${unit ? ` ${unit}` : ""}`;
}

// Axis ticks in a few characters: 125000 MB is 125k.
function tickText(value) {
  const size = Math.abs(value);
  if (size >= 1e9) return `${+(value / 1e9).toFixed(1)}G`;
  if (size >= 1e6) return `${+(value / 1e6).toFixed(1)}M`;
  if (size >= 1e4) return `${+(value / 1e3).toFixed(1)}k`;
  return `${+value.toFixed(2)}`;
}

// Time ticks: the part of the page's one format that the tick spacing needs.
function timeTicks(u, splits, axis, space, increment) {
  const days = (u.scales.x.max - u.scales.x.min) > 86400;
  const part = increment >= 86400 ? "date" : increment < 60 ? "seconds" : days ? "day-time" : "time";
  return splits.map((split) => formatTime(split * 1000, part));
}

// uPlot lays ticks out on dates it gets from here: the page's zone, not always the browser's.
const zonedDate = (seconds) => (state.utc ? uPlot.tzDate(new Date(seconds * 1000), "Etc/UTC") : new Date(seconds * 1000));

function seriesOptions(label, color, unit, extra = {}) {
  return { label, stroke: color, width: 1.5, unit, points: { show: false }, ...extra };
}

function chartOptions(width, series, bands, marks) {
  return {
    width,
    height: CHART_HEIGHT,
    tzDate: zonedDate,
    // A dot marks the last, partial bucket's value (filled while the bucket lasts).
    series: [{}, ...series.map((s) => ({ ...s, points: { show: false, size: 7, filter: () => marks() } }))],
    bands,
    scales: { x: { time: true }, y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.05 : 1] } },
    axes: [{ values: timeTicks }, { size: 50, values: (u, ticks) => ticks.map(tickText) }],
    cursor: { drag: { x: false, y: false } }, // no zooming: the next refresh would undo it
    legend: { show: false }, // the page's own, compact and readable without hovering
  };
}

function removeChart(id) {
  const chart = charts.get(id);
  if (!chart) return;
  resizer.unobserve(chart.body);
  chart.plot.destroy();
  chart.figure.remove();
  charts.delete(id);
}

// The legend under a chart: a swatch, a label and a value per series: at the cursor (a
// touch moves it too), else the newest value each series has.
function makeLegend(series) {
  const legend = document.createElement("div");
  legend.className = "legend";
  const when = document.createElement("span");
  when.className = "legend-time";
  legend.append(when);
  const values = series.map((s) => {
    const item = document.createElement("span");
    item.className = "legend-item";
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = s.stroke;
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = s.label;
    const value = document.createElement("span");
    value.className = "value";
    item.append(swatch, name, value);
    legend.append(item);
    return value;
  });
  return { legend, when, values };
}

function updateLegend(chart) {
  const { plot, series } = chart;
  const [xs, ...columns] = plot.data;
  const touched = chart.touched == null ? -1 : xs.indexOf(chart.touched);
  const at = plot.cursor.idx ?? (touched >= 0 ? touched : null);
  if (at != null && xs[at] != null) {
    chart.when.textContent = formatTime(xs[at] * 1000);
    columns.forEach((column, i) => (chart.values[i].textContent = formatValue(column[at], series[i].unit)));
    return;
  }
  chart.when.textContent = "newest:";
  columns.forEach((column, i) => {
    let last = column.length - 1;
    while (last >= 0 && column[last] == null) last -= 1;
    chart.values[i].textContent = formatValue(last >= 0 ? column[last] : null, series[i].unit);
  });
}

// A touch picks the time whose values the legend shows (uPlot's cursor follows a mouse only),
// until the next touch; the page still scrolls.
function followTouches(chart) {
  const { plot } = chart;
  const move = (event) => {
    const touch = event.touches[0];
    if (!touch) return;
    const box = plot.over.getBoundingClientRect();
    const left = touch.clientX - box.left;
    chart.touched = plot.data[0][plot.posToIdx(left)] ?? null;
    plot.setCursor({ left, top: touch.clientY - box.top });
    updateLegend(chart);
  };
  plot.over.addEventListener("touchstart", move, { passive: true });
  plot.over.addEventListener("touchmove", move, { passive: true });
}

function bucketText(xs, fallback) {
  return `${durationText(xs.length > 1 ? xs[1] - xs[0] : fallback)} buckets`;
}

// Draws `data` ([x seconds, ...series values]) into the chart `id`, made if missing and
// remade only when its series change; `partialSince` (seconds) marks a last bucket still
// filling. Returns the chart's figure.
function drawChart(id, parent, title, series, data, bands, span, partialSince) {
  const signature = JSON.stringify([title, series.map((s) => [s.label, s.unit]), state.utc]);
  let chart = charts.get(id);
  if (chart && chart.signature !== signature) {
    removeChart(id);
    chart = null;
  }
  if (!chart) {
    const figure = document.createElement("figure");
    figure.className = "chart";
    const caption = document.createElement("figcaption");
    const name = document.createElement("span");
    name.className = "chart-title";
    name.textContent = title;
    const note = document.createElement("span");
    note.className = "chart-note note";
    caption.append(name, note);
    const body = document.createElement("div");
    body.className = "chart-body";
    const { legend, when, values } = makeLegend(series);
    figure.append(caption, body, legend);
    parent.append(figure);
    chart = { figure, body, note, when, values, series, signature, mark: null, touched: null };
    const width = Math.max(200, Math.floor(body.getBoundingClientRect().width));
    const options = chartOptions(width, series, bands, () => (chart.mark == null ? null : [chart.mark]));
    options.hooks = { setCursor: [() => updateLegend(chart)] };
    chart.plot = new uPlot(options, data, body);
    followTouches(chart);
    charts.set(id, chart);
    resizer.observe(body);
  }
  const xs = data[0];
  chart.mark = partialSince != null && xs.length && xs[xs.length - 1] === partialSince ? xs.length - 1 : null;
  chart.plot.setData(data);
  updateLegend(chart);
  const partial = chart.mark == null ? "" : `; the last (from ${formatTime(partialSince * 1000, "time")}) still filling`;
  chart.note.textContent = xs.length ? `${bucketText(xs, span.interval)}${partial}` : "";
  // What the chart holds, for a glance in the developer tools (and the browser tests).
  const values = data.slice(1).flat();
  chart.figure.dataset.points = String(xs.length);
  chart.figure.dataset.nonzero = String(values.filter((v) => v).length);
  chart.figure.dataset.empty = String(values.filter((v) => v == null).length);
  chart.figure.dataset.from = String(xs[0] ?? "");
  chart.figure.dataset.to = String(xs[xs.length - 1] ?? "");
  chart.figure.dataset.partial = chart.mark == null ? "" : String(partialSince);
  chart.figure.dataset.last = JSON.stringify(data.slice(1).map((column) => column[column.length - 1] ?? null));
  chart.figure.dataset.peaks = JSON.stringify(data.slice(1).map((column) => Math.max(0, ...column.filter((v) => v != null))));
  return chart.figure;
}

const seconds = (dates) => dates.map((d) => d / 1000); // the API's chart dates are milliseconds

function durationText(seconds) {
  if (seconds % 86400 === 0) return `${seconds / 86400} d`;
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

function rangeText() {
  return $("fleet-view").querySelector(`[data-range="${state.range}"]`).textContent;
}

function renderActivity(activity, span, filtered) {
  const who = filtered ? `the ${state.workers.length} workers in the table` : "every worker";
  $("range-note").textContent = `last ${rangeText()}, ${who}`;
  const total = activity ? activity.total : { dates: [], counts: [] };
  const active = activity ? activity.active : { dates: [], counts: [] };
  const partialSince = activity?.partial_since === undefined ? null : activity.partial_since / 1000;
  drawChart("activity", $("activity-chart"), "", [
    seriesOptions("reporting", PALETTE[0], "", { fill: "rgba(37, 99, 235, 0.08)" }),
    seriesOptions("with a task", PALETTE[2], "", { fill: "rgba(5, 150, 105, 0.12)" }),
  ], [seconds(total.dates), total.counts, active.counts], undefined, span, partialSince);
}

// The queue table (now), and the chosen queue's workers listening and busy over the range.
function renderQueues(answer, span) {
  const entries = answer.queues;
  if (!entries.some((q) => q.queue === state.queue)) state.queue = entries.length ? entries[0].queue : null;
  $("queues").tBodies[0].replaceChildren(...entries.map((q) => {
    const row = document.createElement("tr");
    row.dataset.queue = q.queue;
    row.classList.toggle("chosen", q.queue === state.queue);
    const busyShare = q.live.workers ? percent((100 * q.busy.workers) / q.live.workers) : "–";
    const memory = q.live.memory ? `${Math.round(q.live.memory / 1024)} GB` : "–";
    for (const value of [q.queue, q.live.workers, q.busy.workers, q.idle.workers, busyShare, q.live.cores,
      q.live.gpus, memory]) {
      const cell = document.createElement("td");
      cell.textContent = String(value);
      row.append(cell);
    }
    return row;
  }));
  // One handler for the rows, which each refresh replaces: a click between two still counts.
  $("queues").tBodies[0].onclick = (event) => {
    const row = event.target.closest("tr");
    if (!row) return;
    state.queue = row.dataset.queue;
    renderQueues(answer, span);
  };
  $("no-queues").hidden = entries.length > 0;
  $("queue-note").textContent = `last ${rangeText()}, every worker`;
  const chosen = entries.find((q) => q.queue === state.queue);
  const chart = chosen && chosen.chart ? chosen.chart : { listening: [], busy: [] };
  const partialSince = answer.partial_since === undefined ? null : answer.partial_since / 1000;
  drawChart("queue", $("queue-chart"), chosen ? chosen.queue : "", [
    seriesOptions("listening", PALETTE[0], "", { fill: "rgba(37, 99, 235, 0.08)" }),
    seriesOptions("busy", PALETTE[2], "", { fill: "rgba(5, 150, 105, 0.12)" }),
  ], [seconds(answer.dates || []), chart.listening, chart.busy], undefined, span, partialSince);
}

// get_stats answers per worker and metric (and variant, when split); a chart is per metric,
// with a series per worker, or per GPU of one worker.
function metricSeries(stats, key, workerIds) {
  const dates = new Set();
  const byWorker = new Map();
  const variants = new Map(); // of a metric split by variant: variant -> values
  for (const worker of stats) {
    for (const metric of worker.metrics.filter((m) => m.metric === key)) {
      metric.dates.forEach((d) => dates.add(d));
      const valueAt = (stat) => new Map(metric.dates.map((date, i) => [date, stat.values[i]]));
      const values = Object.fromEntries(metric.stats.map((stat) => [stat.aggregation, valueAt(stat)]));
      if (metric.variant === undefined) byWorker.set(worker.worker, values);
      else variants.set(metric.variant, values);
    }
  }
  const xs = [...dates].sort((a, b) => a - b);
  const charted = workerIds.filter((id) => byWorker.has(id));
  const column = (values, aggregation) => xs.map((d) => values[aggregation]?.get(d) ?? null);
  return {
    xs,
    charted,
    variants: [...variants.keys()],
    column: (id, aggregation) => column(byWorker.get(id), aggregation),
    variantColumn: (variant) => column(variants.get(variant), "avg"),
  };
}

function renderMetrics(workerIds, metrics, span) {
  const parent = $("metric-charts");
  const ticked = state.workers.filter((w) => state.selected.has(w.id)).length;
  const howMany = ticked > workerIds.length ? `the first ${workerIds.length} of ${ticked} ticked` : workerIds.length;
  const perGpu = metrics.keys.some(isGpuKey) ? "; GPU metrics per GPU (averages)" : "";
  const what = workerIds.length === 1 ? `${workerIds[0]}: min, average and max${perGpu}` : `${howMany} charted: averages`;
  $("metrics-note").textContent = workerIds.length
    ? `${what}; gaps where nothing was reported`
    : "none: tick workers in the table to chart them";
  const partialSince = metrics.partialSince === undefined ? null : metrics.partialSince / 1000;
  const figures = [];
  for (const key of metrics.keys) {
    const unit = UNITS[key] || "";
    const { xs, charted, variants, column, variantColumn } = metricSeries(metrics.workers, key, workerIds);
    if (!charted.length && !variants.length) continue;
    const title = unit ? `${key} (${unit})` : key;
    let series, data, bands;
    if (variants.length) {
      // One worker's GPU metric, a series per GPU ("total": sent as one number, not a list).
      series = variants.map((variant, i) =>
        seriesOptions(variant === "total" ? "total" : `GPU ${variant}`, PALETTE[i % PALETTE.length], unit));
      data = [seconds(xs), ...variants.map(variantColumn)];
    } else if (workerIds.length === 1) {
      const id = charted[0];
      series = [
        seriesOptions("avg", PALETTE[0], unit),
        seriesOptions("min", PALETTE[0], unit, { width: 1, dash: [4, 4] }),
        seriesOptions("max", PALETTE[0], unit, { width: 1, dash: [4, 4] }),
      ];
      data = [seconds(xs), column(id, "avg"), column(id, "min"), column(id, "max")];
      bands = [{ series: [3, 2], fill: "rgba(37, 99, 235, 0.1)" }];
    } else {
      // A worker keeps its colour in every chart, those of metrics it lacks included.
      series = charted.map((id) => seriesOptions(id, PALETTE[workerIds.indexOf(id) % PALETTE.length], unit));
      data = [seconds(xs), ...charted.map((id) => column(id, "avg"))];
    }
    figures.push(drawChart(`metric:${key}`, parent, title, series, data, bands, span, partialSince));
  }
  const keep = new Set(figures);
  for (const [id, chart] of [...charts]) if (id.startsWith("metric:") && !keep.has(chart.figure)) removeChart(id);
  if (figures.some((figure, i) => parent.children[i] !== figure)) parent.replaceChildren(...figures);
}

// --- the GPU heatmap: a row per worker (busiest first), a column per bucket ---------------

const heatmap = { rows: [], dates: [], groups: 1 };

// White (idle) to dark blue (busy); no report: grey.
function heatColor(value) {
  if (value == null) return [228, 231, 236];
  const t = Math.max(0, Math.min(1, value / 100));
  return [Math.round(247 - 217 * t), Math.round(251 - 187 * t), Math.round(255 - 80 * t)];
}

const mean = (values) => {
  const present = values.filter((v) => v != null);
  return present.length ? present.reduce((a, b) => a + b, 0) / present.length : null;
};

function renderHeatmap(rows) {
  const panel = $("gpu-panel");
  panel.hidden = rows.length === 0;
  if (!rows.length) return;
  const dates = [...new Set(rows.flatMap((row) => row.dates))].sort((a, b) => a - b);
  const column = new Map(dates.map((date, i) => [date, i]));
  const grid = rows.map((row) => {
    const values = new Array(dates.length).fill(null);
    row.dates.forEach((date, i) => (values[column.get(date)] = row.values[i]));
    return { id: row.id, values, mean: mean(values) ?? -1 };
  }).sort((a, b) => b.mean - a.mean || compareText(a.id, b.id));
  // More workers than pixel rows: consecutive workers share a row, drawn as their mean.
  const groups = Math.ceil(grid.length / Math.min(grid.length, HEATMAP_HEIGHT));
  const canvas = $("heatmap");
  const rowsDrawn = Math.ceil(grid.length / groups);
  canvas.width = dates.length;
  canvas.height = rowsDrawn;
  const rowPixels = Math.max(1, Math.min(HEATMAP_ROW_PIXELS, Math.floor(HEATMAP_HEIGHT / rowsDrawn)));
  canvas.style.height = `${rowsDrawn * rowPixels}px`;
  const context = canvas.getContext("2d");
  const image = context.createImageData(dates.length, rowsDrawn);
  for (let band = 0; band < rowsDrawn; band += 1) {
    const members = grid.slice(band * groups, (band + 1) * groups);
    for (let x = 0; x < dates.length; x += 1) {
      const [r, g, b] = heatColor(mean(members.map((member) => member.values[x])));
      const at = (band * dates.length + x) * 4;
      image.data.set([r, g, b, 255], at);
    }
  }
  context.putImageData(image, 0, 0);
  Object.assign(heatmap, { rows: grid, dates, groups });
  const step = dates.length > 1 ? (dates[1] - dates[0]) / 1000 : 0;
  const shared = groups > 1 ? `; a row is the mean of ${groups} workers` : "";
  $("heatmap-note").textContent = `${grid.length} workers, busiest first; ${step ? durationText(step) : ""} buckets${shared}`;
  canvas.dataset.workers = String(grid.length);
  canvas.dataset.rows = String(rowsDrawn);
  canvas.dataset.columns = String(dates.length);
}

// What is under the pointer or a touch: the worker (or the workers of the row), the time, the value.
function readHeatmap(clientX, clientY) {
  const canvas = $("heatmap");
  const box = canvas.getBoundingClientRect();
  const { rows, dates, groups } = heatmap;
  if (!rows.length || !box.width || !box.height) return;
  const x = Math.min(dates.length - 1, Math.max(0, Math.floor(((clientX - box.left) / box.width) * dates.length)));
  const band = Math.min(canvas.height - 1, Math.max(0, Math.floor(((clientY - box.top) / box.height) * canvas.height)));
  const members = rows.slice(band * groups, (band + 1) * groups);
  const who = members.length === 1 ? members[0].id : `${members[0].id} … ${members[members.length - 1].id} (mean of ${members.length})`;
  const value = mean(members.map((member) => member.values[x]));
  $("heatmap-readout").textContent = `${who}, ${formatTime(dates[x])}: ${value == null ? "no report" : formatValue(value, "%")}`;
}

// --- wiring --------------------------------------------------------------------------------

function setRange(button) {
  state.range = Number(button.dataset.range);
  for (const other of document.querySelectorAll("[data-range]")) {
    other.setAttribute("aria-pressed", String(other === button));
  }
  refresh();
}

function start() {
  $("sign-in").addEventListener("submit", signIn);
  $("sign-out").addEventListener("click", () => signOut());
  $("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    refresh();
  });
  for (const input of [$("tag-filter"), $("worker-pattern")]) input.addEventListener("change", () => refresh());
  for (const button of document.querySelectorAll("[data-range]")) button.addEventListener("click", () => setRange(button));
  for (const th of document.querySelectorAll("#workers th[data-sort]")) {
    th.querySelector("button").addEventListener("click", () => sortBy(th.dataset.sort));
  }
  for (const button of document.querySelectorAll("[data-zone]")) {
    button.addEventListener("click", () => setZone(button.dataset.zone === "utc"));
  }
  showZone();
  $("silent-count").addEventListener("click", showSilentFirst);
  const heatmapCanvas = $("heatmap");
  heatmapCanvas.addEventListener("mousemove", (event) => readHeatmap(event.clientX, event.clientY));
  const touched = (event) => event.touches[0] && readHeatmap(event.touches[0].clientX, event.touches[0].clientY);
  heatmapCanvas.addEventListener("touchstart", touched, { passive: true });
  heatmapCanvas.addEventListener("touchmove", touched, { passive: true });
  $("select-all").addEventListener("change", (event) => {
    selectWorkers(sortedWorkers().map((w) => w.id), event.target.checked);
  });
  if (state.token) startSession(state.token);
  else signOut();
}

start();
