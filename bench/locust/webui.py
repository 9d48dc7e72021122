"""The celery-bench tab and page of Locust's web UI.

Locust 2.47 extends its React UI from the locustfile through ``web_ui.template_args``:
``extended_tabs`` + ``extended_tables`` add a tab holding a table, filled from an
``extended_stats`` entry that we add to every ``/stats/requests`` poll (Locust's
``examples/extend_web_ui.py``); ``extended_csv_files`` adds links to the "Download
Data" tab. A tab can only hold a table, so the chart lives on a page of ours:

- tab **celery-bench (us)**: per request row, live, p50 p90 p99 p99.9 p99.99 max in
  microseconds from the HdrHistograms (rows "from intended start" and "schedule lag"
  in open loop);
- ``/celery-bench/``: the same table (the same :class:`Snapshot` of the histograms),
  the percentile spectrum chart, the download; linked from Download Data;
- the class picker ticks the classes named on the command line (or in locust.conf)
  that the chosen transport can run (:func:`ticked`);
- ``/celery-bench/results.json``: the results file of the run so far (what
  ``--results-out`` writes), linked from Download Data and from the page;
- a ``before_request`` on ``/swarm`` that refuses a bad choice with one message in
  the start form (and starts the Celery workers before Locust starts the test).
"""
from __future__ import annotations

import json
import time

TAB = "celery-bench"
COLUMNS = [("type", "Type"), ("name", "Name"), ("requests", "# Requests"),
           ("fails", "# Fails"), ("p50", "p50 us"), ("p90", "p90 us"), ("p99", "p99 us"),
           ("p999", "p99.9 us"), ("p9999", "p99.99 us"), ("max", "max us"), ("note", "Note")]


class Snapshot:
    """The page's data, read at most once per ``period_s``: the tab and the page show the
    same histograms, the same counts at the same moment (each polls every 2 s, out of
    phase). ``clear()`` on reset and at a test's start and stop, so neither lags them."""

    def __init__(self, read, period_s: float = 1.0, clock=time.monotonic):
        self.read, self.period_s, self.clock = read, period_s, clock
        self.at = None
        self.data = None

    def __call__(self) -> dict:
        now = self.clock()
        if self.at is None or now - self.at >= self.period_s:
            self.data, self.at = {**self.read(), "taken": now}, now
        return self.data

    def clear(self, **kwargs) -> None:
        self.at = None


def ticked(environment) -> list[str]:
    """The user classes the class picker starts ticked: those named on the command line or
    in locust.conf (all when none is), less those the chosen transport cannot run."""
    from .. import brokers, config
    from . import arguments

    names = [c.__name__ for c in environment.user_classes] or \
        sorted(environment.available_user_classes or ())
    classes = environment.available_user_classes or {}
    if arguments.get(environment, "app", ""):
        return names
    try:
        in_process = not brokers.info(arguments.get(environment, "transport", "unix")) \
            .cross_process
    except (config.UsageError, ImportError):
        return names
    return [n for n in names if not (in_process and getattr(classes.get(n), "runs_tasks",
                                                              False))]


def register(web_ui, environment, *, page_data, results_json, check_swarm) -> None:
    """``page_data()`` -> the page's JSON (its rows also fill the tab); ``results_json()``
    -> the results file text; ``check_swarm(form) -> message | None``."""
    from flask import Blueprint, Response, jsonify, make_response, request

    snapshot = Snapshot(page_data)
    for event in (environment.events.reset_stats, environment.events.test_start,
                  environment.events.test_stop):
        event.add_listener(snapshot.clear)

    update = web_ui.update_template_args

    def update_template_args():
        update()
        if web_ui.template_args.get("available_user_classes"):
            # the picker lists every class (``users``) and ticks these
            web_ui.template_args["available_user_classes"] = ticked(environment)

    web_ui.update_template_args = update_template_args

    base = (environment.parsed_options.web_base_path or "") if environment.parsed_options \
        else ""
    web_ui.template_args.update(
        extended_tabs=[{"title": "celery-bench (us)", "key": TAB}],
        extended_tables=[{"key": TAB, "structure": [{"key": k, "title": t}
                                                   for k, t in COLUMNS]}],
        extended_csv_files=[
            {"href": f"{base}/celery-bench/", "title":
             "celery-bench: exact percentiles (us) and percentile spectrum chart"},
            {"href": f"{base}/celery-bench/results.json", "title":
             "celery-bench results file (JSON, HdrHistograms; what --results-out writes)"}])

    @web_ui.app.after_request
    def _extend_stats(response):
        if request.path.endswith("/stats/requests") and response.is_json:
            data = response.get_json()
            data["extended_stats"] = [{"key": TAB, "data": snapshot()["rows"]}]
            response.set_data(json.dumps(data))
        return response

    @web_ui.app.before_request
    def _check_swarm():
        if request.method == "POST" and request.path.endswith("/swarm"):
            message = check_swarm(request.form)
            if message:
                return jsonify({"success": False, "message": message,
                                "host": environment.host})
        return None

    page = Blueprint("celery_bench", __name__, url_prefix=f"{base}/celery-bench")
    auth = web_ui.auth_required_if_enabled

    @page.route("/")
    @auth
    def index():
        return Response(PAGE, mimetype="text/html")

    @page.route("/stats.json")
    @auth
    def stats():
        return jsonify(snapshot())

    @page.route("/results.json")
    @auth
    def results():
        response = make_response(results_json())
        response.headers["Content-Type"] = "application/json"
        stamp = time.strftime("%Y%m%dT%H%M%S")
        response.headers["Content-Disposition"] = \
            f"attachment;filename=celery-bench-locust-{stamp}.json"
        return response

    web_ui.app.register_blueprint(page)


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>celery-bench: exact latencies</title>
<link rel="icon" href="../assets/favicon-light.png" type="image/png">
<style>
 body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
 table{border-collapse:collapse;font-variant-numeric:tabular-nums;margin:1em 0}
 th,td{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}
 th:nth-child(-n+2),td:nth-child(-n+2),td:last-child{text-align:left}
 .muted{color:#666} svg text{font-size:11px;fill:#444} .grid{stroke:#e4e4e4}
 .warn{color:#a40}
</style></head><body>
<h2>celery-bench: exact latencies</h2>
<p class="muted">Every request recorded into an HdrHistogram (microseconds, 3 significant
digits), merged over all Locust workers. Locust's own columns are rounded to whole
milliseconds; trust these. <span id="state"></span></p>
<p><a id="download" href="results.json" download>Download the results file</a>
(celery-bench JSON: what <code>--results-out</code> writes; <code>celery-bench show</code>
reads it) &middot; <a href="../">back to Locust</a></p>
<p id="rate" class="muted"></p>
<table id="percentiles"><thead><tr></tr></thead><tbody></tbody></table>
<h3>Percentile spectrum</h3>
<svg id="spectrum" width="960" height="440" role="img"
     aria-label="latency by percentile, log scales"></svg>
<script>
const COLS = %COLUMNS%;
const COLORS = ["#1f77b4","#d62728","#2ca02c","#ff7f0e","#9467bd","#8c564b","#e377c2",
                "#17becf","#7f7f7f","#bcbd22"];
const fmt = v => v === null || v === undefined ? "" :
  (typeof v === "number" ? v.toLocaleString("en-US") : String(v));
const xOf = p => Math.log10(1 / Math.max(1e-9, 1 - p / 100));
function table(rows) {
  const head = document.querySelector("#percentiles thead tr");
  if (!head.children.length) head.innerHTML = COLS.map(c => `<th>${c[1]}</th>`).join("");
  const body = document.querySelector("#percentiles tbody");
  body.innerHTML = "";
  for (const r of rows) {
    const tr = document.createElement("tr");
    for (const [k] of COLS) { const td = document.createElement("td");
      td.textContent = fmt(r[k]); td.dataset.col = k; tr.appendChild(td); }
    body.appendChild(tr);
  }
}
function chart(series) {
  const svg = document.getElementById("spectrum"), W = 960, H = 440;
  const m = {l: 70, r: 330, t: 15, b: 45}, w = W - m.l - m.r, h = H - m.t - m.b;
  const ns = "http://www.w3.org/2000/svg";
  const el = (name, attrs, text) => { const e = document.createElementNS(ns, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]); if (text) e.textContent = text;
    svg.appendChild(e); return e; };
  svg.innerHTML = "";
  const pts = series.flatMap(s => s.points);
  if (!pts.length) { el("text", {x: m.l, y: m.t + 20}, "no data yet"); return; }
  const xmax = Math.max(3, ...pts.map(p => xOf(p[0])));
  const vals = pts.map(p => Math.max(1, p[1]));
  const y0 = Math.floor(Math.log10(Math.min(...vals))),
        y1 = Math.max(y0 + 1, Math.ceil(Math.log10(Math.max(...vals))));
  const X = p => m.l + w * xOf(p) / xmax;
  const Y = v => m.t + h - h * (Math.log10(Math.max(1, v)) - y0) / (y1 - y0);
  for (let d = 0; d <= Math.ceil(xmax); d++) {
    const p = 100 * (1 - Math.pow(10, -d)), x = m.l + w * d / xmax;
    if (x > m.l + w + 1) break;
    el("line", {x1: x, x2: x, y1: m.t, y2: m.t + h, class: "grid"});
    el("text", {x: x, y: m.t + h + 16, "text-anchor": "middle"},
       (d === 0 ? "0" : p.toFixed(Math.max(0, d - 2))) + "%");
  }
  const unit = e => e < 3 ? `${Math.pow(10, e)} us` : e < 6 ? `${Math.pow(10, e - 3)} ms`
                           : `${Math.pow(10, e - 6)} s`;
  for (let e = y0; e <= y1; e++) {
    const y = Y(Math.pow(10, e));
    el("line", {x1: m.l, x2: m.l + w, y1: y, y2: y, class: "grid"});
    el("text", {x: m.l - 6, y: y + 4, "text-anchor": "end"}, unit(e));
  }
  el("text", {x: m.l + w / 2, y: H - 8, "text-anchor": "middle"}, "percentile");
  series.forEach((s, i) => {
    const c = COLORS[i % COLORS.length];
    el("polyline", {points: s.points.map(p => `${X(p[0])},${Y(p[1])}`).join(" "),
       fill: "none", stroke: c, "stroke-width": 1.8, class: "series", "data-label": s.label});
    el("rect", {x: m.l + w + 15, y: m.t + 16 * i, width: 10, height: 10, fill: c});
    el("text", {x: m.l + w + 30, y: m.t + 16 * i + 9},
       `${s.label} (${s.count.toLocaleString("en-US")})`);
  });
}
async function refresh() {
  try {
    const d = await (await fetch("stats.json", {cache: "no-store"})).json();
    document.getElementById("state").textContent = `Test ${d.state}.`;
    const r = document.getElementById("rate");
    r.textContent = d.rate || ""; r.className = d.shortfall ? "warn" : "muted";
    table(d.rows); chart(d.spectrum);
  } catch (e) { document.getElementById("state").textContent = "(Locust not reachable)"; }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
""".replace("%COLUMNS%", json.dumps(COLUMNS))
