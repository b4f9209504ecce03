"""The page ``cs-client --timeline FILE.html`` writes: self-contained (no network fetches).

The data (:func:`taskcs.client.trace.page_data`) sits in a ``<script type="application/json">``
element; the inline script draws it as SVG, one lane per executor, one bar per task, and
shows a task's name, duration and whereabouts on hover (and in its SVG ``<title>``, which the
browser shows as a tooltip). Names are set as text, never as markup. Elements tests look for:
``g.lane[data-lane]``, ``rect.task[data-name]``, ``#info``, ``body[data-drawn]``.
"""

from __future__ import annotations

STYLE = """
body { margin:0; font:13px/1.4 system-ui, -apple-system, "Segoe UI", sans-serif; color:#1d2330; background:#f5f6f8; }
header { padding:10px 16px; background:#1d2330; color:#fff; display:flex; gap:16px; align-items:baseline; }
header h1 { font-size:16px; margin:0; font-weight:600; }
header span { color:#b8c0d0; }
#info { padding:6px 16px; min-height:20px; font-family:ui-monospace, monospace; font-size:12px; background:#fff;
        border-bottom:1px solid #e3e6ec; white-space:pre; }
#wrap { overflow-x:auto; padding:8px 16px; }
svg text { font-size:11px; fill:#334; }
svg .axis text { fill:#6b7385; }
svg .axis line { stroke:#e3e6ec; }
rect.task { fill:#2f6fde; }
rect.task.error { fill:#d64545; }
rect.task.cancelled { fill:#9aa3b5; }
rect.task.forwarded { fill:#7a4fd6; }
rect.task.retried { stroke:#d98a00; stroke-width:1.5; }
rect.task:hover { fill:#1d2330; }
rect.bg { fill:#fff; }
label { color:#b8c0d0; }
.legend { padding:0 16px 12px; color:#6b7385; font-size:12px; }
.legend b { display:inline-block; width:10px; height:10px; margin:0 4px 0 12px; vertical-align:-1px; }
"""

SCRIPT = """
"use strict";
const data = JSON.parse(document.getElementById("data").textContent);
const NS = "http://www.w3.org/2000/svg", LANE = 22, LABEL = 190, TOP = 24;
function svg(tag, attrs, parent) {
  const e = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}
function ms(v) { return v === 0 ? "0" : v >= 1000 ? (v / 1000).toFixed(3) + " s" : v >= 1 ? v.toFixed(2) + " ms"
                                  : (v * 1000).toFixed(0) + " \\u00b5s"; }
function niceStep(span, n) {
  const raw = span / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  for (const m of [1, 2, 5, 10]) if (raw <= m * mag) return m * mag;
  return 10 * mag;
}
function describe(t) {
  const [lane, start, dur, name, status, id, set, flags] = t;
  return `${name} #${id}  ${ms(dur)}  (${status}; set ${set}; ${data.lanes[lane]}; started +${ms(start)})` +
         (flags & 1 ? "  retried" : "") + (flags & 2 ? "  forwarded" : "");
}
function draw(scale) {
  const wrap = document.getElementById("wrap");
  const span = data.tasks.reduce((m, t) => Math.max(m, t[1] + t[2]), 1e-3);  // no spread: 10^5 tasks
  const width = Math.max(600, (wrap.clientWidth - 32) * scale) - LABEL - 10;
  const x = (v) => LABEL + v / span * width;
  const root = svg("svg", {width: LABEL + width + 10, height: TOP + data.lanes.length * LANE + 4});
  const axis = svg("g", {class: "axis"}, root), step = niceStep(span, 8);
  for (let v = 0; v <= span + 1e-9; v += step) {
    svg("line", {x1: x(v), x2: x(v), y1: TOP - 6, y2: TOP + data.lanes.length * LANE}, axis);
    svg("text", {x: x(v) + 2, y: 12}, axis).textContent = ms(v);
  }
  const groups = data.lanes.map((name, i) => {
    const g = svg("g", {class: "lane", "data-lane": name}, root);
    svg("rect", {class: "bg", x: LABEL, y: TOP + i * LANE + 1, width: width, height: LANE - 2}, g);
    svg("text", {x: 4, y: TOP + i * LANE + 15}, g).textContent = name;
    return g;
  });
  const info = document.getElementById("info");
  for (const t of data.tasks) {
    const [lane, start, dur, name, status, , , flags] = t;
    const cls = "task " + status + (flags & 1 ? " retried" : "") + (flags & 2 ? " forwarded" : "");
    const r = svg("rect", {class: cls, x: x(start), y: TOP + lane * LANE + 3,
                           width: Math.max(1, dur / span * width), height: LANE - 6}, groups[lane]);
    r.dataset.name = name;
    svg("title", {}, r).textContent = describe(t);
    r.addEventListener("mouseover", () => { info.textContent = describe(t); });
  }
  wrap.replaceChildren(root);
  document.body.dataset.drawn = String(data.tasks.length);
}
const zoom = document.getElementById("zoom");
zoom.addEventListener("input", () => draw(Number(zoom.value)));
document.getElementById("summary").textContent = data.t0_ns ?
  `${data.count} tasks, ${data.tasks.length} ran, on ${data.lanes.length} lanes; started ` +
  new Date(data.t0_ns / 1e6).toISOString() : "no tasks recorded";
draw(1);
"""


def page(title: str, data_json: str) -> str:
    """The whole document; ``title`` already HTML-escaped, ``data_json`` safe inside a script."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>{title}</title><style>{STYLE}</style></head>
<body data-drawn=""><header><h1>{title}</h1><span id="summary"></span>
<label>zoom <input id="zoom" type="range" min="1" max="40" step="1" value="1"></label></header>
<div id="info">hover over a task</div><div id="wrap"></div>
<div class="legend"><b style="background:#2f6fde"></b>ok<b style="background:#d64545"></b>error
<b style="background:#9aa3b5"></b>cancelled<b style="background:#7a4fd6"></b>forwarded to a peer server
<b style="border:2px solid #d98a00"></b>retried</div>
<script type="application/json" id="data">{data_json}</script>
<script>{SCRIPT}</script></body></html>
"""
