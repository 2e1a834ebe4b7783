"""Is --round-to auto free at equal MACs? One-shot accuracy across seeds, round-to 1 beside auto.

    python -m benchmarks.accuracy.seeds [--models digits-resnet,digits-mobilenetv2] [--seeds 5]

Data-free OBS draws its statistics from synthetic inputs, so one seed's difference between two width
policies can be noise. Each seed prunes with both policies on the same synthetic data (paired), each at
the better of global and local ranking as in run.py; the table gives the median and range over seeds and
the median paired difference, with seed 0's one-thread latency kept for both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from benchmarks.accuracy.run import METHODS, RATIOS, Method, run_cell, task_factories

POLICIES: dict[str, Any] = {"round-to 1": 1, "auto": "auto"}
DEFAULT_MODELS = ("digits-resnet", "digits-mobilenetv2", "pp-ocrv4-rec")


def _method(round_to: Any, seed: int) -> Method:
    """run.py's default one-shot method (obs_crit) at this width policy and seed."""
    base = next(m for m in METHODS if m.key == "obs_crit")
    return Method(f"obs_crit_{round_to}_{seed}", "", "graphprune",
                  {**base.options, "round_to": round_to, "seed": seed}, timed=seed == 0)


def _span(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} ({min(values):.3f}–{max(values):.3f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS))
    parser.add_argument("--ratios", default=",".join(str(r) for r in RATIOS))
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args(argv)
    factories = task_factories()
    print("| net | FLOPs | round-to 1: median (range) | auto: median (range) | median paired Δ (auto − 1) "
          "| auto better in | latency kept, seed 0: 1 / auto |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        task = factories[name]()
        for ratio in (float(r) for r in args.ratios.split(",")):
            scores: dict[str, list[float]] = {p: [] for p in POLICIES}
            latency: dict[str, Any] = {}
            for seed in range(args.seeds):
                for policy, round_to in POLICIES.items():
                    cell = run_cell(task, _method(round_to, seed), ratio)
                    scores[policy].append(cell.headline)
                    if seed == 0:
                        latency[policy] = cell.detail.get("latency_kept", cell.error or "?")
            one, auto = scores["round-to 1"], scores["auto"]
            deltas = [a - b for a, b in zip(auto, one, strict=True)]
            better = sum(d > 0 for d in deltas)
            print(f"| {name} | −{ratio:.0%} | {_span(one)} | {_span(auto)} | {statistics.median(deltas):+.3f} "
                  f"| {better}/{len(deltas)} | {latency['round-to 1']} / {latency['auto']} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
