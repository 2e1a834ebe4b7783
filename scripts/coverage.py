"""Print the README's coverage table: every zoo model, its groups, and what a 30% prune removes.

Usage: python scripts/coverage.py [--fast]   (run from the repository root, test extras installed)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import zoo

import graphprune
from graphprune.report import Report


def row(name: str) -> str:
    meta = zoo.MODELS[name]
    try:
        src = zoo.path(name)
    except zoo.ZooUnavailable as exc:
        return f"| {name} | {meta.exporter} | unavailable: {exc} | | | |"
    an = graphprune.analyze(src)
    groups = an.grouping.groups
    prunable = an.grouping.prunable
    share = sum(g.channels for g in prunable) / max(1, sum(g.channels for g in groups))
    rep: Report | None = None
    try:
        rep = graphprune.prune(src, sparsity=0.3, latency_runs=0, compensate="none").report
        params = removed(rep.params)
        flops = removed(rep.flops) if rep.flops["before"] else "n/a"
        eq = "yes" if rep.validation["equivalence"]["passed"] else "NO"
    except graphprune.TargetImpossibleError:
        params = flops = "0% (nothing prunable)"
        eq = "-"
    return (f"| {name} | {meta.framework} / {meta.exporter} | {len(groups)} | {len(prunable)} "
            f"({share:.0%} of channels) | {params} | {flops} | {eq} | {variant(src, rep, streams='rotate')} "
            f"| {variant(src, rep, approximate_norms=True)} |")


def removed(d: dict[str, int]) -> str:
    return f"{1 - d['after'] / d['before']:.1%}"


def variant(src: Path, base: Report | None, **options: Any) -> str:
    """Params removed at 30% with a stream option, and the worst output cosine to the dense model;
    '=' where the option changes nothing (`base`: the plain prune's report, None if it had nothing)."""
    try:
        rep = graphprune.prune(src, sparsity=0.3, latency_runs=0, compensate="none", **options).report
    except graphprune.GraphpruneError:
        return "-"
    if base is not None and rep.params == base.params:
        return "="
    cosines = [o["cosine"] for o in rep.validation["outputs"] if o.get("cosine") is not None]
    return removed(rep.params) + (f" (cos {min(cosines):.3f})" if cosines else "")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fast", action="store_true", help="skip the slow (large) models")
    args = ap.parse_args()
    print("| model | framework / exporter | groups | prunable groups | params removed at 30% "
          "| MACs removed at 30% | equivalence | params, `--streams rotate` | params, `--allow-approximate-norms` |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, meta in zoo.MODELS.items():
        if args.fast and meta.slow:
            continue
        print(row(name), flush=True)


if __name__ == "__main__":
    main()
