"""The dashboard's page: one self-contained document (no network fetches, no external script).

It opens ``/events`` (server-sent events, the token carried over from its own URL) and redraws
from each snapshot. Everything a task, client or peer names is set as text, never as markup.
Elements tests look for: ``tr.executor[data-name]``, ``#done``, ``#queued``, ``body[data-state]``,
``tr.stream[data-task]`` (the task stream), ``tr.peer[data-name] td.rtt`` (a link's round trip).
"""

from __future__ import annotations

STYLE = """
:root { --bg:#f5f6f8; --card:#fff; --ink:#1d2330; --dim:#6b7385; --line:#e3e6ec; --accent:#2f6fde;
        --ok:#1f9d55; --bad:#d64545; --warn:#d98a00; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; background:var(--bg);
       color:var(--ink); }
header { display:flex; gap:18px; align-items:baseline; padding:12px 20px; background:#1d2330; color:#fff; }
header h1 { font-size:17px; margin:0; font-weight:600; }
header .meta { color:#b8c0d0; font-size:13px; }
#state { margin-left:auto; font-size:13px; }
#state::before { content:"\\25CF  "; color:var(--warn); }
body[data-state=live] #state::before { color:#4cd07d; }
body[data-state=stopped] #state::before { color:var(--bad); }
main { padding:16px 20px; display:grid; gap:16px; grid-template-columns:repeat(auto-fit, minmax(460px, 1fr)); }
.tiles { grid-column:1/-1; display:grid; gap:12px; grid-template-columns:repeat(auto-fit, minmax(120px, 1fr)); }
.tile, .card { background:var(--card); border:1px solid var(--line); border-radius:8px; }
.tile { padding:10px 14px; }
.tile .v { font-size:24px; font-weight:600; font-variant-numeric:tabular-nums; }
.tile .k { color:var(--dim); font-size:12px; text-transform:uppercase; letter-spacing:.04em; }
.tile.bad .v { color:var(--bad); }
.card { padding:12px 16px; min-width:0; }
.card h2 { font-size:13px; margin:0 0 8px; color:var(--dim); text-transform:uppercase; letter-spacing:.05em; }
.wide { grid-column:1/-1; }
table { width:100%; border-collapse:collapse; font-variant-numeric:tabular-nums; }
th { text-align:left; color:var(--dim); font-weight:500; font-size:12px; border-bottom:1px solid var(--line); }
td, th { padding:4px 8px 4px 0; white-space:nowrap; }
td.run { white-space:normal; font-family:ui-monospace, monospace; font-size:12px; color:#334; }
td.idle { color:var(--dim); font-style:italic; }
.num { text-align:right; }
canvas { width:100%; display:block; }
.bar { height:8px; background:var(--line); border-radius:4px; overflow:hidden; display:flex; min-width:120px; }
.bar span { display:block; height:100%; }
.empty { color:var(--dim); font-style:italic; }
.yes { color:var(--ok); } .no { color:var(--bad); }
footer { color:var(--dim); font-size:12px; padding:0 20px 16px; }
"""

BODY = """
<header><h1>taskcs</h1><span class="meta" id="server">connecting&hellip;</span>
<span id="state">connecting</span></header>
<main>
 <section class="tiles">
  <div class="tile"><div class="v" id="rate">&ndash;</div><div class="k">tasks / s</div></div>
  <div class="tile"><div class="v" id="queued">&ndash;</div><div class="k">queued</div></div>
  <div class="tile"><div class="v" id="running">&ndash;</div><div class="k">running</div></div>
  <div class="tile"><div class="v" id="done">&ndash;</div><div class="k">done</div></div>
  <div class="tile" id="failed-tile"><div class="v" id="failed">&ndash;</div><div class="k">failed</div></div>
  <div class="tile"><div class="v" id="retried">&ndash;</div><div class="k">retried</div></div>
  <div class="tile"><div class="v" id="replaced">&ndash;</div><div class="k">executors replaced</div></div>
  <div class="tile"><div class="v" id="nclients">&ndash;</div><div class="k">clients</div></div>
 </section>
 <section class="card wide"><h2>Tasks finished per second, last <span id="span">5 min</span>
  (peak <span id="peak">0</span>)</h2><canvas id="spark" height="70"></canvas></section>
 <section class="card"><h2>Executors</h2><table><thead><tr><th>name</th><th>pid</th>
  <th class="num">in flight</th><th class="num">done</th><th>running now</th></tr></thead>
  <tbody id="executors"></tbody></table>
  <h2 style="margin-top:12px">Activity, last minute (one lane per executor)</h2>
  <canvas id="lanes" height="40"></canvas></section>
 <section class="card"><h2>Clients and their task sets</h2><table><thead><tr><th>client</th><th>set</th>
  <th>progress</th><th class="num">done</th><th class="num">running</th><th class="num">queued</th>
  <th class="num">failed</th></tr></thead><tbody id="sets"></tbody></table></section>
 <section class="card wide"><h2>Task stream: the last <span id="nstream">0</span> finished</h2><table><thead>
  <tr><th>finished</th><th>task</th><th>executor</th><th>status</th><th class="num">ran</th></tr></thead>
  <tbody id="stream"></tbody></table></section>
 <section class="card wide"><h2>Peer servers</h2><table><thead><tr><th>name</th><th>endpoint</th>
  <th>connected</th><th class="num">capacity</th><th class="num">forwarded</th><th class="num">returned</th>
  <th class="num">round trip</th><th class="num">clock offset</th>
  </tr></thead><tbody id="peers"></tbody></table></section>
 <section class="card wide"><h2>Engines</h2><table><thead><tr><th>engine</th><th>address</th>
  <th>state</th><th class="num">workers</th><th class="num">capacity</th><th class="num">in flight</th>
  <th class="num">done</th><th class="num">failed</th></tr></thead><tbody id="engines"></tbody></table></section>
</main>
<footer>Live from the server every half second (server-sent events); this page fetches nothing else.
</footer>
"""

SCRIPT = """
"use strict";
const $ = (id) => document.getElementById(id);
const LANE_SAMPLES = 120;  // half-second snapshots: one minute
const lanes = new Map();   // executor name -> recent in-flight fractions
const STREAM_SHOWN = 25;   // rows of the task stream shown (the server keeps the last 100)
function ago(s) { return s < 1 ? "now" : s < 60 ? Math.round(s) + "s ago" : dur(s) + " ago"; }
function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = String(text);
  return e;
}
function row(cells) {
  const tr = el("tr");
  for (const c of cells) tr.appendChild(c instanceof Node ? c : el("td", "", c));
  return tr;
}
function num(v) { return el("td", "num", v); }
function fill(tbody, rows, emptyText, cols) {
  tbody.replaceChildren(...rows);
  if (!rows.length) { const td = el("td", "empty", emptyText); td.colSpan = cols; tbody.appendChild(row([td])); }
}
function dur(s) {
  s = Math.floor(s); const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
  return (h ? h + "h" : "") + String(m).padStart(h ? 2 : 1, "0") + "m" + String(r).padStart(2, "0") + "s";
}
function canvas(c) {
  const ratio = window.devicePixelRatio || 1, w = c.clientWidth || 600, h = c.height / (c._r || 1);
  c._r = ratio; c.width = w * ratio; c.height = h * ratio; c.style.height = h + "px";
  const g = c.getContext("2d"); g.scale(ratio, ratio); return [g, w, h];
}
function spark(rates, interval) {
  const [g, w, h] = canvas($("spark"));
  const peak = Math.max(1, ...rates);
  $("peak").textContent = Math.max(0, ...rates).toFixed(1) + "/s";
  $("span").textContent = Math.round(rates.length * interval / 60 * 10) / 10 + " min";
  g.strokeStyle = "#e3e6ec"; g.beginPath(); g.moveTo(0, h - 0.5); g.lineTo(w, h - 0.5); g.stroke();
  if (rates.length < 2) return;
  const x = (i) => i * w / (rates.length - 1), y = (v) => h - 2 - (h - 6) * v / peak;
  g.beginPath(); g.moveTo(0, h);
  rates.forEach((v, i) => g.lineTo(x(i), y(v)));
  g.lineTo(w, h); g.closePath(); g.fillStyle = "rgba(47,111,222,.15)"; g.fill();
  g.beginPath(); rates.forEach((v, i) => (i ? g.lineTo(x(i), y(v)) : g.moveTo(x(i), y(v))));
  g.strokeStyle = "#2f6fde"; g.lineWidth = 1.5; g.stroke();
}
function activity(executors) {
  const seen = new Set();
  for (const ex of executors) {
    seen.add(ex.name);
    const h = lanes.get(ex.name) || [];
    h.push(Math.min(1, ex.in_flight / Math.max(1, ex.capacity)));
    if (h.length > LANE_SAMPLES) h.shift();
    lanes.set(ex.name, h);
  }
  for (const name of [...lanes.keys()]) if (!seen.has(name)) lanes.delete(name);
  const c = $("lanes"); c.height = Math.max(20, lanes.size * 14) * (c._r || 1);
  const [g, w] = canvas(c);
  let lane = 0;
  for (const [name, h] of lanes) {
    const top = lane * 14, cw = w / LANE_SAMPLES, start = LANE_SAMPLES - h.length;
    g.fillStyle = "#f0f2f6"; g.fillRect(0, top + 1, w, 12);
    h.forEach((v, i) => { if (v > 0) { g.fillStyle = `rgba(31,157,85,${0.35 + 0.65 * v})`;
      g.fillRect((start + i) * cw, top + 1, Math.ceil(cw), 12); } });
    g.fillStyle = "#6b7385"; g.font = "10px system-ui, sans-serif"; g.fillText(name, 3, top + 10);
    lane++;
  }
}
function bar(s) {
  const total = s.done + s.failed + s.cancelled + s.running + s.queued, b = el("div", "bar");
  for (const [n, color] of [[s.done, "#1f9d55"], [s.failed, "#d64545"], [s.cancelled, "#9aa3b5"],
                            [s.running, "#2f6fde"]]) {
    const part = el("span"); part.style.width = (total ? 100 * n / total : 0) + "%";
    part.style.background = color; b.appendChild(part);
  }
  b.title = `${s.done + s.failed + s.cancelled} of ${total}${s.closed ? "" : " so far (set still open)"}`;
  const td = el("td"); td.appendChild(b); return td;
}
function render(d) {
  document.body.dataset.state = d.draining ? "stopping" : "live";
  $("state").textContent = d.draining ? "stopping" : "live";
  $("server").textContent = `${d.name} \\u00b7 pid ${d.pid} \\u00b7 ${d.endpoint} \\u00b7 up ${dur(d.uptime)}`;
  const running = d.sets.reduce((a, s) => a + s.running, 0);
  $("rate").textContent = d.rate.toFixed(1); $("queued").textContent = d.queued;
  $("running").textContent = running; $("done").textContent = d.stats.done;
  $("failed").textContent = d.stats.failed; $("retried").textContent = d.stats.retried;
  $("failed-tile").classList.toggle("bad", d.stats.failed > 0);
  $("replaced").textContent = d.executors_replaced; $("nclients").textContent = d.clients.length;
  const exs = d.executors.filter((e) => !e.stdio).concat(d.executors.filter((e) => e.stdio));
  fill($("executors"), exs.map((e) => {
    const tr = row([e.name + (e.stdio ? " (foreground)" : ""), e.pid, num(e.in_flight), num(e.completed),
                    el("td", e.running.length ? "run" : "idle", e.running.join(", ") || "idle")]);
    tr.className = "executor"; tr.dataset.name = e.name; return tr;
  }), "no executors", 5);
  const sets = d.sets.map((s) => row([s.client, "#" + s.set_id, bar(s), num(s.done), num(s.running),
                                      num(s.queued), num(s.failed)]));
  const idle = d.clients.filter((c) => !d.sets.some((s) => s.client === c));
  for (const c of idle) sets.push(row([c, "\\u2013", el("td", "empty", "no set"), num(0), num(0), num(0), num(0)]));
  fill($("sets"), sets, "no clients", 7);
  fill($("peers"), (d.peers || []).map((p) => {
    const tr = row([p.name || "?", p.endpoint,
      el("td", p.connected ? "yes" : "no", p.connected ? "yes" : "no"), num(p.capacity || 0),
      num(p.forwarded || 0), num(p.returned || 0),
      el("td", "num rtt", p.rtt_ms == null ? "\u2013" : p.rtt_ms.toFixed(2) + " ms"),
      num(p.clock_offset_ms == null ? "\u2013" : p.clock_offset_ms.toFixed(2) + " ms")]);
    tr.className = "peer"; tr.dataset.name = p.name || ""; return tr;
  }), "no peer servers", 8);
  const stream = (d.stream || []).slice().reverse();  // newest first
  $("nstream").textContent = stream.length;
  fill($("stream"), stream.slice(0, STREAM_SHOWN).map(([end, ref, ex, status, us]) => {
    const tr = row([ago(d.time - end / 1e9), ref, ex,
                    el("td", status === 0 ? "yes" : "no", ["ok", "error", "cancelled"][status] || status),
                    num(us >= 1e6 ? (us / 1e6).toFixed(2) + " s" : (us / 1e3).toFixed(2) + " ms")]);
    tr.className = "stream"; tr.dataset.task = ref; return tr;
  }), d.stream ? "no task finished yet" : "starting\u2026", 5);
  fill($("engines"), (d.engines || []).map((g) => row([g.kind, g.address || "(local)",
    el("td", g.state === "up" ? "yes" : "no", g.state + (g.problem ? ": " + g.problem : "")), num(g.workers || 0),
    num(g.capacity || 0), num(g.in_flight || 0), num(g.done || 0), num(g.failed || 0)])), "no engine", 8);
  spark(d.rates, d.rate_interval);
  activity(d.executors.filter((e) => !e.stdio));
}
const events = new EventSource("events" + location.search);
events.onmessage = (e) => render(JSON.parse(e.data));
events.onerror = () => { document.body.dataset.state = "stopped";
  $("state").textContent = events.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting"; };
"""

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>taskcs dashboard</title><style>{STYLE}</style></head>
<body data-state="connecting">{BODY}<script>{SCRIPT}</script></body></html>
"""
