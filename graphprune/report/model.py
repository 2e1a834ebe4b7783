"""The report of one prune: what changed, what could not change and why, and how well it held."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from graphprune.report import html


@dataclass
class Report:
    model: dict[str, Any]
    config: dict[str, Any]
    params: dict[str, int]
    flops: dict[str, int]  # multiply-accumulates (MACs)
    bytes: dict[str, int]
    groups: dict[str, Any]
    validation: dict[str, Any] = field(default_factory=dict)
    timings_s: dict[str, float] = field(default_factory=dict)
    compensation: dict[str, Any] = field(default_factory=dict)
    importance: dict[str, Any] = field(default_factory=dict)
    recovery: dict[str, Any] = field(default_factory=dict)
    streams: dict[str, Any] = field(default_factory=dict)  # streams="rotate": each sliced residual stream
    graph: dict[str, Any] = field(default_factory=dict)  # clean-up passes on the pruned graph (fold_bn)
    latency: dict[str, Any] = field(default_factory=dict)  # target latency: predicted and measured, the table
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_html(self, title: str = "graphprune report") -> str:
        return html.render(self.to_dict(), title)

    def summary(self) -> str:
        """A few human lines for the terminal."""

        def pct(d: dict[str, int]) -> str:
            before, after = d["before"], d["after"]
            return f"{before:,} -> {after:,} ({1 - after / before:.1%} removed)" if before else "n/a"

        g = self.groups
        lines = [
            f"params  {pct(self.params)}",
            f"MACs    {pct(self.flops)}",
            f"groups  {g['total']} total, {g['prunable']} prunable, {g['pruned']} pruned",
        ]
        lines.extend(_stream_lines(self.streams))
        lines.extend(_target_lines(self.latency))
        folded = self.graph.get("batchnorms_folded", 0)
        if folded:
            lines.append(f"graph   {folded} BatchNormalization node(s) folded into the layers before them")
        fused = self.graph.get("hardswish_fused", 0)
        if fused:
            lines.append(f"graph   {fused} decomposed HardSwish(es) fused into one op each (fuse_activations)")
        v = self.validation
        if v:
            lines.extend(_latency_lines(v.get("latency_ms") or {}))
            if v.get("samples"):
                lines.append(f"validated on {v['samples']} input(s) ({v.get('inputs', 'synthetic')})")
            for o in v.get("outputs", []):
                if "cosine" in o:
                    lines.append(_output_line(o))
            eq = v.get("equivalence")
            if eq:
                lines.append(f"equivalence with the masked original: {'passed' if eq['passed'] else 'FAILED'}")
        c = self.compensation
        if c.get("method") == "obs":
            check = c.get("self_check", {})
            state = "applied" if c.get("applied") else "NOT applied (it did not help on held-out inputs)"
            lines.append(f"OBS compensation {state}: {len(c['layers'])} layers, H from {c['source']}, "
                         f"held-out rel. error {check.get('relative_error_uncompensated', 0):.3g} -> "
                         f"{check.get('relative_error_compensated', 0):.3g}")
            lines.extend(_layer_lines(c["layers"]))
        lines.extend(_recovery_lines(self.recovery))
        fallback = self.importance.get("magnitude_fallback")
        if fallback:
            ops = sorted({f["op"] for f in fallback["consumers"]})
            lines.append(f"importance: {self.importance['criterion']} scores of {fallback['groups']} group(s) use "
                         f"magnitude for {len(fallback['consumers'])} consumer(s) OBS cannot model "
                         f"({', '.join(ops)})")
        lines.extend(f"warning: {w}" for w in self.warnings)
        return "\n".join(lines)


def _target_lines(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    table = t["table"]
    return [f"latency target {t['target_ms']:.3g} ms (1 thread): predicted {t['predicted_ms']:.3g} ms, measured "
            f"{t['measured_ms']:.3g} ms of {t['dense_ms']:.3g} ms dense ({t['measured_over_target']:.2f} of the "
            f"target, {len(t['selections'])} selection(s)); table: {table['layers_timed']} of {table['layers']} layers "
            f"timed ({table['timings']} new timings, {table['cached']} cached, {table['seconds']:.1f} s)"]


def _stream_lines(streams: dict[str, Any]) -> list[str]:
    lines = [f"stream  '{s['stream']}' {s['width']} -> {s['kept']} wide in its principal basis "
             f"({s['writers']} writers, {s['readers']} readers, {s['energy_kept']:.1%} of its energy kept)"
             for s in streams.get("streams", [])]
    if lines:
        lines.append(f"streams sliced: model output rel. error {streams['output_rel_error']:.3g}")
    lines.extend(f"stream left alone: {why}" for why in streams.get("left_alone", []))
    return lines


def _latency_lines(lat: dict[str, Any]) -> list[str]:
    """Medians, with their spread; no ratio from a single run, and `noisy` where the spreads overlap."""
    before, after, runs = lat.get("before"), lat.get("after"), lat.get("runs")
    if not (before and after):
        return []
    head = f"latency {before:.2f} ms -> {after:.2f} ms"
    if runs is None:  # a report from a version that did not count its runs
        return [f"{head} ({before / after:.2f}x)"]
    if runs < 2:
        return [f"{head} (one run each: no ratio; raise --latency-runs)"]
    spread = lat.get("spread_ms") or {}
    how = "interleaved" if lat.get("interleaved", True) else "separate"
    noisy = "; noisy: the spreads overlap, the ratio is not significant" if lat.get("noisy") else ""
    return [f"{head} ({before / after:.2f}x; median of {runs} {how} runs on {lat.get('threads', '?')} thread(s), "
            f"IQR {spread.get('before', 0):.2g} / {spread.get('after', 0):.2g} ms{noisy})"]


def _output_line(o: dict[str, Any]) -> str:
    cosine = "n/a (one value per sample)" if o["cosine"] is None else f"{o['cosine']:.4f}"
    top1 = o.get("top1_agreement")
    extra = f", top-1 agreement {top1:.1%}" if top1 is not None else ""
    weak = f" [{o['degenerate'].replace('_', ' ')}: not evidence of fidelity]" if o.get("degenerate") else ""
    return f"output  {o['output']}: cosine {cosine}, max rel err {o['max_rel_err']:.3g}{extra}{weak}"


def _recovery_lines(r: dict[str, Any]) -> list[str]:
    if not r:
        return []
    if r.get("skipped"):
        return [f"recovery skipped: {r['skipped']}"]
    held = r["held_out"]
    before, after = held["before"], held["after"]
    inputs = r["inputs"] + (f", {r['train_inputs']} inputs" if r.get("train_inputs") else "")
    state = "applied" if r["applied"] else f"NOT applied: {r['reason']}"
    return [f"recovery {r['method']} on {inputs}: {r['steps']} steps in {r['train_seconds']:.1f} s "
            f"(stopped by {r['stopped']}, best at step {r['best_step']}); held-out agreement with the dense model "
            f"{before['agreement']:.4f} -> {after['agreement']:.4f}, loss {before['loss']:.4g} -> {after['loss']:.4g} "
            f"on {r['held_out_inputs']} inputs ({state})"]


def _layer_lines(layers: list[dict[str, Any]], shown: int = 8) -> list[str]:
    """The corrected layers with the largest held-out error: relative output error predicted on the
    fitting statistics vs measured on held-out inputs (and without compensation, for scale)."""
    measured = [lay for lay in layers if "measured_rel_error" in lay]
    if not measured:
        return []
    worst = sorted(measured, key=lambda lay: -lay["measured_rel_error"])[:shown]
    head = "layer (worst held-out first)"
    width = max(len(head), *(len(lay["node"]) for lay in worst))
    lines = [f"  {head:<{width}}  removed    predicted  held-out  uncompensated"]
    lines += [f"  {lay['node']:<{width}}  {lay['removed_inputs']:>3}/{lay['inputs']:<5}  "
              f"{lay['predicted_rel_error']:>9.3g}  {lay['measured_rel_error']:>8.3g}  "
              f"{lay['measured_rel_error_uncompensated']:>13.3g}" for lay in worst]
    if len(measured) > shown:
        lines.append(f"  ... {len(measured) - shown} more layer(s) in the JSON report")
    return lines
