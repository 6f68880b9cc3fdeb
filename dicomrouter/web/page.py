"""The status page: one server-rendered HTML page, no build step, no external assets.

Every value is escaped (``html.escape``): study descriptions and AE titles come from the wire.
The page reloads itself every 10 s; the retry button posts to the API with the token the
operator typed once (kept in the browser's sessionStorage, never in the page).
"""

from __future__ import annotations

import datetime as dt
import time
from html import escape
from typing import Any

from ..config.processing import PROCESS_PREFIX
from .steps import processing_rows

REFRESH_S = 10
HOURS = 24

CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:0;padding:12px;background:#f6f7f9;color:#222}
h1{font-size:20px;margin:0 0 8px}h2{font-size:16px;margin:18px 0 6px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px 10px;margin-bottom:10px;
overflow-x:auto}table{border-collapse:collapse;width:100%}td,th{padding:4px 6px;text-align:left;
border-bottom:1px solid #eee;white-space:nowrap}th{font-weight:600;color:#555}
.ok{color:#11703a}.bad{color:#b3261e}.warn{color:#9a6700}.uid{font-family:monospace;font-size:12px}
.bar{display:inline-block;width:80px;height:8px;background:#eee;border-radius:4px;vertical-align:middle}
.bar i{display:block;height:8px;background:#2e7d32;border-radius:4px}
button{font:inherit;padding:2px 10px;border:1px solid #888;border-radius:4px;background:#fff}
input{font:inherit;padding:2px 6px;width:14em}.muted{color:#777}
"""

SCRIPT = """
const tok=document.getElementById('token');tok.value=sessionStorage.getItem('drtoken')||'';
tok.addEventListener('change',()=>sessionStorage.setItem('drtoken',tok.value));
async function retryJob(id){
  const t=sessionStorage.getItem('drtoken')||tok.value;
  // no token typed: the browser's basic-auth login (off loopback) carries it
  const r=await fetch('/api/jobs/'+id+'/retry',{method:'POST',
    headers:t?{'Authorization':'Bearer '+t}:{}});
  const out=document.getElementById('msg');
  out.textContent=r.ok?('job '+id+' requeued'):('retry refused: '+r.status+' '
    +(await r.json()).detail);
  out.className=r.ok?'ok':'bad';
  if(r.ok){setTimeout(()=>location.reload(),800);}
}
setTimeout(()=>{if(!document.activeElement||document.activeElement.id!=='token')
  location.reload();},RELOAD_MS);
""".replace("RELOAD_MS", str(REFRESH_S * 1000))


LOGIN_REQUIRED = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<title>dicomrouter: log in</title></head><body style="font-family:system-ui,sans-serif">
<h1>dicomrouter</h1><p>This router's status page is reachable from the network, so it asks
for the web token: log in with any user name and the token (the value of the environment
variable named by <code>web.token_env</code>) as the password.</p></body></html>"""


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S" if time.time() - ts < 86400
                                                   else "%Y-%m-%d %H:%M")


def _state_class(state: str) -> str:
    return {"delivered": "ok", "dead": "bad", "failed": "warn", "unrouted": "warn",
            "held": "warn", "rejected": "bad"}.get(state, "")


def _progress(job: dict[str, Any]) -> str:
    total = max(int(job["total"]), 1)
    pct = min(100, int(100 * int(job["delivered"]) / total))
    return (f'<span class="{_state_class(job["state"])}">{escape(job["destination"])}: '
            f'{escape(job["state"])}</span> <span class="bar"><i style="width:{pct}%"></i>'
            f'</span> {job["delivered"]} of {job["total"]}' +
            (f' <span class="warn">partial: {int(job["missing"])} missing</span>'
             if job.get("missing") else "") +
            (f' <span class="warn">priority {escape(job["priority"])}</span>'
             if job.get("priority", "routine") != "routine" else ""))


def _chart(points: list[tuple[float, int]]) -> str:
    """Instances received per minute over the last hour, as an inline SVG bar chart."""
    if not points:
        return '<p class="muted">nothing received in the last hour</p>'
    w, h, n = 600, 80, 60
    top = max(c for _, c in points) or 1
    start = time.time() - n * 60
    bars = []
    for t, c in points:
        i = int((t - start) // 60)
        if 0 <= i < n:
            bh = max(1, int(h * c / top))
            bars.append(f'<rect x="{i * w / n:.1f}" y="{h - bh}" width="{w / n - 1:.1f}" '
                        f'height="{bh}" fill="#1565c0"><title>{c} instance(s) at '
                        f'{_when(t)}</title></rect>')
    return (f'<svg viewBox="0 0 {w} {h + 14}" width="100%" role="img" aria-label="instances '
            f'received per minute">{"".join(bars)}<text x="0" y="{h + 12}" font-size="10">'
            f'-60 min</text><text x="{w - 24}" y="{h + 12}" font-size="10">now</text>'
            f'<text x="{w - 120}" y="10" font-size="10">max {top}/min</text></svg>')


def _breaker_note(breaker: dict[str, Any]) -> str:
    """Under an open breaker's health: since when, the probes, the next one."""
    if breaker.get("state") != "open":
        return ""
    return (f'<br><span class="muted">since {_when(breaker["since"])}, '
            f'{breaker["failed_probes"]} failed probe(s) ({escape(breaker["probe"])}), next at '
            f'{_when(breaker["next_probe"])}</span>')


def _spread(dest: dict[str, Any]) -> str:
    """Under a group's type: studies per member (destination groups)."""
    spread = dest.get("group")
    if not spread:
        return ""
    return '<br><span class="muted">' + escape(", ".join(
        f"{m} {n}" for m, n in sorted(spread["studies"].items())) or "no study yet") + \
        (f', {spread["moved"]} moved' if spread["moved"] else "") + "</span>"


STEP_CLASS = {"done": "ok", "failed": "bad", "could not start": "bad", "running": "warn",
              "waiting": "warn", "pending": "muted"}


def _processing(router: Any) -> str:
    """The Processing card: studies in processing, each step's state (web/steps.py)."""
    if not any(d.startswith(PROCESS_PREFIX) for d in router.cfg.destinations):
        return ""
    rows = []
    for r in processing_rows(router.state, router.cfg):
        jobs = "<br>".join(f'<span class="{_state_class(j["state"])}">'
                           f'{escape(j["destination"])}: {escape(j["state"])}</span>'
                           for j in r["jobs"])
        steps = "<br>".join(
            f'<span class="{STEP_CLASS.get(s["state"], "")}">{escape(s["route"])} / '
            f'{escape(s["name"])}: {escape(s["state"])}</span>'
            + (f' (attempt {int(s["attempts"])})' if s["attempts"] > 1 else "")
            + (f' <span class="muted">{_when(s["since"])}</span>' if s["since"] else "")
            + (f'<br><span class="muted">{escape(s["summary"][:160])}</span>'
               if s["summary"] else "") for s in r["steps"])
        rows.append(f'<tr><td class="uid" title="{escape(r["study_uid"])}">'
                    f'{escape(r["study_uid"][-24:])}</td><td>{escape(r["patient_id"] or "-")}'
                    f'</td><td>{jobs}</td><td>{steps or "-"}</td></tr>')
    return ('<h2>Processing</h2><div class="card" id="processing">' +
            ('<table><tr><th>study</th><th>patient</th><th>job</th><th>steps</th></tr>'
             + "".join(rows) + '</table>' if rows else
             '<p class="muted">nothing in processing in the last hour</p>') + '</div>')


def render(router: Any, destinations: list[dict[str, Any]]) -> str:
    state = router.state
    since = time.time() - HOURS * 3600
    studies = state.recent_studies(200, 0, None, None, since)
    jobs = state.jobs(study_uids=[s["study_uid"] for s in studies])
    dead = state.jobs("dead", limit=200)
    sources = state.source_rows()
    by_study: dict[str, list[dict[str, Any]]] = {}
    for j in jobs:
        by_study.setdefault(j["study_uid"], []).append(j)
    rows = []
    for s in studies:
        progress = "<br>".join(_progress(j) for j in by_study.get(s["study_uid"], [])) or \
            '<span class="muted">-</span>'
        rows.append(
            f'<tr><td>{_when(s["first_received"])}</td>'
            f'<td class="{_state_class(s["state"])}">{escape(s["state"])}'
            + (f' <span class="warn" title="{escape(s["incomplete"])}">incomplete</span>'
               if s.get("incomplete") else "") + '</td>'
            f'<td>{progress}</td>'
            f'<td class="uid" title="{escape(s["study_uid"])}">{escape(s["study_uid"][-24:])}'
            f'</td><td>{escape(s["patient_id"] or "-")}</td>'
            f'<td>{escape(s["calling_ae"] or "-")}</td><td>{s["instances"]}</td></tr>')
    dest_rows = [
        f'<tr><td>{escape(d["name"])}</td><td>{escape(d["type"])}{_spread(d)}</td>'
        f'<td class="{"ok" if d["health"] == "ok" else "bad"}">{escape(d["health"])}'
        f'{_breaker_note(d["breaker"])}</td>'
        f'<td>{d["depth"]}</td><td>{d["queue"].get("dead", 0)}</td>'
        f'<td>{escape((d["last_error"] or "")[:160])}</td></tr>' for d in destinations]
    dead_rows = [
        f'<tr><td><button onclick="retryJob({int(j["id"])})" id="retry-{int(j["id"])}">Retry'
        f'</button></td><td>{escape(j["destination"])}</td>'
        f'<td class="uid">{escape(j["study_uid"][-24:])}</td><td>{j["attempts"]}</td>'
        f'<td>{escape((j["last_error"] or "")[:200])}</td></tr>' for j in dead]
    held_rows = [
        f'<tr><td class="uid">{escape(h["study_uid"])}</td><td>{escape(h["patient_id"] or "-")}'
        f'</td><td>{escape(", ".join(h["destinations"]))}</td><td>{_when(h["since"])}</td></tr>'
        for h in state.held_studies()]
    source_rows = [
        f'<tr><td>{escape(r["name"])}</td><td class="{"bad" if r["last_error"] else "ok"}">'
        f'{escape(r["last_error"] or "ok")}</td><td>{_when(r["last_poll"])}</td>'
        f'<td>{r["studies_pulled"]}</td></tr>' for r in sources]
    cfg = router.cfg
    return f"""<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>dicomrouter {escape(cfg.ae_title)}</title><style>{CSS}</style></head><body>
<h1>dicomrouter <span class="muted">{escape(cfg.ae_title)} on port {cfg.port}</span></h1>
<div class="card">Token for actions: <input id="token" type="password" autocomplete="off"
 placeholder="web.token_env value"> <span id="msg"></span></div>
<h2>Received, last hour</h2><div class="card">{_chart(state.throughput(time.time() - 3600, 60))}
</div>
<h2>Destinations</h2><div class="card"><table><tr><th>name</th><th>type</th><th>health</th>
<th>queue</th><th>dead</th><th>last error</th></tr>{"".join(dest_rows)}</table></div>
<h2>Dead jobs</h2><div class="card" id="dead">{'<table><tr><th></th><th>destination</th>'
'<th>study</th><th>attempts</th><th>error</th></tr>' + "".join(dead_rows) + '</table>' if dead_rows
else '<p class="muted">none</p>'}</div>
<h2>Held</h2><div class="card" id="held">{'<table><tr><th>study</th><th>patient</th>'
'<th>held for</th><th>since</th></tr>' + "".join(held_rows) + '</table><p class="muted">'
'dicomrouter release STUDY --reason ... (or POST /api/studies/{uid}/release) delivers; reject'
' drops</p>' if held_rows else '<p class="muted">none</p>'}</div>
{_processing(router)}
{'<h2>Sources</h2><div class="card"><table><tr><th>name</th><th>health</th><th>last poll</th>'
 '<th>studies pulled</th></tr>' + "".join(source_rows) + '</table></div>' if source_rows else ''}
<h2>Studies, last {HOURS} hours</h2><div class="card" id="studies"><table><tr><th>received</th>
<th>state</th><th>destinations</th><th>study</th><th>patient</th><th>from</th>
<th>instances</th></tr>{"".join(rows) or '<tr><td colspan="7" class="muted">none</td></tr>'}
</table></div>
<p class="muted">Refreshes every {REFRESH_S} s · <a href="/metrics">metrics</a> ·
<a href="/openapi.json">API schema</a></p>
<script>{SCRIPT}</script></body></html>"""
