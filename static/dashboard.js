// The dashboard page: polls /api/status and draws it. Every value from Redis goes in as text
// (textContent, attributes), never as HTML: dead-letter reasons and names are untrusted input.
"use strict";

const WINDOW_MS = 600_000;
const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"];
const SVG = "http://www.w3.org/2000/svg";
let writes = false;
let timer = null;

function el(tag, attrs = {}, ...children) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  for (const child of children) node.append(child);
  return node;
}

function number(n) {
  return n === null || n === undefined ? "-" : n.toLocaleString("en-US");
}

function duration(ms) {
  if (ms === null || ms === undefined) return "-";
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m${String(Math.floor(s % 60)).padStart(2, "0")}s`;
  return `${Math.floor(s / 3600)}h${String(Math.floor((s % 3600) / 60)).padStart(2, "0")}m`;
}

function size(bytes) {
  if (bytes === null || bytes === undefined) return "-";
  const units = ["B", "KB", "MB", "GB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function cell(value, className = "") {
  return el("td", className ? { class: className } : {}, value);
}

function renderStream(report) {
  document.getElementById("stream-name").textContent = report.stream;
  if (!report.exists) {
    document.getElementById("stream-length").textContent = "does not exist (run python -m initialization_stream)";
    return;
  }
  document.getElementById("stream-length").textContent = number(report.length);
  document.getElementById("stream-memory").textContent = size(report.memory_bytes);
  document.getElementById("stream-first").textContent = `${report.first_id || "-"} (${duration(report.first_age_ms)} old)`;
  document.getElementById("stream-last").textContent = `${report.last_id || "-"} (${duration(report.last_age_ms)} old)`;
}

function renderGroups(report, badGroups) {
  const rows = [];
  for (const g of report.groups) {
    const bad = badGroups.has(g.name) ? "bad" : "";
    if (!g.exists) {
      rows.push(el("tr", { class: "bad", "data-group": g.name }, cell(g.name), cell("missing (run python -m initialization_stream)")));
      continue;
    }
    rows.push(el("tr", { class: `group ${bad}`, "data-group": g.name },
      cell(g.name), cell(number(g.consumers), "number consumers"), cell(number(g.pending), "number pending"),
      cell(g.lag === null ? "?" : number(g.lag), "number lag"), cell(duration(g.oldest_pending_age_ms), "oldest"),
      cell(""), cell(g.last_delivered_id)));
    for (const c of g.consumer_list) {
      let state = c.alive ? "alive" : "gone (lease lapsed)";
      if (c.retry_waiting) state += `, ${number(c.retry_waiting)} waiting for a retry (oldest ${duration(c.retry_oldest_s * 1000)})`;
      if (c.outage_s !== null && c.outage_s !== undefined) state += `, downstream down for ${duration(c.outage_s * 1000)}`;
      rows.push(el("tr", { class: `consumer ${c.alive ? "" : "gone"}`, "data-consumer": c.name },
        cell(c.name), cell(""), cell(number(c.pending), "number pending"), cell(""), cell(""),
        cell(duration(c.idle_ms), "idle"), cell(state, "state")));
    }
  }
  document.querySelector("#groups tbody").replaceChildren(...rows);
}

// One line per group of `metric` (lag, or rate: entries acked per second) over the last ten minutes.
function renderChart(svg, samples, metric, names, unit) {
  const [width, height, left, top, bottom] = [600, 160, 50, 10, 20];
  // Up to ten minutes, as much as the dashboard has seen (at least one minute).
  const now = Date.now();
  const span = Math.min(WINDOW_MS, Math.max(60_000, now - (samples.length ? samples[0].t : now)));
  let max = 0;
  for (const s of samples) {
    for (const name of names) max = Math.max(max, s.groups[name]?.[metric] ?? 0);
  }
  const top_value = max > 0 ? max * 1.1 : 1;
  const x = (t) => left + ((t - (now - span)) / span) * (width - left - 5);
  const y = (v) => height - bottom - (v / top_value) * (height - top - bottom);
  const parts = [
    el("svg:line", { x1: left, y1: height - bottom, x2: width, y2: height - bottom, stroke: "#999" }),
    el("svg:text", { x: 2, y: top + 8 }, `${number(Math.round(top_value * 10) / 10)}`),
    el("svg:text", { x: 2, y: height - bottom }, "0"),
    el("svg:text", { x: left, y: height - 4 }, `-${duration(span)}`),
    el("svg:text", { x: width - 40, y: height - 4 }, "now"),
    el("svg:text", { x: left + 8, y: top + 8 }, unit),
  ];
  names.forEach((name, index) => {
    let d = "";
    let points = 0;
    let seriesMax = 0;
    let pen = "M";
    for (const s of samples) {
      const value = s.groups[name]?.[metric];
      if (value === null || value === undefined) {
        pen = "M"; // a gap where Redis could not tell
        continue;
      }
      d += `${pen}${x(s.t).toFixed(1)},${y(value).toFixed(1)} `;
      pen = "L";
      points += 1;
      seriesMax = Math.max(seriesMax, value);
    }
    parts.push(el("svg:path", {
      d: d.trim() || "M0,0", stroke: COLORS[index % COLORS.length], "data-group": name,
      "data-points": points, "data-max": seriesMax,
    }));
  });
  svg.replaceChildren(...parts);
}

function renderLegend(names) {
  const items = names.map((name, index) => {
    const swatch = el("i");
    swatch.style.background = COLORS[index % COLORS.length]; // a property, which the CSP allows
    return el("span", {}, swatch, name);
  });
  document.getElementById("legend").replaceChildren(...items);
}

function renderDeadLetters(report) {
  const shown = report.newest_dead_letters.length;
  document.getElementById("dead-stream").textContent = report.dead_letter_stream;
  document.getElementById("dead-letters-length").textContent = number(report.dead_letters);
  document.getElementById("dead-shown").textContent = report.dead_letters > shown ? `(newest ${shown} shown)` : "";
  const bad = report.problems.some((p) => p.startsWith("dead letters"));
  document.getElementById("dead-heading").className = bad ? "bad" : "";
  const why = writes ? "" : "start the dashboard with DASHBOARD_TOKEN set to enable redrive and purge";
  const rows = report.newest_dead_letters.map((d) => {
    const button = (label, action) => {
      const b = el("button", { type: "button", "data-action": action }, label);
      if (action !== "show" && !writes) {
        b.disabled = true;
        b.title = why;
      }
      b.addEventListener("click", () => act(action, d.id, d.order_id));
      return b;
    };
    return el("tr", { "data-id": d.id },
      cell(d.id), cell(d.dead_lettered_at.slice(0, 19)), cell(d.group), cell(d.deliveries, "number"),
      cell(d.order_id || "-"), cell(d.error, "reason"),
      el("td", {}, button("fields", "show"), button("redrive", "redrive"), button("purge", "purge")));
  });
  document.querySelector("#dead-letters tbody").replaceChildren(...rows);
}

function render(data) {
  const report = data.report;
  writes = data.writes;
  const master = report.master ? `; master ${report.master_name} at ${report.master}` : "";
  document.getElementById("redis").textContent = `Redis ${data.redis} (${report.redis_version})${master}`;
  document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  const error = document.getElementById("error");
  error.hidden = !data.error;
  error.textContent = data.error || "";
  const health = document.getElementById("health");
  health.textContent = report.problems.length ? `UNHEALTHY: ${report.problems.join("; ")}` : "healthy";
  health.className = report.problems.length ? "bad" : "good";
  const badGroups = new Set(report.problems.map((p) => p.split(":")[0]));
  renderStream(report);
  renderGroups(report, badGroups);
  const names = report.groups.map((g) => g.name);
  renderLegend(names);
  renderChart(document.getElementById("chart-lag"), data.samples, "lag", names, "lag (entries not yet delivered)");
  renderChart(document.getElementById("chart-rate"), data.samples, "rate", names, "throughput (acked per second)");
  document.getElementById("writes").textContent = writes
    ? "Redrive and purge need the token the dashboard was started with (DASHBOARD_TOKEN)."
    : "Redrive and purge are off: start the dashboard with DASHBOARD_TOKEN set to enable them.";
  document.getElementById("token-form").hidden = !writes;
  renderDeadLetters(report);
}

async function poll() {
  clearTimeout(timer);
  let interval = 2;
  try {
    const response = await fetch("/api/status", { cache: "no-store" });
    const data = await response.json();
    interval = data.interval_s;
    render(data);
  } catch (error) {
    const box = document.getElementById("error");
    box.hidden = false;
    box.textContent = `the dashboard does not answer (${error.message}); retrying`;
  }
  timer = setTimeout(poll, interval * 1000);
}

// `id` is the dead letter's address (partitioned: its partition's number and its entry id), the
// one the server acts on: never an entry id alone, which may name a dead letter in each partition.
async function act(action, id, orderId) {
  const message = document.getElementById("message");
  if (action === "show") {
    const response = await fetch(`/api/dead-letters/${id}`);
    const fields = document.getElementById("fields");
    fields.hidden = false;
    fields.textContent = `${id}\n${JSON.stringify(await response.json(), null, 2)}`;
    return;
  }
  const order = orderId ? ` (order ${orderId})` : "";
  if (action === "purge" && !confirm(`Purge dead letter ${id}${order} for good?`)) return;
  const response = await fetch(`/api/dead-letters/${id}/${action}`, {
    method: "POST",
    headers: { Authorization: `Bearer ${document.getElementById("token").value}` },
  });
  const body = await response.json();
  message.textContent = response.ok ? `${id}: ${body.outcome}` : `${action} refused: ${body.error}`;
  message.className = response.ok ? "good" : "bad";
  await poll();
}

document.getElementById("token-form").addEventListener("submit", (event) => event.preventDefault());
poll();
