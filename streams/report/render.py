"""The report as one self-contained HTML page: a verdict, why, what it is about, and its evidence.

Shareable means it is opened by people who did not make it, so the page holds no script and loads
nothing (its Content-Security-Policy says ``default-src 'none'``; styles and SVG are inline), and
every text from the data is escaped: model and candidate names, reasons, request ids, slice values
and attributes come from producers and operators, and a producer's attribute is not trusted HTML.
"""

from __future__ import annotations

from datetime import UTC, datetime
from html import escape
from typing import Any

from schemas import Verdict
from scorers.kinds import KINDS
from streams.report.charts import fmt, interval_strip, line_chart
from streams.report.gather import ReportData, Section

CSP = "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
COLOURS = {"promote": "#2e7d32", "hold": "#b26a00", "rollback": "#c62828"}
DECISION_MARKS = {"pass": "✓ pass", "fail": "✗ fail", "inconclusive": "? open"}
# What each judged metric is, beside the kind's own two (its disagreement and severity).
METRIC_DOCS = {
    "error_rate": "candidate errors / requests on valid input (critical: rolls back even while data checks fail)",
    "accuracy_drop": "baseline accuracy - candidate accuracy on labelled requests (paired)",
    "latency_p50_ratio": "candidate / baseline median latency",
}
STYLE = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px;margin:0 0 6px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:3px}
.badge{display:inline-block;color:#fff;font-weight:700;padding:4px 12px;border-radius:4px;font-size:18px;
letter-spacing:.04em}
table{border-collapse:collapse;margin:6px 0}td,th{border-bottom:1px solid #eee;padding:4px 8px;text-align:left;
vertical-align:top}th{background:#fafafa;font-weight:600}td.n{text-align:right;font-variant-numeric:tabular-nums}
.fail{color:#c62828;font-weight:600}.pass{color:#2e7d32}.inconclusive{color:#8a6d00}.muted{color:#777}
code{font-size:12px;background:#f5f5f5;padding:1px 3px;border-radius:2px;word-break:break-all}
.ct{font-size:12px;font-weight:600}table.metrics td:first-child{min-width:230px}.ax{font-size:10px;fill:#555}svg{display:block}
"""


def render(data: ReportData) -> str:
    v = data.verdict
    title = f"{v.model} / {v.candidate}: {v.verdict}"
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="referrer" content="no-referrer">',
        f"<title>shadowlens: {escape(title)}</title><style>{STYLE}</style></head><body>",
        _headline(v), _reasons(v), _about(v), _metrics(v), _slices(v), _windows(v, data.windows),
        _history(data.history), _examples(v, data.examples), _registry(data.registry),
        f'<p class="muted">Made by shadowlens at {_when(data.generated_at)} from {escape(data.source)}. '
        "A copy: it does not change when the verdict does; the verdicts API serves the current one. "
        "No script and nothing loaded from elsewhere.</p>",
        "</body></html>",
    ]  # fmt: skip
    return "\n".join(parts)


def _when(moment: datetime | None) -> str:
    return "–" if moment is None else escape(moment.strftime("%Y-%m-%d %H:%M:%S UTC"))


def _table(headers: list[str], rows: list[list[str]], numeric: set[int] = frozenset(), css: str = "") -> str:
    """``rows`` hold HTML already escaped by the caller; ``css``: the table's class."""
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f'<td class="n">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)  # fmt: skip
    return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _unavailable(what: str, section: Section) -> str | None:
    if section.unavailable is not None:
        return f'<p class="muted">{escape(what)} could not be read: {escape(section.unavailable)}</p>'
    return None


def _headline(v: Verdict) -> str:
    colour = COLOURS.get(v.verdict, "#555")
    facts = [f"state <b>{escape(v.state)}</b>", f"output kind <b>{escape(v.kind)}</b>",
             f"{v.samples:,} scored requests", f"windows {_when(v.window_start)} to {_when(v.window_end)}",
             f"written {_when(v.updated_at)}" + ("" if v.age_s is None else f" ({fmt(v.age_s, 3)} s before this "
                                                 "report)")]  # fmt: skip
    if v.last_decision is not None:
        facts.append(f"the judge's own decision: <b>{escape(v.last_decision)}</b>")
    if v.blocking_metric:
        facts.append(f"waiting for <code>{escape(v.blocking_metric)}</code>")
    if v.requests_needed:
        facts.append(f"about {v.requests_needed:,} more requests to decide")
    return (f"<h1>{escape(v.model)} / {escape(v.candidate)}</h1>"
            f'<p><span class="badge" style="background:{colour}">{escape(v.verdict.upper())}</span></p>'
            f"<p>{' · '.join(facts)}</p>")  # fmt: skip


def _reasons(v: Verdict) -> str:
    items = "".join(f"<li>{escape(r)}</li>" for r in v.reasons) or "<li>(none given)</li>"
    return f"<h2>Why</h2><ul>{items}</ul>"


def _about(v: Verdict) -> str:
    kind = KINDS.get(v.kind)
    disagree = escape(kind.disagree_doc) if kind else "the kind's disagreement event"
    severity = escape(kind.severity_doc) if kind else "the kind's severity"
    counts = []
    if v.unscorable:
        counts.append(f"{v.unscorable:,} requests could not be compared (the producer's payload or the config: "
                      "dead letters, never counted against the candidate)")  # fmt: skip
    for what, n in sorted(v.cast.items()):
        counts.append(f"{n:,} requests scored after the cast policy converted <code>{escape(what)}</code>")
    extra = "".join(f"<li>{c}</li>" for c in counts)
    return ("<h2>What this verdict is about</h2><ul>"
            "<li>The candidate and the baseline answer <b>the same requests</b> (mirrored production traffic, "
            "replayed); every metric is a paired difference, bigger is worse, held to a margin fixed in the "
            "policy before the traffic was seen.</li>"
            f"<li><code>label_flip_rate</code>: the share of scored requests where {disagree}; "
            f"<code>abs_confidence_delta</code>: the mean of {severity}. Both are rates over requests, every "
            "request weighing the same (a popular input counts as often as it is asked), minus the noise floor "
            "when the baseline is replayed beside the candidate.</li>"
            "<li>Intervals are anytime-valid confidence sequences: the verdict may be read at any time, as often "
            "as a gate polls, without inflating false alarms. Requests of one user or input close together in time "
            "are judged as one dependent cluster.</li>"
            "<li>Only what the candidate does wrong on valid input counts against it.</li>"
            f"{extra}</ul>")  # fmt: skip


def _metrics(v: Verdict) -> str:
    if not v.metrics:
        return "<h2>Metrics</h2><p class='muted'>No metric judged yet.</p>"
    rows = []
    for m in v.metrics:
        doc = METRIC_DOCS.get(m.name, "")
        if m.name.startswith("latency_p") and not doc:
            doc = f"candidate / baseline latency at the {escape(m.name.split('_')[1])} quantile"
        name = f"<code>{escape(m.name)}</code>" + (" (critical)" if m.critical else "")
        if doc:
            name += f'<br><span class="muted">{escape(doc)}</span>'
        rows.append([name, fmt(m.estimate), f"[{fmt(m.lower)}, {fmt(m.upper)}]", fmt(m.margin),
                     interval_strip(m.estimate, m.lower, m.upper, m.margin),
                     f'<span class="{escape(m.decision)}">{DECISION_MARKS.get(m.decision, escape(m.decision))}</span>',
                     f"{m.samples:,}", escape(m.detail)])  # fmt: skip
    legend = ("<p class='muted'>Bar: the interval; dot: the estimate; red tick: the margin. A fail is an interval "
              "wholly above its margin, a pass one wholly below.</p>")  # fmt: skip
    return "<h2>Metrics</h2>" + _table(["metric", "estimate", "interval", "margin", "", "decision", "samples",
                                        "detail"], rows, numeric={1, 3, 6}, css="metrics") + legend  # fmt: skip


def _slices(v: Verdict) -> str:
    if not v.worst_slices:
        return ""
    rows = [[f"<code>{escape(s.attribute)}</code> = <code>{escape(s.value)}</code>", escape(s.metric), fmt(s.estimate),
             f"[{fmt(s.lower)}, {fmt(s.upper)}]", f"{s.samples:,}",
             f'<span class="{escape(s.decision)}">{DECISION_MARKS.get(s.decision, escape(s.decision))}</span>']
            for s in v.worst_slices]  # fmt: skip
    flagged = f"{v.failed_slices} slice(s) confidently above their margin (e-BH). " if v.failed_slices else ""
    return (f"<h2>Worst slices</h2><p>{flagged}Slices are the request attributes the producer sends.</p>"
            + _table(["slice", "metric", "estimate", "interval", "samples", "decision"], rows, numeric={2, 4}))


def _windows(v: Verdict, windows: Section) -> str:
    missing = _unavailable("The windows", windows)
    if missing:
        return "<h2>Windows</h2>" + missing
    ws = windows.rows
    times = [w.window_start for w in ws]
    margin = next((m.margin for m in v.metrics if m.name == "label_flip_rate"), None)
    flips = line_chart(times, [("disagreement rate", "#c62828", [w.flip_rate for w in ws]),
                               ("mean severity", "#1565c0", [w.mean_abs_confidence_delta for w in ws])],
                       "Per window: label_flip_rate and abs_confidence_delta (raw, before the noise floor)",
                       reference=("flip margin", margin) if margin is not None else None)  # fmt: skip
    latency = line_chart(times, [("baseline p95", "#555", [w.baseline_latency_p95_ms for w in ws]),
                                 ("candidate p95", "#1565c0", [w.candidate_latency_p95_ms for w in ws])],
                         "Per window: latency p95 (ms)")  # fmt: skip
    recent = [[_when(w.window_start), f"{w.requests:,}", f"{w.errors:,}", fmt(w.flip_rate),
               fmt(w.mean_abs_confidence_delta), fmt(w.baseline_latency_p95_ms), fmt(w.candidate_latency_p95_ms),
               f"{w.duplicates_dropped:,}"] for w in reversed(ws[-20:])]  # fmt: skip
    table = _table(["window start", "requests", "errors", "flip rate", "|Δ|", "baseline p95 ms", "candidate p95 ms",
                    "duplicates"], recent, numeric={1, 2, 3, 4, 5, 6, 7})  # fmt: skip
    return (f"<h2>Windows</h2><p class='muted'>{len(ws)} closed window(s); the judge's verdict rests on all of them "
            f"together, not on any one.</p>{flips}{latency}<p>The last {len(recent)}, newest first:</p>{table}")


def _history(history: Section) -> str:
    missing = _unavailable("The verdict history", history)
    if missing:
        return "<h2>Verdict history</h2>" + missing
    rows = [[_when(c.changed_at), escape(c.from_verdict or "(first)"), f"<b>{escape(c.to_verdict)}</b>",
             f"{c.samples:,}", f"<code>{escape(c.decided_by or '')}</code>", f"<code>{escape(c.policy_hash)}</code>",
             escape(c.reason)] for c in history.rows]  # fmt: skip
    if not rows:
        return "<h2>Verdict history</h2><p class='muted'>No verdict stored yet.</p>"
    return "<h2>Verdict history</h2>" + _table(["when", "from", "to", "samples", "decided by", "policy", "reason"],
                                               rows, numeric={3})  # fmt: skip


def _examples(v: Verdict, examples: Section) -> str:
    missing = _unavailable("The example requests", examples)
    if missing:
        return "<h2>Example requests</h2>" + missing
    if not examples.rows:
        return ""
    classes = v.kind == "classification"
    rows = []
    for e in examples.rows:
        answer = f"{e['baseline_label']} → {e['candidate_label']}" if classes else ("differs" if e["label_flip"] else "")
        rows.append([f"<code>{escape(str(e['request_id']))}</code>", _when(_utc(e["sent_at"])), answer,
                     fmt(e["confidence_delta"]), _ms(e["baseline_latency_ms"]), _ms(e["candidate_latency_ms"]),
                     escape(str(e["error"] or "")), _pairs(e["attributes"]),
                     _pairs({k: fmt(None if x is None else float(x), 3) for k, x in sorted((e["metrics"] or {}).items())})])  # fmt: skip
    return ("<h2>Example requests</h2><p>The largest diffs behind the verdict, as stored in "
            "<code>request_diffs</code> (pull the rest with <code>shadowlens query</code>). Latency '–': the "
            "request was scored in its micro-batch and not timed alone (sampled timing).</p>"
            + _table(["request id", "sent", "label" if classes else "disagrees", "confidence_delta", "baseline ms",
                      "candidate ms", "error", "attributes", "metrics"], rows, numeric={3, 4, 5}))  # fmt: skip


def _ms(value: Any) -> str:
    return "–" if value is None or value != value else fmt(float(value))


def _registry(registry: Section) -> str:
    missing = _unavailable("The candidate's registry history", registry)
    if missing:
        return "<h2>Candidate</h2>" + missing
    if not registry.rows:
        return ""
    rows = [[_when(_utc(r["at"])), str(int(r["version"])), escape(str(r["source"])), escape(str(r["state"])),
             f"<code>{escape(str(r['sha256'])[:16])}</code>", escape(str(r["by"])), escape(str(r["reason"]))]
            for r in registry.rows]  # fmt: skip
    return ("<h2>Candidate</h2><p>Its registry records, newest first (artifact SHA-256 cut to 16 hex digits).</p>"
            + _table(["when", "version", "source", "state", "artifact", "by", "reason"], rows))


def _pairs(mapping: Any) -> str:
    if not mapping:
        return ""
    return " ".join(f"<code>{escape(str(k))}={escape(str(val))}</code>" for k, val in dict(mapping).items())


def _utc(value: Any) -> datetime | None:
    """A DateTime64 from the analyst session: a datetime, or its text through the worker's pipe."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    if isinstance(value, str) and value:
        return datetime.fromisoformat(value.replace(" ", "T")).replace(tzinfo=UTC)
    return None
