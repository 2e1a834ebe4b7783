"""Accuracy after pruning to -30/-50/-70% FLOPs: dense, magnitude, OBS variants, Torch-Pruning (see METHODS).

    python -m benchmarks.accuracy.run [--quick] [--models digits-resnet,minilm-l6] [--ratios 0.5]

Why it is built this way:
* every method is scored through ONNX by the same scorer (Torch-Pruning's nets are re-exported), so a
  difference between rows is the pruning, never the runtime;
* each pruning method is run with global and with local ranking and the better is reported (the cell
  says which): each method is shown at its best, and the choice is the same for all of them;
* FLOPs reductions are graphprune's counter for every row, and a cell shows the achieved reduction
  whenever it is more than a point off the target. Torch-Pruning's channel ratio is bisected to the
  target twice: on its own MACs counter and on graphprune's (the two disagree on what a channel costs,
  by up to 3 points on MobileNetV2), so "equal FLOPs" holds under either yardstick;
* a failure is caught per cell and shown as its error class, so one broken combination never hides
  the rest of the table.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from importlib import metadata
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np

from benchmarks.accuracy import minilm, models, ocr, tp_baseline
from benchmarks.accuracy.common import CACHE, UNLABELLED_INPUTS, Scores, Task, export_onnx
from benchmarks.measure import measured

HERE = Path(__file__).resolve().parent
RATIOS = (0.3, 0.5, 0.7)
RANKINGS = {"global": True, "local": False}
DEVIATION = 0.01  # show the achieved reduction when it is this far from the target


@dataclass(frozen=True)
class Method:
    key: str
    label: str
    tool: str  # "dense" | "graphprune" | "torch-pruning"
    options: dict[str, Any] = field(default_factory=dict)  # graphprune.prune overrides; Torch-Pruning: counter
    calibrated: bool = False  # pass the task's calibration .npz
    unlabelled: bool = False  # pass the task's UNLABELLED_INPUTS .npz (for OBS statistics and recovery)
    ranking_of: str = ""  # reuse the ranking the method with this key chose at the same ratio (no second run)
    flops_of: str = ""  # prune to the FLOPs reduction the method with this key reached at the same ratio, its ranking
    timed: bool = False  # measure the pruned model's one-thread latency against the dense one's


METHODS = (
    Method("dense", "dense", "dense"),
    Method("magnitude", "magnitude (L2, no compensation)", "graphprune", {"criterion": "l2", "compensate": "none"}),
    Method("obs", "OBS (data-free)", "graphprune", {"criterion": "l2", "compensate": "obs"}),
    Method("obs_calib", "OBS + calibration data", "graphprune", {"criterion": "l2", "compensate": "obs"},
           calibrated=True),
    Method("obs_crit", "OBS importance + OBS (data-free)", "graphprune", {"criterion": "obs", "compensate": "obs"},
           timed=True),
    Method("obs_crit_calib", "OBS importance + OBS + calibration data", "graphprune",
           {"criterion": "obs", "compensate": "obs"}, calibrated=True),
    Method("obs_crit_round1", "OBS importance + OBS, --round-to 1 (data-free; the default rounds to auto)",
           "graphprune", {"criterion": "obs", "compensate": "obs", "round_to": 1}, timed=True),
    Method("obs_crit_latency", "OBS importance + OBS, --target latency (data-free; columns: −x% latency)",
           "graphprune", {"criterion": "obs", "compensate": "obs", "target": "latency"}, timed=True),
    Method("obs_crit_at_latency", "OBS importance + OBS, --target flops at the FLOPs the --target latency row removed",
           "graphprune", {"criterion": "obs", "compensate": "obs"}, timed=True, flops_of="obs_crit_latency"),
    Method("obs_crit_norms", "OBS importance + OBS, approximate norms (data-free)", "graphprune",
           {"criterion": "obs", "compensate": "obs", "approximate_norms": True}),
    Method("obs_crit_norms_calib", "OBS importance + OBS, approximate norms + calibration data", "graphprune",
           {"criterion": "obs", "compensate": "obs", "approximate_norms": True}, calibrated=True),
    Method("recover", "default + recovery (data-free)", "graphprune", {"recover": "distill"}, ranking_of="obs_crit"),
    Method("recover_unlabelled", f"default + recovery ({UNLABELLED_INPUTS} unlabelled inputs)", "graphprune",
           {"recover": "distill"}, unlabelled=True, ranking_of="obs_crit"),
    Method("torch_pruning", "Torch-Pruning L2 (no compensation), at its MACs count", "torch-pruning",
           {"counter": "tp"}),
    Method("torch_pruning_gp", "Torch-Pruning L2 (no compensation), at graphprune's MACs count", "torch-pruning",
           {"counter": "graphprune"}),
)


def task_factories() -> dict[str, Callable[[], Task]]:
    """Built lazily: a model whose package is missing fails alone, and --models skips the others' setup."""
    digits: dict[str, Callable[[], Task]] = {f"digits-{a}": partial(models.task, a) for a in models.ARCHS}
    return {**digits, "pp-ocrv4-rec": ocr.task, "minilm-l6": minilm.task, "minilm-l6-sim": minilm.similarity_task}


@dataclass
class Cell:
    scores: Scores = field(default_factory=dict)
    reduction: float | None = None  # FLOPs removed, by graphprune's counter
    ranking: str = ""
    error: str = ""
    seconds: float = 0.0
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def headline(self) -> float:
        return next(iter(self.scores.values()), -math.inf)


def gp_macs(model: Any, task: Task) -> int:
    import graphprune

    return int(graphprune.analyze(model, **task.prune_options).cost.macs())


def _samples(path: Path) -> int:
    with np.load(path) as data:
        return int(data[data.files[0]].shape[0])


def attempt(task: Task, method: Method, ratio: float, global_ranking: bool) -> Cell:
    """One prune with one ranking, scored; raises on failure."""
    if method.tool == "graphprune":
        import graphprune

        opts = {**task.prune_options, **method.options}
        target = opts.pop("target", "flops")
        data = task.calibration if method.calibrated else task.unlabelled if method.unlabelled else None
        if (method.calibrated or method.unlabelled) and data is None:
            raise FileNotFoundError("no real inputs for this model")
        if data is not None:
            opts |= {"calibration": str(data), "samples": _samples(data)}
        if "recover" in method.options:
            opts |= task.recover_options
        with measured() as sec:
            res = graphprune.prune(str(task.onnx_path), sparsity=ratio, target=target,
                                   global_ranking=global_ranking, latency_runs=0, validate=False, **opts)
        rep = res.report.to_dict()
        groups = [f"{g['producers'][0]} -{g['removed']}/{g['units']}" for g in rep["groups"]["pruned_list"]]
        comp = rep.get("compensation") or {}
        detail: dict[str, Any] = {"pruned_groups": groups,
                                  "compensation": {k: comp.get(k) for k in ("method", "source", "self_check")}}
        if rep["recovery"]:
            rec = rep["recovery"]
            detail["recovery"] = {**{k: rec.get(k) for k in ("applied", "reason", "skipped", "inputs", "steps",
                                                             "stopped", "best_step", "lr_backoffs", "train_seconds",
                                                             "held_out")},
                                  "prune_seconds": round(sec.seconds, 1), "rss_start_mib": round(sec.rss_start_mib),
                                  "rss_peak_mib": round(sec.rss_peak_mib)}
        if method.timed:
            detail["latency_kept"] = latency_kept(task, res.model)
        return Cell(task.score(res.model), 1.0 - rep["flops"]["after"] / rep["flops"]["before"], detail=detail)
    if task.torch_net is None:
        raise NotImplementedError(task.note or "no torch net")
    net = task.torch_net()
    dense = gp_macs(str(task.onnx_path), task)
    yardstick = method.options["counter"]
    counter = (lambda m: gp_macs(export_onnx(m, net.example), task)) if yardstick == "graphprune" else None
    pruned = tp_baseline.prune_to_flops(net, ratio, global_ranking, counter)
    proto = export_onnx(pruned.model, net.example)
    return Cell(task.score(proto), 1.0 - gp_macs(proto, task) / dense,
                detail={"tp_ratio": round(pruned.ratio, 4), f"reduction_{yardstick}_counter": pruned.reduction})


def latency_kept(task: Task, pruned: Any) -> float:
    """The pruned model's one-thread latency over the dense one's, interleaved (graphprune's own timer,
    the one --target latency corrects its selection with), on one batch of the inputs it prunes for."""
    import graphprune
    from graphprune.latency import interleaved_ms
    from graphprune.synthetic import batches

    an = graphprune.analyze(str(task.onnx_path), **task.prune_options)
    dense_ms, pruned_ms = interleaved_ms([an.model, pruned], next(iter(batches(an.specs, 1, None, "blobs", 0))),
                                         arrays=an.graph.known_const)
    return round(pruned_ms / dense_ms, 4)


def run_cell(task: Task, method: Method, ratio: float, rankings: dict[str, bool] | None = None) -> Cell:
    """Best of global and local ranking (by the headline score); each failure is kept as its error class."""
    cells = []
    for name, flag in (rankings or RANKINGS).items():
        t0 = time.perf_counter()
        try:
            cell = attempt(task, method, ratio, flag)
        except Exception as exc:  # one failed combination must not end the benchmark
            cell = Cell(error=type(exc).__name__, detail={"message": str(exc)[:500]})
        cell.ranking, cell.seconds = name, time.perf_counter() - t0
        cells.append(cell)
    ok = [c for c in cells if not c.error]
    best = max(ok, key=lambda c: c.headline) if ok else cells[0]
    best.detail["by_ranking"] = {c.ranking: c.error or c.headline for c in cells}
    best.seconds = sum(c.seconds for c in cells)
    return best


def fmt(cell: Cell, ratio: float) -> str:
    if cell.error:
        return f"error: {cell.error}"
    values = list(cell.scores.values())
    text = " / ".join(f"{v:.3f}" for v in values)
    if cell.ranking:
        text += f" ({cell.ranking[0]})"
    if cell.reduction is not None and abs(cell.reduction - ratio) > DEVIATION:
        text += f" [−{cell.reduction:.0%}]"
    return text


def table(task: Task, cells: dict[str, dict[float, Cell]], ratios: tuple[float, ...]) -> str:
    metrics = next((list(c.scores) for row in cells.values() for c in row.values() if c.scores), [])
    head = f"| {task.name} ({' / '.join(metrics)}) | " + " | ".join(f"−{r:.0%} FLOPs" for r in ratios) + " |"
    lines = [head, "|" + "---|" * (len(ratios) + 1)]
    for method in METHODS:
        if method.key in cells:
            row = cells[method.key]
            lines.append(f"| {method.label} | " + " | ".join(fmt(row[r], r) for r in ratios) + " |")
    return "\n".join(lines)


def evaluate_task(task: Task, ratios: tuple[float, ...], methods: tuple[Method, ...],
                  stored: dict[str, dict[float, Cell]] | None = None) -> dict[str, dict[float, Cell]]:
    """Every method at every ratio; a method reusing another's ranking or FLOPs reads that method's cell
    from this run, else from `stored` (RESULTS.json's, on --update)."""
    cells: dict[str, dict[float, Cell]] = {}
    t0 = time.perf_counter()
    dense = Cell(task.score(task.onnx_path))
    dense.seconds = time.perf_counter() - t0
    print(f"[{task.name}] dense: {fmt(dense, 0.0)}", flush=True)
    for method in methods:
        if method.tool == "dense":
            cells[method.key] = dict.fromkeys(ratios, dense)
            continue
        if method.tool == "torch-pruning" and task.torch_net is None:
            continue
        cells[method.key] = {}
        for ratio in ratios:
            source = method.flops_of or method.ranking_of
            chosen = cells.get(source, {}).get(ratio) or (stored or {}).get(source, {}).get(ratio)
            rankings = {chosen.ranking: RANKINGS[chosen.ranking]} if chosen and chosen.ranking else None
            if not method.flops_of:
                cell = run_cell(task, method, ratio, rankings)
            elif chosen and not chosen.error and chosen.reduction is not None:
                cell = run_cell(task, method, round(chosen.reduction, 4), rankings)
            else:
                cell = Cell(error="NotRun", detail={"message": f"no {method.flops_of} cell at −{ratio:.0%}"})
            cells[method.key][ratio] = cell
            print(f"[{task.name} −{ratio:.0%}] {method.label}: {fmt(cell, ratio)}  ({cell.seconds:.1f} s)",
                  flush=True)
    return cells


def counters(task: Task) -> str:
    """Dense MACs per sample by graphprune (which counts a dynamic batch axis at its default size) and by
    Torch-Pruning, so readers can see the two yardsticks side by side."""
    import graphprune

    an = graphprune.analyze(str(task.onnx_path), **task.prune_options)
    batch = an.specs[0].shape[0] if an.specs and an.specs[0].shape else 1
    text = f"graphprune {an.cost.macs() / batch:,.0f} MACs/sample (counted at batch {batch})"
    if task.torch_net is not None:
        net = task.torch_net()
        text += f", Torch-Pruning {tp_baseline.macs(net.model, net):,} MACs/sample (includes BN/activations)"
    return text


def recovery_cost(cells: dict[str, Any]) -> list[str]:
    """Per recovery cell: steps run (and why it stopped), training time, peak RSS of the whole prune."""
    rows = []
    for method in METHODS:
        for ratio, cell in cells.get(method.key, {}).items():
            rec = cell.get("detail", {}).get("recovery")
            if not rec:
                continue
            if rec.get("skipped"):
                state, steps, training = f"skipped: {rec['skipped']}", "—", "—"
            else:
                state = "applied" if rec["applied"] else f"not applied: {rec.get('reason')}"
                steps, training = f"{rec['steps']} ({rec['stopped']})", f"{rec['train_seconds']:.0f} s"
            rss = f"{rec['rss_peak_mib']} MiB (+{rec['rss_peak_mib'] - rec['rss_start_mib']})"
            rows.append(f"| {method.label} | −{float(ratio):.0%} | {steps} | {training} | "
                        f"{rec['prune_seconds']:.0f} s | {rss} | {state} |")
    if not rows:
        return []
    return ["", "Recovery cost (2 threads): steps run, training time, the whole prune's wall time, peak RSS of the "
                "process during it (+ over its RSS before):", "",
            "| row | FLOPs | steps | training | prune total | peak RSS | result |",
            "|---|---|---|---|---|---|---|", *rows]


def equal_latency(cells: dict[str, Any], ratios: tuple[float, ...]) -> list[str]:
    """The --target latency row against --target flops pruned to the FLOPs that row removed, same ranking,
    both timed: what a user asking for MACs would have had to ask for to get that latency. (Interpolating
    the flops row's own cells across 20-point gaps in FLOPs flattered whichever side sat on the concave
    part of the accuracy curve.)"""
    rows = {key: {float(r): c for r, c in cells.get(key, {}).items()}  # RESULTS.json's keys are text
            for key in ("obs_crit_latency", "obs_crit_at_latency")}

    def shown(cell: dict[str, Any] | None) -> str:
        if not cell or cell.get("error") or "latency_kept" not in cell.get("detail", {}):
            return "—"
        return f"{_headline(cell):.3f} at {cell['detail']['latency_kept']:.0%} (−{cell['reduction']:.0%} FLOPs)"

    got = [r for r in ratios if shown(rows["obs_crit_latency"].get(r)) != "—"]
    if not got:
        return []
    return ["", "At equal latency (one onnxruntime thread, interleaved with the dense model): the headline score, "
                "the latency kept and the FLOPs removed.", "",
            "| target | " + " | ".join(f"−{r:.0%} latency" for r in got) + " |", "|---|" + "---|" * len(got),
            "| --target latency (OBS importance + OBS) | "
            + " | ".join(shown(rows["obs_crit_latency"][r]) for r in got) + " |",
            "| --target flops at the FLOPs that row removed (same ranking) | "
            + " | ".join(shown(rows["obs_crit_at_latency"].get(r)) for r in got) + " |"]


def _headline(cell: dict[str, Any]) -> float:
    return float(next(iter(cell["scores"].values())))


def markdown(results: dict[str, Any], ratios: tuple[float, ...], seconds: float, updated: str = "") -> str:
    versions = ", ".join(f"{d} {metadata.version(d)}" for d in
                         ("graphprune", "torch", "torch-pruning", "onnxruntime", "transformers"))
    out = [
        "# Accuracy after structured pruning",
        "",
        "Generated by `python -m benchmarks.accuracy.run` (see the module docstring for the method). "
        f"Versions: {versions}. " + (f"Cells of {updated} rerun with `--update` ({seconds / 60:.1f} min)"
                                     if updated else f"This run: {seconds / 60:.1f} min")
        + " on a shared 2-core CPU machine.",
        "",
        "Cells: score(s) on real held-out data; (g)/(l) = global or local ranking, the better of the two; "
        "[−x%] = achieved FLOPs reduction (graphprune's counter) when more than a point off the column's target. "
        "Digits: test accuracy (540 images). PP-OCRv4 rec: character accuracy (1 − normalized edit distance) / "
        "exact-match rate on 100 rendered lines. MiniLM: mean cosine to the dense embedding / paraphrase "
        "retrieval@1 over 60 sentences; MiniLM-sim (pooling and pairwise similarities in the graph, so the "
        "hidden width can go): correlation of the pairwise cosines with the dense model's / the same retrieval.",
        "",
    ]
    shown = 0.5 if 0.5 in ratios else ratios[0]  # the ratio whose pruned groups are listed
    for name, entry in results.items():
        out += [f"## {name}", ""]
        if "error" in entry:
            out += [f"not run: {entry['error']}", ""]
            continue
        out += [entry["table"], "", f"FLOPs counters: {entry['counters']}."]
        if entry.get("note"):
            out.append(f"Note: {entry['note']}.")
        out += recovery_cost(entry["cells"])
        out += equal_latency(entry["cells"], ratios)
        mag = entry["cells"].get("magnitude", {}).get(shown)
        if mag and not mag.get("error"):
            out.append(f"Pruned groups, magnitude at −{shown:.0%} ({mag['ranking']}): "
                       + "; ".join(mag["detail"].get("pruned_groups", [])) + ".")
        out.append("")
    return "\n".join(out)


RESULTS_JSON = HERE / "RESULTS.json"


def stored(name: str) -> dict[str, dict[float, Cell]]:
    """The cells of `name` in RESULTS.json."""
    old = json.loads(RESULTS_JSON.read_text()).get(name, {}).get("cells", {})
    return {k: {float(r): Cell(**c) for r, c in row.items()} for k, row in old.items()}


def merged(name: str, fresh: dict[str, dict[float, Cell]]) -> dict[str, dict[float, Cell]]:
    """The last full run's cells of `name` (RESULTS.json) with the `fresh` ones in their place."""
    cells = stored(name)
    for key, row in fresh.items():
        if key != "dense" or key not in cells:  # a new task's dense row is kept too
            cells.setdefault(key, {}).update(row)
    return cells


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one model (digits-resnet), one ratio (-50%%)")
    parser.add_argument("--models", help=f"comma-separated subset of {', '.join(task_factories())}")
    parser.add_argument("--ratios", help="comma-separated FLOPs reductions (default 0.3,0.5,0.7)")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(m.key for m in METHODS)}")
    parser.add_argument("--output", type=Path, help="markdown file (default: RESULTS.md on a full run)")
    parser.add_argument("--update", action="store_true",
                        help="rerun only the chosen models/methods/ratios and merge them into RESULTS.md/.json")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)  # tiny nets: more threads only oversubscribe a shared machine
    warnings.filterwarnings("ignore")
    factories = task_factories()
    names = ["digits-resnet"] if args.quick else (args.models.split(",") if args.models else list(factories))
    ratios = (0.5,) if args.quick else tuple(float(r) for r in (args.ratios.split(",") if args.ratios else RATIOS))
    methods = tuple(m for m in METHODS if not args.methods or m.key == "dense" or m.key in args.methods.split(","))
    full = not (args.quick or args.models or args.ratios or args.methods)
    output = args.output or (HERE / "RESULTS.md" if full or args.update else None)

    t0 = time.perf_counter()
    results: dict[str, Any] = {}
    for name in names:
        try:
            task = factories[name]()
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"[{name}] not run: {results[name]['error']}", flush=True)
            continue
        cells = evaluate_task(task, ratios, methods, stored(task.name) if args.update else None)
        if args.update:
            cells = merged(task.name, cells)
        shown = RATIOS if args.update else ratios
        results[name] = {"table": table(task, cells, shown), "counters": counters(task), "note": task.note,
                         "cells": {k: {r: asdict(c) for r, c in row.items()} for k, row in cells.items()}}
        print("\n" + results[name]["table"] + "\n", flush=True)
    seconds = time.perf_counter() - t0
    print(f"total {seconds:.0f} s")
    if args.update:
        results = {**json.loads(RESULTS_JSON.read_text()), **results}
        ratios = RATIOS
    raw = output.with_suffix(".json") if output else CACHE / "results-last.json"
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(json.dumps(results, indent=1, default=str))  # every cell's detail: groups, TP ratios, errors
    if output:
        updated = f"{', '.join(names)} ({args.methods or 'all methods'})" if args.update else ""
        output.write_text(markdown(results, ratios, seconds, updated))
    print(f"wrote {', '.join(str(p) for p in (output, raw) if p)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
