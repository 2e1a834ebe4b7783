"""The report as one self-contained HTML page (inline CSS and SVG, no script, no external asset):
what a person reads, rendered from the same dict the JSON report holds, by the CLI and the service."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from html import escape
from typing import Any

from graphprune.report import svg

SHOWN_LAYERS = 60  # rows of the per-layer chart and tables; the JSON report holds the rest
STYLE = """
body{font-family:system-ui,sans-serif;margin:24px auto;max-width:1100px;color:#222;padding:0 16px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}td.n{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4e0;border-left:4px solid #f28e2b;padding:6px 10px;margin:4px 0}
.ok{color:#2a7a2a}.bad{color:#b00020}.muted{color:#777;font-size:13px}.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}
code{font-size:12px}
"""


def render(report: dict[str, Any], title: str = "graphprune report") -> str:
    sections = [_summary(report), _warnings(report.get("warnings", [])), _validation(report.get("validation", {})),
                _latency_target(report.get("latency") or {}), _streams(report.get("streams", {})),
                _layers(report.get("groups", {})),
                _compensation(report.get("compensation", {})),
                _recovery(report.get("recovery", {})), _blocked(report.get("groups", {})),
                _config(report.get("config", {}), report.get("timings_s", {}))]
    return ("<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width\"><title>{escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{escape(title)}</h1>"
            + "".join(s for s in sections if s) + "</body></html>")


def _table(head: Sequence[str], rows: Iterable[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    cells = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(
        f'<td class="n">{_num(v)}</td>' if i in numeric else f"<td>{escape(str(v))}</td>"
        for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><tr>{cells}</tr>{body}</table>"


def _num(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def _removed(d: dict[str, Any]) -> str:
    before, after = d.get("before"), d.get("after")
    return f"{1 - after / before:.1%}" if before and after is not None else "n/a"


def _summary(r: dict[str, Any]) -> str:
    lat = r.get("validation", {}).get("latency_ms", {})
    rows = [("parameters", r["params"]), ("MACs", r["flops"]), ("bytes", r["bytes"])]
    table = _table(["", "before", "after", "removed"],
                   [(name, d["before"], d["after"], _removed(d)) for name, d in rows], numeric=(1, 2))
    labels = ["params", "MACs", "bytes"]
    before = [float(r["params"]["before"]), float(r["flops"]["before"]), float(r["bytes"]["before"])]
    after = [float(r["params"]["after"]), float(r["flops"]["after"]), float(r["bytes"]["after"])]
    if lat.get("before") and lat.get("after"):
        labels.append("latency ms")
        before.append(float(lat["before"]))
        after.append(float(lat["after"]))
        table += _latency(lat)
    chart = svg.grouped_bars("before and after", labels,
                             [svg.Series("before", before), svg.Series("after", after)])
    g = r.get("groups", {})
    model = r.get("model", {})
    inputs = ", ".join(f"{i['name']} {i['shape']}" + (f" ({i['source']})" if i.get("source") else "")
                       for i in model.get("inputs", []))
    folded = r.get("graph", {}).get("batchnorms_folded")
    fused = r.get("graph", {}).get("hardswish_fused")
    facts = (f"<p>{model.get('nodes', '?')} nodes, opset {model.get('opset', '?')}; inputs: {escape(inputs)}. "
             f"Groups: {g.get('total', 0)} total, {g.get('prunable', 0)} prunable, {g.get('pruned', 0)} pruned."
             + (f" {folded} BatchNormalization node(s) folded into the layers before them." if folded else "")
             + (f" {fused} decomposed HardSwish(es) fused into one op each." if fused else "")
             + "</p>")
    return f"<h2>Size and cost</h2>{facts}<div class=\"row\"><div>{table}</div>{chart}</div>"


def _latency(lat: dict[str, Any]) -> str:
    spread = lat.get("spread_ms") or {}
    runs = int(lat.get("runs") or 0)
    extra = ""
    if spread:
        how = "interleaved runs" if lat.get("interleaved", True) else "runs of each model in turn"
        extra = (f" median of {runs} {how} on {lat.get('threads', '?')} thread(s); "
                 f"spread (IQR) {spread.get('before', 0):.3g} / {spread.get('after', 0):.3g} ms")
    ratio = f" ({lat['before'] / lat['after']:.2f}x)" if runs != 1 else " (one run: no ratio)"
    noisy = ' <b class="bad">noisy: the spreads overlap, the ratio is not significant</b>' if lat.get("noisy") else ""
    return f"<p>latency {lat['before']:.3g} ms → {lat['after']:.3g} ms{ratio}{escape(extra)}{noisy}</p>"


def _latency_target(t: dict[str, Any]) -> str:
    """--target latency: what was asked, predicted from the layer table and measured, per selection tried."""
    if not t:
        return ""
    tries = t.get("selections", [])
    chart = svg.grouped_bars("latency target: each selection tried (ms, one thread)",
                             [f"try {i + 1}" for i in range(len(tries))],
                             [svg.Series("target", [float(t["target_ms"])] * len(tries)),
                              svg.Series("predicted", [float(x["predicted_ms"]) for x in tries]),
                              svg.Series("measured", [float(x["measured_ms"]) for x in tries])])
    table = t.get("table", {})
    facts = (f"<p>Target {t['target_ms']:.4g} ms of the original's {t['dense_ms']:.4g} ms; kept selection "
             f"predicted {t['predicted_ms']:.4g} ms, measured {t['measured_ms']:.4g} ms "
             f"({t['measured_over_target']:.3f} of the target). Layer table: {table.get('layers', 0)} layers, "
             f"{table.get('layers_timed', 0)} timed here ({table.get('timings', 0)} new timings, "
             f"{table.get('cached', 0)} from the cache, {table.get('seconds', 0):.3g} s).</p>")
    return f"<h2>Latency target</h2>{facts}{chart}"


def _warnings(warnings: list[str]) -> str:
    if not warnings:
        return ""
    return "<h2>Warnings</h2>" + "".join(f'<div class="warn">{escape(w)}</div>' for w in warnings)


def _validation(v: dict[str, Any]) -> str:
    if not v:
        return "<h2>Validation</h2><p class=\"bad\">not validated (--no-validate)</p>"
    rows = [(o["output"], str(o["shape"]), o.get("cosine"), o.get("max_rel_err"),
             o.get("top1_agreement", o.get("exact_match"))) for o in v.get("outputs", [])]
    eq = v.get("equivalence")
    eq_line = ""
    if eq:
        state = '<b class="ok">passed</b>' if eq["passed"] else '<b class="bad">FAILED</b>'
        eq_line = (f"<p>Equivalence of the uncompensated model with the masked original: {state} "
                   f"(max rel. error {eq['max_rel_err']:.3g}); it proves the channel coupling.</p>")
    samples = f" on {v['samples']} input(s)" if v.get("samples") else ""
    return (f"<h2>Validation</h2><p>onnx.checker {escape(str(v.get('checker')))}, onnxruntime "
            f"{escape(str(v.get('onnxruntime')))}. Outputs of the pruned model against the original{samples}:</p>"
            + _table(["output", "shape", "cosine", "max rel. error", "top-1 / exact match"], rows, numeric=(2, 3, 4))
            + eq_line)


def _layers(g: dict[str, Any]) -> str:
    pruned = g.get("pruned_list", [])
    if not pruned:
        return "<h2>Channels per group</h2><p>nothing was removed</p>"
    shown = pruned[:SHOWN_LAYERS]
    labels = [p["producers"][0] + (f" +{len(p['producers']) - 1}" if len(p["producers"]) > 1 else "")
              if p["producers"] else f"group {p['id']}" for p in shown]
    more = f'<p class="muted">{len(pruned) - len(shown)} more group(s) in the JSON report</p>' \
        if len(pruned) > len(shown) else ""
    chart = svg.stacked_bars("kept and removed units per pruned group", labels,
                             [p["units"] - p["removed"] for p in shown], [p["removed"] for p in shown], width=760)
    return ("<h2>Channels per group</h2><p>Each bar is one group of coupled channels (named by its first "
            f"producer), in graph order.</p>{chart}{more}")


def _streams(st: dict[str, Any]) -> str:
    rows = [(s["stream"], s["width"], s["kept"], s["writers"], s["readers"], f"{s['energy_kept']:.1%}")
            for s in st.get("streams", [])]
    if not rows and not st.get("left_alone"):
        return ""
    table = _table(["stream", "width", "kept", "writers", "readers", "energy kept"], rows, numeric=(1, 2, 3, 4))
    error = (f"<p>Model output rel. error of the sliced streams alone: {st['output_rel_error']:.3g} "
             f"(statistics from {escape(str(st.get('statistics')))}).</p>") if rows else ""
    alone = "".join(f"<li>{escape(w)}</li>" for w in st.get("left_alone", []))
    return ("<h2>Residual streams</h2><p>Rotated to their principal directions (exact) and sliced: each keeps "
            "its strongest directions in every writer and reader.</p>" + (table if rows else "") + error
            + (f"<p>Left alone:</p><ul>{alone}</ul>" if alone else ""))


def _compensation(c: dict[str, Any]) -> str:
    layers = [lay for lay in c.get("layers", []) if "measured_rel_error" in lay]
    if c.get("method") != "obs" or not layers:
        return ""
    state = "applied" if c.get("applied") else "not applied: it did not help on held-out inputs"
    check = c.get("self_check", {})
    points = [(lay["predicted_rel_error"], lay["measured_rel_error"], lay["node"]) for lay in layers]
    chart = svg.scatter("per-layer relative error, predicted vs held-out", points, "predicted", "measured (held-out)")
    worst = sorted(layers, key=lambda lay: -lay["measured_rel_error"])[:SHOWN_LAYERS // 3]
    table = _table(["layer (worst first)", "removed inputs", "predicted", "held-out", "uncompensated"],
                   [(lay["node"], f"{lay['removed_inputs']}/{lay['inputs']}", lay["predicted_rel_error"],
                     lay["measured_rel_error"], lay.get("measured_rel_error_uncompensated")) for lay in worst],
                   numeric=(2, 3, 4))
    return (f"<h2>OBS compensation</h2><p>{state}; {len(c['layers'])} layers corrected, statistics from "
            f"{escape(str(c.get('source')))}; model output rel. error on held-out inputs "
            f"{check.get('relative_error_uncompensated', 0):.3g} without → "
            f"{check.get('relative_error_compensated', 0):.3g} with compensation. Points above the diagonal did "
            f"worse than predicted.</p><div class=\"row\">{chart}<div>{table}</div></div>")


def _recovery(r: dict[str, Any]) -> str:
    if not r:
        return ""
    if r.get("skipped"):
        return f"<h2>Recovery</h2><p>skipped: {escape(r['skipped'])}</p>"
    curve = r.get("curve", [])
    chart = ""
    if curve:
        chart = svg.lines("distillation loss", [float(p[0]) for p in curve],
                          [svg.Series("train loss", [p[1] for p in curve]),
                           svg.Series("held-out loss", [p[2] for p in curve])], "step")
    held = r["held_out"]
    state = "applied" if r.get("applied") else f"not applied: {r.get('reason', '')}"
    return (f"<h2>Recovery</h2><p>{escape(str(r.get('method')))} on {escape(str(r.get('inputs')))}: "
            f"{r.get('steps')} steps in {r.get('train_seconds', 0):.1f} s, stopped by {escape(str(r.get('stopped')))}; "
            f"held-out agreement with the dense model {held['before']['agreement']:.4f} → "
            f"{held['after']['agreement']:.4f} ({escape(state)}).</p>{chart}")


def _blocked(g: dict[str, Any]) -> str:
    blocked = g.get("blocked", [])
    if not blocked:
        return ""
    counts: dict[str, int] = {}
    for b in blocked:
        for kind in {r["kind"] for r in b["reasons"]}:
            counts[kind] = counts.get(kind, 0) + 1
    summary = _table(["reason", "groups"], sorted(counts.items(), key=lambda kv: -kv[1]), numeric=(1,))
    rows = [(b["id"], b["units"], ", ".join(b["producers"][:3]) + (" …" if len(b["producers"]) > 3 else ""),
             "; ".join(f"{r['kind']} at {r['op']} '{r['node']}': {r['detail']}" for r in b["reasons"][:2]))
            for b in blocked[:SHOWN_LAYERS]]
    hidden = len(blocked) - len(rows)
    more = f'<p class="muted">{hidden} more in the JSON report</p>' if hidden else ""
    return ("<h2>Groups left alone</h2><p>These channels are coupled with something that cannot change "
            "exactly, so they were not touched.</p>" + summary
            + _table(["group", "units", "producers", "why"], rows, numeric=(0, 1)) + more)


def _config(cfg: dict[str, Any], timings: dict[str, float]) -> str:
    keys = ("sparsity", "target", "criterion", "compensate", "global_ranking", "round_to", "samples", "recover",
            "streams", "approximate_norms", "fold_bn", "fuse_activations", "seed")
    shown = [(k, cfg[k]) for k in keys if k in cfg]
    return ("<h2>Options and timings</h2><div class=\"row\">" + _table(["option", "value"], shown)
            + _table(["stage", "seconds"], list(timings.items()), numeric=(1,)) + "</div>")
