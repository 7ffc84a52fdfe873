"""The status page's HTML: Jinja2 templates, a small stylesheet and the refresh script.

Kept in Python strings (not template files) so that they ship inside the package without
package-data rules. Autoescaping is on: prompts and file names are user text. The script
builds the live queue with textContent only, never innerHTML, for the same reason. Nothing
is loaded from outside the page's own origin.
"""

from __future__ import annotations

CSS = """
:root { --bg:#f6f7f9; --fg:#1d2430; --muted:#667085; --line:#d9dee7; --card:#fff;
  --ok:#1a7f37; --bad:#c0362c; --run:#1f6feb; --warn:#9a6700; }
* { box-sizing: border-box; }
body { margin:0; font:14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  background:var(--bg); color:var(--fg); }
header { background:#1d2430; color:#fff; padding:.6rem 1.2rem; display:flex; gap:1.2rem;
  align-items:center; flex-wrap:wrap; }
header a { color:#fff; text-decoration:none; opacity:.85; } header a:hover { opacity:1; }
header .brand { font-weight:700; opacity:1; margin-right:.6rem; }
main { padding:1rem 1.2rem; max-width:1300px; margin:0 auto; }
h1 { font-size:1.3rem; margin:.2rem 0 .8rem; } h2 { font-size:1.05rem; margin:1.4rem 0 .5rem; }
.card { background:var(--card); border:1px solid var(--line); border-radius:8px;
  padding:.8rem 1rem; margin-bottom:1rem; }
.figures { display:flex; gap:1.6rem; flex-wrap:wrap; align-items:center; }
.figure b { font-size:1.4rem; display:block; } .figure span { color:var(--muted); }
table { border-collapse:collapse; width:100%; }
th, td { text-align:left; padding:.3rem .5rem; border-bottom:1px solid var(--line);
  vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:.85rem; }
code, .mono { font-family:ui-monospace, SFMono-Regular, Menlo, monospace; font-size:.85rem; }
.state { display:inline-block; padding:0 .45rem; border-radius:9px; font-size:.8rem;
  background:#eef1f5; }
.state-done { background:#dcf5e3; color:var(--ok); }
.state-failed, .state-rejected, .state-cancelled { background:#fde4e1; color:var(--bad); }
.state-running { background:#dde9ff; color:var(--run); }
.state-paused { background:#fff1cc; color:var(--warn); }
.bar { width:140px; height:10px; background:#e7ebf0; border-radius:5px; overflow:hidden;
  display:inline-block; vertical-align:middle; }
.bar span { display:block; height:100%; background:var(--run); }
.gallery { display:flex; flex-wrap:wrap; gap:.5rem; }
.gallery a { display:block; position:relative; }
.gallery img { width:128px; height:128px; object-fit:cover; border-radius:6px;
  border:1px solid var(--line); background:#e7ebf0; display:block; }
.gallery .video::after { content:"\\25B6"; position:absolute; right:6px; bottom:4px;
  color:#fff; text-shadow:0 0 3px #000; }
.error { background:#fde4e1; color:#7a1d15; border-radius:6px; padding:.5rem .7rem;
  white-space:pre-wrap; }
.warning { background:#fff1cc; color:#5c3d00; border-radius:6px; padding:.4rem .7rem;
  margin:.3rem 0; }
.msg { background:#dde9ff; border-radius:6px; padding:.5rem .7rem; margin-bottom:1rem; }
.muted { color:var(--muted); }
form.inline { display:inline; }
button { font:inherit; padding:.25rem .8rem; border-radius:6px; border:1px solid var(--line);
  background:#fff; cursor:pointer; } button:hover { background:#eef1f5; }
button.danger { color:var(--bad); border-color:#f0b4ae; }
dl.params { display:grid; grid-template-columns:max-content 1fr; gap:.15rem 1rem; margin:0; }
dl.params dt { color:var(--muted); } dl.params dd { margin:0; word-break:break-word; }
details summary { cursor:pointer; color:var(--muted); }
"""

SCRIPT = """
(function () {
  const body = document.body;
  const api = body.dataset.api;
  const token = body.dataset.token;
  if (!api) return;
  function u(path) {
    return token ? path + (path.includes("?") ? "&" : "?") + "token=" +
      encodeURIComponent(token) : path;
  }
  function duration(s) {
    if (s === null || s === undefined) return "measuring\\u2026";
    s = Math.round(s);
    if (s < 60) return s + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + (s % 60) + " s";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }
  function cell(tr, text, cls) {
    const td = document.createElement("td");
    if (cls) td.className = cls;
    if (text instanceof Node) td.appendChild(text); else td.textContent = text;
    tr.appendChild(td);
    return td;
  }
  function setText(id, text) {
    const el = document.getElementById(id);
    if (el) el.textContent = text;
  }
  function row(r) {
    const tr = document.createElement("tr");
    tr.dataset.render = r.id;
    const a = document.createElement("a");
    a.href = u("/jobs/" + r.job_id);
    a.textContent = r.job + " (job " + r.job_id + ")";
    cell(tr, a);
    cell(tr, "#" + r.index);
    cell(tr, String(r.seed), "mono");
    cell(tr, r.checkpoint);
    const st = document.createElement("span");
    st.className = "state state-" + r.state;
    st.textContent = r.state;
    cell(tr, st);
    if (r.state === "running") {
      const wrap = document.createElement("span");
      const bar = document.createElement("span");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = Math.round(100 * r.progress) + "%";
      bar.appendChild(fill);
      wrap.appendChild(bar);
      wrap.appendChild(document.createTextNode(" " + r.progress_step + "/" + r.progress_total));
      cell(tr, wrap);
    } else {
      cell(tr, r.steps + " steps", "muted");
    }
    cell(tr, duration(r.eta_seconds));
    return tr;
  }
  function thumbs(items) {
    const box = document.getElementById("recent");
    if (!box) return;
    const key = items.map(function (t) { return t.render_id; }).join(",");
    if (box.dataset.key === key) return;
    box.dataset.key = key;
    box.replaceChildren();
    items.forEach(function (t) {
      const a = document.createElement("a");
      a.href = u("/jobs/" + t.job_id);
      if (t.video) a.className = "video";
      const img = document.createElement("img");
      img.className = "thumb";
      img.src = u("/thumbs/" + t.poster);
      img.alt = t.prompt;
      img.title = t.prompt + " (seed " + t.seed + ")";
      a.appendChild(img);
      box.appendChild(a);
    });
  }
  function show(q) {
    setText("done-count", q.done);
    setText("failed-count", q.failed);
    setText("queued-count", q.queued);
    setText("running-count", q.running_count);
    setText("hour-count", q.done_last_hour);
    setText("eta", q.queued + q.running_count ? duration(q.eta_seconds) : "idle");
    const paused = document.getElementById("paused-state");
    if (paused) {
      paused.textContent = q.paused ? "paused" : "rendering";
      paused.className = "state " + (q.paused ? "state-paused" : "state-running");
    }
    const tbody = document.getElementById("queue-body");
    if (tbody) {
      tbody.replaceChildren();
      q.running_renders.concat(q.queued_renders).forEach(function (r) {
        tbody.appendChild(row(r));
      });
      setText("queue-empty", q.running_renders.length + q.queued_renders.length ? "" :
        "Nothing queued.");
    }
    thumbs(q.recent);
    body.dataset.refreshed = q.at;
    // Counted for scripts that watch the page (the browser test waits on it).
    body.dataset.refreshes = String(Number(body.dataset.refreshes || 0) + 1);
  }
  async function tick() {
    try {
      const response = await fetch(u(api), {cache: "no-store"});
      if (response.ok) show(await response.json());
    } catch (e) { /* the daemon may be restarting: try again next tick */ }
    setTimeout(tick, 2000);
  }
  setTimeout(tick, 2000);
})();
"""

BASE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{% block title %}lorafarm{% endblock %}</title>
<style>{{ css|safe }}</style></head>
<body data-api="{% block api %}{% endblock %}" data-token="{{ token }}">
<header><a class="brand" href="{{ u('/') }}">lorafarm</a>
<a href="{{ u('/') }}">Queue</a><a href="{{ u('/history') }}">History</a>
<a href="{{ u('/loras') }}">LoRAs</a><a href="{{ u('/plugins') }}">Plugins</a>
<a href="{{ u('/metrics') }}">Metrics</a></header>
<main>
{% if msg %}<div class="msg" id="msg">{{ msg }}</div>{% endif %}
{% block main %}{% endblock %}
</main>
<script>{{ script|safe }}</script>
</body></html>
"""

MACROS = """
{% macro state(s) %}<span class="state state-{{ s }}">{{ s }}</span>{% endmacro %}
{% macro duration(s) -%}
{%- if s is none %}measuring…{% elif s < 60 %}{{ s|round|int }} s
{%- elif s < 3600 %}{{ (s // 60)|int }} min {{ (s % 60)|round|int }} s
{%- else %}{{ (s // 3600)|int }} h {{ ((s % 3600) // 60)|int }} min{% endif -%}
{%- endmacro %}
{% macro thumb(t, u) -%}
<a href="{{ u('/jobs/' ~ t.job_id) }}"{% if t.video %} class="video"{% endif %}>
<img class="thumb" src="{{ u('/thumbs/' ~ t.poster) }}" alt="{{ t.prompt or '' }}"
 title="{{ t.prompt or '' }} (seed {{ t.seed }})" loading="lazy"></a>
{%- endmacro %}
{% macro bar(step, total) -%}
<span><span class="bar"><span style="width: {{ (100 * step / total)|round|int if total else 0 }}%">
</span></span> {{ step }}/{{ total }}</span>
{%- endmacro %}
{% macro button(action, label, u, danger=False) -%}
<form class="inline" method="post" action="{{ u(action) }}">
<button type="submit"{% if danger %} class="danger"{% endif %}>{{ label }}</button></form>
{%- endmacro %}
"""

QUEUE = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block title %}lorafarm: queue{% endblock %}
{% block api %}/api/queue{% endblock %}
{% block main %}
<div class="card figures">
 <div class="figure"><b id="done-count">{{ q.done }}</b><span>done</span></div>
 <div class="figure"><b id="running-count">{{ q.running_count }}</b><span>running</span></div>
 <div class="figure"><b id="queued-count">{{ q.queued }}</b><span>queued</span></div>
 <div class="figure"><b id="failed-count">{{ q.failed }}</b><span>failed</span></div>
 <div class="figure"><b id="hour-count">{{ q.done_last_hour }}</b>
  <span>done in the last hour</span></div>
 <div class="figure"><b id="eta">{% if q.queued + q.running_count %}
  {{- m.duration(q.eta_seconds) }}{% else %}idle{% endif %}</b>
  <span>until the queue is empty</span></div>
 <div class="figure">
  <span id="paused-state" class="state {{ 'state-paused' if q.paused else 'state-running' }}">
   {{- 'paused' if q.paused else 'rendering' }}</span>
  <span class="muted">daemon
   {{ ('pid ' ~ daemon.pid) if daemon.running else 'not running' }}</span><br>
  {{ m.button('/pause', 'Pause', u) }} {{ m.button('/resume', 'Resume', u) }}
 </div>
</div>
<h2>Queue</h2>
<div class="card"><table><thead><tr><th>Job</th><th>Render</th><th>Seed</th>
<th>Checkpoint</th><th>State</th><th>Progress</th><th>ETA</th></tr></thead>
<tbody id="queue-body">
{% for r in q.running_renders + q.queued_renders %}
<tr data-render="{{ r.id }}">
 <td><a href="{{ u('/jobs/' ~ r.job_id) }}">{{ r.job }} (job {{ r.job_id }})</a></td>
 <td>#{{ r.index }}</td><td class="mono">{{ r.seed }}</td><td>{{ r.checkpoint }}</td>
 <td>{{ m.state(r.state) }}</td>
 <td>{% if r.state == 'running' %}{{ m.bar(r.progress_step, r.progress_total) }}
 {%- else %}<span class="muted">{{ r.steps }} steps</span>{% endif %}</td>
 <td>{{ m.duration(r.eta_seconds) }}</td></tr>
{% endfor %}
</tbody></table>
<p id="queue-empty" class="muted">
 {%- if not (q.running_renders or q.queued_renders) %}Nothing queued.{% endif %}</p></div>
<h2>Newest renders</h2>
<div class="card"><div class="gallery" id="recent">
 {%- for t in q.recent %}{{ m.thumb(t, u) }}{% endfor %}</div>
<p><a href="{{ u('/history') }}">All of the history →</a></p></div>
{% endblock %}
"""

HISTORY = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block title %}lorafarm: history{% endblock %}
{% block main %}
<h1>History</h1>
{% for job in jobs %}
<div class="card job" data-job="{{ job.id }}">
 <a href="{{ u('/jobs/' ~ job.id) }}"><b>{{ job.name }}</b></a>
 <span class="muted">job {{ job.id }} · {{ job.file }} · {{ job.checkpoint or '' }}
  · {{ job.created_at }}</span>
 {{ m.state(job.state) }}
 <span class="muted">{% for s, n in job.renders.items() %}{{ n }} {{ s }}
  {%- if not loop.last %}, {% endif %}{% endfor %}</span>
 {% if job.prompt %}<div class="muted">{{ job.prompt }}</div>{% endif %}
 {% if job.error %}<div class="error">{{ job.error }}</div>{% endif %}
 {% for f in job.failures %}<div class="error">{{ f }}</div>{% endfor %}
 {% if job.thumbs %}<div class="gallery">
  {%- for t in job.thumbs %}{{ m.thumb(t, u) }}{% endfor %}</div>{% endif %}
 {% if job.grids %}<div class="grids">sweep grid:
  {%- for g in job.grids %} <a href="{{ u('/files/' ~ g) }}">{{ g.rsplit('/', 1)[-1] }}</a>
  {%- endfor %}</div>{% endif %}
</div>
{% else %}<p class="muted">No jobs yet: drop a job file into the jobs folder.</p>
{% endfor %}
{% endblock %}
"""

JOB = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block title %}lorafarm: job {{ job.id }} {{ job.name }}{% endblock %}
{% block main %}
<h1>{{ job.name }} <span class="muted">job {{ job.id }}</span>
 <span id="job-state">{{ m.state(job.state) }}</span></h1>
<div class="card">
<dl class="params">
 <dt>file</dt><dd class="mono">{{ job.file_path or job.file }}</dd>
 <dt>queued</dt><dd>{{ job.created_at }}</dd>
 <dt>finished</dt><dd>{{ job.finished_at or '—' }}</dd>
 <dt>priority</dt><dd>{{ job.priority }}</dd>
</dl>
<p>{% if job.can_cancel %}
 {{- m.button('/jobs/' ~ job.id ~ '/cancel', 'Cancel job', u, danger=True) }}{% endif %}
{% if job.can_retry %}
 {{- m.button('/jobs/' ~ job.id ~ '/retry', 'Retry failed renders', u) }}{% endif %}</p>
{% if job.error %}<div class="error" id="job-error">{{ job.error }}</div>{% endif %}
{% if job.grids %}<p class="grids" id="job-grids">Sweep grid:
 {%- for g in job.grids %} <a href="{{ u('/files/' ~ g) }}">{{ g.rsplit('/', 1)[-1] }}</a>
 {%- endfor %}</p>{% endif %}
{% for w in job.warnings %}<div class="warning">{{ w }}</div>{% endfor %}
</div>
{% if job.job %}
<h2>Parameters</h2>
<div class="card"><dl class="params" id="job-params">
{% for key, value in job.job.items() if value is not none and value != [] and key != 'loras' %}
 <dt>{{ key }}</dt><dd class="mono">{{ value }}</dd>
{% endfor %}
</dl></div>
{% endif %}
{% if job.loras %}
<h2>LoRAs</h2>
<div class="card"><table id="job-loras"><thead><tr><th>LoRA</th><th>Strength</th>
<th>AutoV2</th><th>AutoV3</th><th>Family / lineage</th><th>Patched modules</th></tr></thead>
<tbody>
{% for l in job.loras %}
<tr><td><a href="{{ u('/loras') }}#lora-{{ l.name }}">{{ l.name }}</a>
  {%- if l.expert %} <span class="muted">({{ l.expert }} expert)</span>{% endif %}</td>
 <td>{{ l.strength }}{% if l.text_encoder_strength is not none %}
  / TE {{ l.text_encoder_strength }}{% endif %}</td>
 <td class="mono">{{ l.autov2 or '—' }}</td><td class="mono">{{ l.autov3 or '—' }}</td>
 <td>{{ l.family or '?' }} / {{ l.lineage or '?' }}</td>
 <td>{% if l.patched %}
  {%- for c, n in l.patched.items() %}{{ c }} {{ n }}{% if not loop.last %} · {% endif %}
  {%- endfor %}
  {%- if l.modules_in_file %}
  <span class="muted">({{ l.modules_in_file }} in the file)</span>{% endif %}
 {%- else %}<span class="muted">not rendered yet</span>{% endif %}</td></tr>
{% endfor %}</tbody></table></div>
{% endif %}
<h2>Renders</h2>
<div class="card"><table id="job-renders"><thead><tr><th>#</th><th>Seed</th><th>State</th>
<th>Attempts</th><th>Time</th><th>Output</th></tr></thead><tbody>
{% for r in job.renders %}
<tr data-render="{{ r.id }}"><td>{{ r.index }}</td><td class="mono">{{ r.seed }}</td>
 <td>{{ m.state(r.state) }}{% if r.state == 'running' and r.progress_total %}<br>
  {{- m.bar(r.progress_step or 0, r.progress_total) }}{% endif %}</td>
 <td>{{ r.attempts }}</td><td>{{ (r.seconds ~ ' s') if r.seconds is not none else '—' }}</td>
 <td>{% if r.file %}<div class="gallery">
  <a href="{{ u('/files/' ~ r.file) }}"{% if r.video %} class="video"{% endif %}>
  <img class="thumb" src="{{ u('/thumbs/' ~ r.poster) }}" alt="render {{ r.index }}"></a></div>
  <span class="mono muted">{{ r.file }}{% if r.frames %}
   · {{ r.frames }} frames at {{ r.fps }} fps{% endif %}</span>{% endif %}
 {% if r.error %}<div class="error">{{ r.error }}</div>{% endif %}
 {% if r.scores or r.tags or r.gate %}<div class="muted post">
  {%- for name, value in r.scores.items() %}{{ name }} <b>{{ value }}</b>
  {%- if not loop.last %} · {% endif %}{% endfor %}
  {%- if r.gate %} <span class="error">{{ r.gate }}</span>{% endif %}
  {%- if r.tags %}<br>tags: {{ r.tags | join(', ') }}{% endif %}</div>{% endif %}
 <details><summary>render parameters</summary><dl class="params">
 {% for key, value in r.spec.items() if value is not none and value != [] and value != {} %}
  <dt>{{ key }}</dt><dd class="mono">{{ value }}</dd>{% endfor %}
 </dl></details></td></tr>
{% endfor %}</tbody></table></div>
<h2>Events</h2>
<div class="card"><table id="job-events"><thead><tr><th>At (UTC)</th><th>Event</th>
<th>Render</th><th>Message</th></tr></thead><tbody>
{% for e in job.events %}<tr><td class="mono">{{ e.at }}</td><td>{{ e.kind }}</td>
 <td>{{ e.render_id or '' }}</td><td>{{ e.message }}</td></tr>{% endfor %}
</tbody></table></div>
{% endblock %}
"""

LORAS = """{% extends "base.html" %}{% import "macros.html" as m %}
{% block title %}lorafarm: LoRA library{% endblock %}
{% block main %}
<h1>LoRA library</h1>
<div class="card"><table id="loras"><thead><tr><th>Name</th><th>Family</th><th>Lineage</th>
<th>Layout / rank</th><th>Triggers</th><th>AutoV2 / AutoV3</th><th>State</th></tr></thead>
<tbody>
{% for l in loras %}
<tr id="lora-{{ l.name }}">
 <td><b>{{ l.name }}</b><br><span class="mono muted">{{ l.path }}</span></td>
 <td>{{ l.family or '?' }}
  {%- if l.variant %} <span class="muted">{{ l.variant }}</span>{% endif %}
  {%- if l.expert %} <span class="muted">{{ l.expert }} expert</span>{% endif %}</td>
 <td>{{ l.lineage or '?' }}{% if l.lineage_source %}<br>
  <span class="muted">{{ l.lineage_source }}</span>{% endif %}</td>
 <td>{{ l.layout or '?' }} r{{ l.rank or '?' }}</td>
 <td>{{ l.triggers|join(', ') }}</td>
 <td class="mono">{{ l.autov2 or '—' }}<br>{{ l.autov3 or '—' }}</td>
 <td>{{ m.state(l.state) }}
  {%- if l.reason and l.state != 'ok' %}<div class="error">{{ l.reason }}</div>
  {%- elif l.reason %}<br><span class="muted">{{ l.reason }}</span>{% endif %}</td></tr>
{% else %}<tr><td colspan="7" class="muted">
 No LoRAs yet: put .safetensors files into the loras folder.</td></tr>
{% endfor %}</tbody></table></div>
<h2>Embeddings</h2>
<div class="card"><table id="embeddings"><thead><tr><th>Name</th><th>For</th><th>Vectors</th>
<th>AutoV2</th><th>State</th></tr></thead>
<tbody>
{% for e in embeddings %}
<tr id="embedding-{{ e.name }}">
 <td><b>{{ e.name }}</b><br><span class="mono muted">{{ e.path }}</span></td>
 <td>{{ e.architecture or '?' }}</td><td>{{ e.vectors or '?' }}</td>
 <td class="mono">{{ e.autov2 or '—' }}</td>
 <td>{{ m.state(e.state) }}{% if e.state != 'ok' %}<div class="error">{{ e.reason }}</div>
  {%- endif %}</td></tr>
{% else %}<tr><td colspan="5" class="muted">
 No embeddings: put .safetensors textual-inversion files into the embeddings folder; a
 prompt uses one by naming it.</td></tr>
{% endfor %}</tbody></table></div>
{% endblock %}
"""

PLUGINS = """{% extends "base.html" %}
{% block title %}lorafarm: plugins{% endblock %}
{% block main %}
<h1>Plugins</h1>
{% if report.skipped %}
<div class="card"><h2>Skipped</h2><table id="plugins-skipped"><thead><tr><th>Plugin</th>
<th>From</th><th>Reason</th></tr></thead><tbody>
{% for p in report.skipped %}
<tr id="skipped-{{ p.name }}"><td><b>{{ p.name }}</b><br><span class="mono muted">{{ p.module }}
 </span></td>
 <td>{{ p.distribution or '' }} {{ p.version or '' }}<br><span class="muted">{{ p.source }}</span>
 </td><td><div class="error">{{ p.reason }}</div></td></tr>
{% endfor %}</tbody></table></div>
{% endif %}
<div class="card"><table id="plugins"><thead><tr><th>Plugin</th><th>From</th>
<th>Families</th><th>Job formats</th><th>Hooks</th></tr></thead><tbody>
{% for p in report.loaded %}
<tr id="plugin-{{ p.name }}"><td><b>{{ p.name }}</b><br><span class="mono muted">{{ p.module }}
 </span></td>
 <td>{{ p.distribution or '' }} {{ p.version or '' }}<br><span class="muted">{{ p.source }}</span>
 </td><td>{{ p.families|join(', ') }}</td><td>{{ p.job_formats|join(', ') }}</td>
 <td>{{ p.hooks|join(', ') }}{% for problem in p.problems %}
  <div class="error">{{ problem }}</div>{% endfor %}</td></tr>
{% endfor %}</tbody></table></div>
{% endblock %}
"""

ERROR = """{% extends "base.html" %}
{% block title %}lorafarm: {{ title }}{% endblock %}
{% block main %}<h1>{{ title }}</h1><div class="error">{{ message }}</div>
<p><a href="{{ u(back) }}">Back</a></p>{% endblock %}
"""

TEMPLATES = {"base.html": BASE, "macros.html": MACROS, "queue.html": QUEUE,
             "history.html": HISTORY, "job.html": JOB, "loras.html": LORAS, "error.html": ERROR,
             "plugins.html": PLUGINS}
