// The fleet page: sign in with an access key, then read the workers.* API every few seconds.
//
// Worker ids, tags, queues, tasks and metric keys are whatever daemons send: they only ever
// reach the page as text (textContent, text nodes, uPlot's labels, which are textContent too).
"use strict";

const REFRESH_SECONDS = 5;
const TOKEN_KEY = "workers-fleet-token"; // sessionStorage: gone with the tab, never in a URL
const TARGET_POINTS = 300;
const NICE_INTERVALS = [10, 15, 20, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];
const AUTO_SELECTED = 4; // workers charted before anyone picks some
const MAX_CHARTED = 10; // more series than this would not be read anyway
const ITEMS_PER_CALL = 30; // get_stats items (the server's default limit is 64)
const CHART_HEIGHT = 200;
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
  workers: [],
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
  state.selected.clear();
  state.selectionTouched = false;
  for (const id of [...charts.keys()]) removeChart(id);
  rows.clear();
  document.querySelector("#workers tbody").replaceChildren();
  $("count").textContent = "";
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

function chartSpan() {
  const now = Math.floor(Date.now() / 1000);
  const wanted = state.range / TARGET_POINTS;
  const interval = NICE_INTERVALS.find((nice) => nice >= wanted) || Math.ceil(wanted);
  return { from_date: now - state.range, to_date: now, interval };
}

async function load(session) {
  const filter = workerFilter();
  const span = chartSpan();
  const [all, count, activity] = await Promise.all([
    api("workers.get_all", { ...filter, last_seen: 0 }),
    api("workers.get_count", filter),
    api("workers.get_activity_report", span),
  ]);
  if (session !== state.session) return;
  state.workers = all.workers;
  $("count").textContent = `${count.count} worker${count.count === 1 ? "" : "s"}`;
  renderTable();
  renderActivity(activity, span);
  const charted = chartedWorkers();
  const metrics = charted.length ? await metricStats(charted, span) : { keys: [], workers: [] };
  if (session !== state.session) return;
  renderMetrics(charted, metrics);
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
  // One worker: its min and max around the average; several: the average of each. A few
  // keys per call, within the server's limits on items and series per get_stats.
  const aggregations = workerIds.length === 1 ? ["avg", "min", "max"] : ["avg"];
  const perCall = Math.max(1, Math.floor(ITEMS_PER_CALL / aggregations.length));
  const calls = [];
  for (let i = 0; i < keys.length; i += perCall) {
    const items = keys.slice(i, i + perCall).flatMap((key) =>
      aggregations.map((aggregation) => ({ key, aggregation })),
    );
    calls.push(api("workers.get_stats", { ...span, worker_ids: workerIds, items }));
  }
  const answers = await Promise.all(calls);
  return { keys, workers: answers.flatMap((answer) => answer.workers) };
}

// --- the table -----------------------------------------------------------------------------

const collator = new Intl.Collator(undefined, { numeric: true });
const compareText = (a, b) => collator.compare(a, b);

const idsOf = (items) => (items || []).map((item) => item.id);

const COLUMNS = [
  { key: "id", className: "worker", text: (w) => w.id },
  { key: "tags", className: "tags", text: (w) => (w.tags || []).join(" "), render: renderTags },
  { key: "queue", className: "", text: (w) => (w.queue ? w.queue.id : idsOf(w.queues).join(", ")) },
  { key: "task", className: "mono clip", text: (w) => (w.task ? w.task.id : "") },
  { key: "ip", className: "mono", text: (w) => w.ip || "" },
  // The newest report first, the oldest registration first.
  { key: "last_report", className: "", text: (w) => ago(w.last_report_time), order: (w) => -timeOf(w.last_report_time) },
  { key: "registered", className: "", text: (w) => localTime(w.register_time), order: (w) => timeOf(w.register_time) },
];

const rows = new Map(); // worker id -> {row, checkbox, cells, shown}: rows are updated in place

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

function localTime(iso) {
  if (!iso) return "";
  const t = new Date(iso);
  const pad = (n) => String(n).padStart(2, "0");
  const date = `${t.getFullYear()}-${pad(t.getMonth() + 1)}-${pad(t.getDate())}`;
  return `${date} ${pad(t.getHours())}:${pad(t.getMinutes())}:${pad(t.getSeconds())}`;
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
    cell.title = column.key === "last_report" ? worker.last_report_time || "" : text;
  });
  entry.checkbox.checked = state.selected.has(worker.id);
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

function sortBy(key) {
  state.sort = { key, direction: state.sort.key === key ? -state.sort.direction : 1 };
  renderTable();
}

// --- the charts ----------------------------------------------------------------------------

const charts = new Map(); // chart id -> {plot, figure, body, signature}: redrawn with setData, not rebuilt

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

function seriesOptions(label, color, unit, extra = {}) {
  return { label, stroke: color, width: 1.5, points: { show: false }, value: (u, v) => formatValue(v, unit), ...extra };
}

function chartOptions(width, series, unit, bands) {
  return {
    width,
    height: CHART_HEIGHT,
    series: [{}, ...series],
    bands,
    scales: { x: { time: true }, y: { range: (u, min, max) => [Math.min(0, min), max > 0 ? max * 1.05 : 1] } },
    axes: [{}, { size: 50, values: (u, ticks) => ticks.map(tickText) }],
    cursor: { drag: { x: false, y: false } }, // no zooming: the next refresh would undo it
    legend: { live: true },
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

// Draws `data` ([x seconds, ...series values]) into the chart `id`, made if missing and
// remade only when its series change; returns the chart's figure.
function drawChart(id, parent, title, unit, series, data, bands) {
  const signature = JSON.stringify([title, unit, series.map((s) => s.label)]);
  let chart = charts.get(id);
  if (chart && chart.signature !== signature) {
    removeChart(id);
    chart = null;
  }
  if (!chart) {
    const figure = document.createElement("figure");
    figure.className = "chart";
    const caption = document.createElement("figcaption");
    caption.textContent = title;
    const body = document.createElement("div");
    body.className = "chart-body";
    figure.append(caption, body);
    parent.append(figure);
    const width = Math.max(200, Math.floor(body.getBoundingClientRect().width));
    const plot = new uPlot(chartOptions(width, series, unit, bands), data, body);
    chart = { plot, figure, body, signature };
    charts.set(id, chart);
    resizer.observe(body);
  } else {
    chart.plot.setData(data);
  }
  // What the chart holds, for a glance in the developer tools (and the browser tests).
  const values = data.slice(1).flat();
  chart.figure.dataset.points = String(data[0].length);
  chart.figure.dataset.nonzero = String(values.filter((v) => v).length);
  chart.figure.dataset.from = String(data[0][0] ?? "");
  chart.figure.dataset.to = String(data[0][data[0].length - 1] ?? "");
  return chart.figure;
}

const seconds = (dates) => dates.map((d) => d / 1000); // the API's chart dates are milliseconds

function durationText(seconds) {
  if (seconds % 86400 === 0) return `${seconds / 86400} d`;
  if (seconds % 3600 === 0) return `${seconds / 3600} h`;
  if (seconds % 60 === 0) return `${seconds / 60} min`;
  return `${seconds} s`;
}

// The server may widen the interval asked for (its minimum, its rollups): say what came back.
function intervalNote(dates, span) {
  const step = dates.length > 1 ? (dates[1] - dates[0]) / 1000 : span.interval;
  const range = $("fleet-view").querySelector(`[data-range="${state.range}"]`).textContent;
  return `last ${range}, ${durationText(step)} buckets`;
}

function renderActivity(activity, span) {
  const { total, active } = activity;
  $("range-note").textContent = intervalNote(total.dates, span);
  drawChart("activity", $("activity-chart"), "", "", [
    seriesOptions("reporting", PALETTE[0], "", { fill: "rgba(37, 99, 235, 0.08)" }),
    seriesOptions("busy", PALETTE[2], "", { fill: "rgba(5, 150, 105, 0.12)" }),
  ], [seconds(total.dates), total.counts, active.counts]);
}

// get_stats answers per worker and metric; a chart is per metric, with a series per worker.
function metricSeries(stats, key, workerIds) {
  const dates = new Set();
  const byWorker = new Map();
  for (const worker of stats) {
    const metric = worker.metrics.find((m) => m.metric === key && m.variant === undefined);
    if (!metric) continue;
    metric.dates.forEach((d) => dates.add(d));
    const valueAt = (stat) => new Map(metric.dates.map((date, i) => [date, stat.values[i]]));
    const values = Object.fromEntries(metric.stats.map((stat) => [stat.aggregation, valueAt(stat)]));
    byWorker.set(worker.worker, values);
  }
  const xs = [...dates].sort((a, b) => a - b);
  const charted = workerIds.filter((id) => byWorker.has(id));
  return { xs, charted, column: (id, aggregation) => xs.map((d) => byWorker.get(id)[aggregation]?.get(d) ?? null) };
}

function renderMetrics(workerIds, metrics) {
  const parent = $("metric-charts");
  const ticked = state.workers.filter((w) => state.selected.has(w.id)).length;
  const howMany = ticked > workerIds.length ? `the first ${workerIds.length} of ${ticked} ticked` : workerIds.length;
  $("metrics-note").textContent = workerIds.length
    ? `${howMany} charted${workerIds.length === 1 ? ": min, average and max" : ": averages"}`
    : "none: tick workers in the table to chart them";
  const figures = [];
  for (const key of metrics.keys) {
    const unit = UNITS[key] || "";
    const { xs, charted, column } = metricSeries(metrics.workers, key, workerIds);
    if (!charted.length) continue;
    const title = unit ? `${key} (${unit})` : key;
    let series, data, bands;
    if (workerIds.length === 1) {
      const id = charted[0];
      series = [
        seriesOptions(`${id} avg`, PALETTE[0], unit),
        seriesOptions(`${id} min`, PALETTE[0], unit, { width: 1, dash: [4, 4] }),
        seriesOptions(`${id} max`, PALETTE[0], unit, { width: 1, dash: [4, 4] }),
      ];
      data = [seconds(xs), column(id, "avg"), column(id, "min"), column(id, "max")];
      bands = [{ series: [3, 2], fill: "rgba(37, 99, 235, 0.1)" }];
    } else {
      // A worker keeps its colour in every chart, those of metrics it lacks included.
      series = charted.map((id) => seriesOptions(id, PALETTE[workerIds.indexOf(id) % PALETTE.length], unit));
      data = [seconds(xs), ...charted.map((id) => column(id, "avg"))];
    }
    figures.push(drawChart(`metric:${key}`, parent, title, unit, series, data, bands));
  }
  const keep = new Set(figures);
  for (const [id, chart] of [...charts]) if (id.startsWith("metric:") && !keep.has(chart.figure)) removeChart(id);
  if (figures.some((figure, i) => parent.children[i] !== figure)) parent.replaceChildren(...figures);
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
  $("select-all").addEventListener("change", (event) => {
    selectWorkers(sortedWorkers().map((w) => w.id), event.target.checked);
  });
  if (state.token) startSession(state.token);
  else signOut();
}

start();
