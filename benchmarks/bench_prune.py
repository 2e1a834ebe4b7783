"""Benchmark graphprune against Torch-Pruning on the same architectures, in one run.

Why this shape:
* every measured job runs in a fresh ``spawn`` child, so its peak RSS is its own (no allocator state,
  imports or caches left over from an earlier job) and the parent never imports torch;
* repeats are interleaved round-robin across tools, so slow drift on a noisy machine hits every tool
  alike, and medians are reported;
* latency is measured for all variants of a model in one child, one run of each in turn, for the same
  reason, with onnxruntime's thread-pool spinning off so that one session's idle workers don't slow
  the next.

Run ``python benchmarks/bench_prune.py`` (full: ResNet-50 and BERT-base) or ``--quick`` (ResNet-18 and a
2-layer BERT, for CI smoke runs). ``--obs`` adds graphprune with OBS compensation at its defaults (50% FLOPs,
128 synthetic samples), ``--obs-exact`` also the same with an exact (im2col) H on every
layer. See benchmarks/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import hashlib
import io
import json
import multiprocessing as mp
import os
import pathlib
import pstats
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable from the repository root
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.measure import measured

if TYPE_CHECKING:
    import torch
    from torch import nn

HERE = pathlib.Path(__file__).resolve().parent
CACHE = HERE / ".cache"
EXPORT_VERSION = "1"  # bump when build_torch or export_onnx change what they produce
OPSET = 17
MAX_IR_VERSION = 10  # onnxruntime 1.31 refuses the IR 11+ that onnx 1.23 writes by default
SPARSITY = 0.5
ORT_THREADS = 2

Result = dict[str, Any]


# --------------------------------------------------------------------------- models


@dataclass(frozen=True)
class Case:
    """One architecture, built identically (same seed, same weights) for ONNX export and Torch-Pruning."""

    label: str
    family: str  # "resnet" | "bert"
    size: int  # image side (resnet) or sequence length (bert); batch is always 1
    config: dict[str, Any] = field(default_factory=dict)  # overrides of the transformers config defaults

    def fingerprint(self) -> str:
        versions = [f"{d}=={metadata.version(d)}" for d in ("torch", "transformers", "onnx")]
        text = json.dumps([EXPORT_VERSION, asdict(self), versions], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


FULL = [
    Case("ResNet-50", "resnet", 224),  # ResNetConfig() defaults are resnet-50
    Case("BERT-base", "bert", 128),  # BertConfig() defaults are bert-base-uncased
]
QUICK = [
    Case("ResNet-18", "resnet", 224, {"layer_type": "basic", "depths": [2, 2, 2, 2],
                                      "hidden_sizes": [64, 128, 256, 512]}),
    Case("BERT-2L", "bert", 128, {"num_hidden_layers": 2}),
]


def _positional(hf: nn.Module, names: list[str]) -> nn.Module:
    """Wrap a transformers model so it takes positional tensors and returns the logits tensor: the form
    both torch.onnx.export and Torch-Pruning's tracer accept without output transforms."""
    from torch import nn

    class Positional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            return self.model(**dict(zip(names, args, strict=True))).logits

    return Positional()


def build_torch(case: Case) -> tuple[nn.Module, dict[str, torch.Tensor], list[nn.Module]]:
    """The model (random weights, eval mode), its example inputs and the layers to keep (classifier)."""
    import torch
    import transformers

    torch.manual_seed(0)
    inputs: dict[str, torch.Tensor]
    if case.family == "resnet":
        rcfg = transformers.ResNetConfig(**{"num_labels": 1000, **case.config})
        hf: Any = transformers.ResNetForImageClassification._from_config(rcfg)
        inputs = {"pixel_values": torch.randn(1, 3, case.size, case.size)}
        head = [hf.classifier[-1]]
    else:
        bcfg = transformers.BertConfig(**{"num_labels": 2, **case.config})
        # eager attention: the TorchScript exporter and Torch-Pruning's tracer both handle it
        hf = transformers.BertForSequenceClassification._from_config(bcfg, attn_implementation="eager")
        inputs = {"input_ids": torch.randint(0, bcfg.vocab_size, (1, case.size)),
                  # an explicit mask: without it transformers 5 builds one with aten::diff, which the
                  # TorchScript exporter cannot export
                  "attention_mask": torch.ones(1, case.size, dtype=torch.int64)}
        head = [hf.classifier]
    return _positional(hf.eval(), list(inputs)).eval(), inputs, head


def export_onnx(model: nn.Module, inputs: dict[str, torch.Tensor], path: pathlib.Path) -> None:
    """TorchScript export (opset 17, IR <= 10), written atomically so a cache hit is always whole."""
    import onnx
    import torch

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide the cache from other users
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter warns that it is deprecated
            torch.onnx.export(model, tuple(inputs.values()), tmp, dynamo=False, opset_version=OPSET,
                              input_names=list(inputs), output_names=["logits"])
        proto = onnx.load(tmp)
        proto.ir_version = min(proto.ir_version, MAX_IR_VERSION)
        onnx.save_model(proto, tmp)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _export_job(case: Case, path: str) -> Result:
    model, inputs, _ = build_torch(case)
    export_onnx(model, inputs, pathlib.Path(path))
    return {}


def cached_onnx(case: Case) -> pathlib.Path:
    """The exported original model, built in a child (the parent stays torch-free) on a cache miss."""
    path = CACHE / f"{case.label}-{case.fingerprint()}.onnx"
    if not path.exists():
        t0 = time.perf_counter()
        in_child(_export_job, case, str(path))
        print(f"  exported {path.name} in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


# --------------------------------------------------------------------------- measurement


def _child_main(fn: Callable[..., Result], args: tuple[Any, ...]) -> Result:
    try:
        return fn(*args)
    except Exception:  # report, don't crash the whole benchmark
        return {"error": traceback.format_exc(limit=6).strip().splitlines()[-1],
                "traceback": traceback.format_exc()}


def in_child(fn: Callable[..., Result], *args: Any) -> Result:
    """Run ``fn(*args)`` in a fresh spawned interpreter; errors come back as ``{"error": ...}``."""
    ctx = mp.get_context("spawn")
    with ctx.Pool(1, maxtasksperchild=1) as pool:
        try:
            return pool.apply(_child_main, (fn, args))
        except Exception as exc:  # the child died (e.g. killed for memory)
            return {"error": f"child process failed: {exc!r}"}


# --------------------------------------------------------------------------- jobs (run in children)


def graphprune_job(path: str, validate: bool, save_to: str | None, sparsity: float = SPARSITY) -> Result:
    """graphprune end to end: load the .onnx from disk, prune, (optionally) validate.

    Without OBS compensation, like Torch-Pruning's magnitude pruning it is compared with.
    """
    import graphprune

    with measured() as sec:
        res = graphprune.prune(path, sparsity=sparsity, target="channels", criterion="l2",
                               global_ranking=False, latency_runs=0, validate=validate, compensate="none")
    rep = res.report.to_dict()
    if save_to:
        res.save(save_to)
    return {**asdict(sec), "params": rep["params"], "macs": rep["flops"], "stages": rep["timings_s"],
            "groups": {k: rep["groups"][k] for k in ("total", "prunable", "pruned")}}


def graphprune_obs_job(path: str, kron_columns: int | None) -> Result:
    """graphprune with OBS compensation as a user gets it (50% FLOPs, defaults otherwise), without
    validation; `kron_columns` None keeps the default Kronecker threshold, a huge one forces exact H."""
    import graphprune

    opts: dict[str, Any] = {} if kron_columns is None else {"kron_columns": kron_columns}
    with measured() as sec:
        res = graphprune.prune(path, sparsity=SPARSITY, target="flops", compensate="obs", latency_runs=0,
                               validate=False, **opts)
    rep = res.report.to_dict()
    comp = rep["compensation"]
    forms = [layer.get("hessian", "exact") for layer in comp["layers"]]
    return {**asdict(sec), "params": rep["params"], "macs": rep["flops"], "stages": rep["timings_s"],
            "groups": {k: rep["groups"][k] for k in ("total", "prunable", "pruned")},
            "obs": {"applied": comp["applied"], **comp["self_check"],
                    "layers_kron": forms.count("kron"), "layers_exact": forms.count("exact")}}


def _bert_heads(model: nn.Module) -> dict[nn.Module, int]:
    """Torch-Pruning's documented HF-BERT recipe: q/k/v are pruned per head (head dims, not heads)."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    heads: dict[nn.Module, int] = {}
    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            heads |= {m.query: m.num_attention_heads, m.key: m.num_attention_heads,
                      m.value: m.num_attention_heads}
    return heads


def _fix_bert_heads(model: nn.Module) -> None:
    """After pruning head dims, the attention modules must reshape with the new head size."""
    from transformers.models.bert.modeling_bert import BertSelfAttention

    for m in model.modules():
        if isinstance(m, BertSelfAttention):
            m.attention_head_size = m.query.out_features // m.num_attention_heads
            m.all_head_size = m.query.out_features


def torch_pruning_job(case: Case, save_to: str | None, threads: int | None = None) -> Result:
    """Torch-Pruning end to end: DependencyGraph build (inside MetaPruner) + pruner.step().

    ``threads=None`` keeps torch's default (one per core). Its OpenMP workers busy-wait at barriers, so
    when other processes compete for the cores it slows down several-fold; ``threads=1`` is immune."""
    import torch
    import torch_pruning as tp

    if threads:
        torch.set_num_threads(threads)
    model, inputs, head = build_torch(case)
    example = tuple(inputs.values())
    heads = _bert_heads(model) if case.family == "bert" else {}
    with measured() as sec:
        pruner = tp.pruner.MetaPruner(
            model, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=SPARSITY, global_pruning=False, ignored_layers=head, num_heads=heads)
        pruner.step()
        _fix_bert_heads(model)
    out: Result = asdict(sec)
    if save_to:  # after the measured section: costs nothing that is reported as pruning
        export_onnx(model, inputs, pathlib.Path(save_to))
        after = tp.utils.count_ops_and_params(model, example)
        before = tp.utils.count_ops_and_params(build_torch(case)[0], example)
        out["macs"] = {"before": int(before[0]), "after": int(after[0])}
        out["params"] = {"before": int(before[1]), "after": int(after[1])}
    return out


def _feeds(path: str) -> dict[str, Any]:
    """Random inputs matching the model: images ~ N(0, 1), token ids < 1000, masks all ones."""
    import numpy as np
    import onnx

    rng = np.random.default_rng(0)
    feeds: dict[str, Any] = {}
    for vi in onnx.load(path, load_external_data=False).graph.input:
        shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == onnx.TensorProto.FLOAT:
            feeds[vi.name] = rng.standard_normal(shape).astype(np.float32)
        elif "mask" in vi.name:
            feeds[vi.name] = np.ones(shape, dtype=np.int64)
        else:
            feeds[vi.name] = rng.integers(0, 1000, shape, dtype=np.int64)
    return feeds


def latency_job(paths: dict[str, str], runs: int) -> Result:
    """Median onnxruntime CPU latency per model; one run of each in turn (order reversed every other
    round, so no model always follows the same one) so noise hits all alike. Thread-pool spinning is
    off: otherwise the workers of the session that just ran keep spinning and steal the 2 cores from the
    next one (2x slower medians on a loaded 2-core machine). Also MACs by graphprune's counter, one
    yardstick for every variant."""
    import onnxruntime as ort

    import graphprune

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = ORT_THREADS
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    macs = {label: int(graphprune.analyze(p).cost.macs()) for label, p in paths.items()}
    sessions = {label: ort.InferenceSession(p, opts, providers=["CPUExecutionProvider"])
                for label, p in paths.items()}
    feeds = _feeds(next(iter(paths.values())))
    times: dict[str, list[float]] = {label: [] for label in paths}
    order = list(sessions.items())
    for i in range(runs + 3):  # 3 warm-up rounds
        for label, sess in order if i % 2 else order[::-1]:
            t0 = time.perf_counter()
            sess.run(None, feeds)
            if i >= 3:
                times[label].append((time.perf_counter() - t0) * 1e3)
    return {"latency_ms": {k: statistics.median(v) for k, v in times.items()},
            "latency_min_ms": {k: min(v) for k, v in times.items()}, "macs_gp_counter": macs}


def profile_job(path: str, top: int) -> Result:
    """cProfile of one graphprune prune (validate=True), top functions by own time and cumulative."""
    import graphprune

    prof = cProfile.Profile()
    prof.enable()
    graphprune.prune(path, sparsity=SPARSITY, target="channels", latency_runs=0, validate=True, compensate="none")
    prof.disable()
    text = []
    for order in ("tottime", "cumulative"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(top)
        text.append(buf.getvalue().split("\n", 4)[-1].strip())  # drop the pstats preamble
    return {"profile": "\n\n".join(text)}


# --------------------------------------------------------------------------- orchestration


@dataclass
class Variant:
    """One measured configuration of one tool: how to run it and its repeated results."""

    tool: str
    setting: str
    job: Callable[..., Result]
    args: Callable[[str | None], tuple[Any, ...]]  # save_to -> job args
    save_to: str | None = None  # where the first repeat writes the pruned .onnx (for latency)
    runs: list[Result] = field(default_factory=list)

    @property
    def ok(self) -> list[Result]:
        return [r for r in self.runs if "error" not in r]

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.runs if "error" in r]

    def median(self, key: str) -> float:
        return statistics.median(r[key] for r in self.ok)


def variants(case: Case, onnx_path: pathlib.Path, out_dir: pathlib.Path, quick: bool, obs: int = 0) -> list[Variant]:
    """What to measure; `quick` drops Torch-Pruning's default-threads run (a contention study, and the
    slowest child to start) to keep the CI smoke run short. `obs`: 1 adds graphprune
    with OBS compensation at its defaults, 2 that and the same with an exact H everywhere."""
    p = str(onnx_path)
    with_obs = obs if case.family == "resnet" else min(obs, 1)  # an exact H is the default on BERT anyway
    return [
        Variant("graphprune", "validate=True", graphprune_job, lambda s: (p, True, s)),
        Variant("graphprune", "validate=False", graphprune_job, lambda s: (p, False, s),
                save_to=str(out_dir / f"{case.label}-graphprune.onnx")),
        Variant("Torch-Pruning", "1 thread", torch_pruning_job, lambda s: (case, s, 1),
                save_to=str(out_dir / f"{case.label}-torch-pruning.onnx")),
        *([] if quick else [Variant("Torch-Pruning", "default threads", torch_pruning_job, lambda s: (case, s))]),
        *([Variant("graphprune", "OBS, FLOPs", graphprune_obs_job, lambda s: (p, None))] if with_obs else []),
        *([Variant("graphprune", "OBS exact H, FLOPs", graphprune_obs_job, lambda s: (p, 2**31))]
          if with_obs > 1 else []),
    ]


def measure_case(case: Case, repeats: int, out_dir: pathlib.Path, quick: bool, obs: int = 0) -> list[Variant]:
    """Interleaved repeats of every variant; only the first repeat saves the pruned model."""
    vs = variants(case, cached_onnx(case), out_dir, quick, obs)
    for r in range(repeats):
        for v in vs:
            res = in_child(v.job, *v.args(v.save_to if r == 0 else None))
            v.runs.append(res)
            status = res.get("error") or (f"{res['seconds']:.2f} s (cpu {res['cpu_seconds']:.2f} s), "
                                          f"peak {res['rss_peak_mib']:.0f} MiB")
            print(f"  [{case.label} {r + 1}/{repeats}] {v.tool} {v.setting}: {status}", flush=True)
    return vs


ORIGINAL, CLEANED = "original", ", cleaned"


def measure_latency(case: Case, vs: list[Variant], out_dir: pathlib.Path, runs: int, clean: bool) -> Result:
    """Latency of the original and of each pruned model, all side by side in one child.

    The TorchScript exports (the original and Torch-Pruning's) also run after graphprune's graph
    clean-up alone (sparsity 0: constants folded, Identity nodes gone), which graphprune's own output
    has had: that separates the effect of pruning from the effect of the clean-up."""
    pruned = {v.tool: v.save_to for v in vs if v.save_to and v.ok and pathlib.Path(v.save_to).exists()}
    paths = {ORIGINAL: str(cached_onnx(case))} | pruned
    for name, path in list(paths.items()) if clean else []:
        if name == "graphprune":
            continue
        cleaned = str(out_dir / f"{case.label}-{name.lower().replace(' ', '-')}-cleaned.onnx")
        if "error" not in in_child(graphprune_job, path, False, cleaned, 0.0):
            paths[name + CLEANED] = cleaned
    order = [ORIGINAL, ORIGINAL + CLEANED, *(n for k in pruned for n in (k, k + CLEANED))]
    return in_child(latency_job, {k: paths[k] for k in order if k in paths}, runs)


# --------------------------------------------------------------------------- tables


def table(headers: list[str], rows: list[list[str]], left: int = 3) -> str:
    """Plain-text table: the first `left` columns (names) left-aligned, the numbers right-aligned."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(str(c).ljust(w) if i < left else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])


def _removed(d: dict[str, int] | None) -> str:
    return f"{1 - d['after'] / d['before']:.1%}" if d and d.get("before") else "n/a"


def cost_table(results: dict[str, list[Variant]], repeats: int) -> str:
    head = ["model", "tool", "setting", "wall s", "min", "max", "CPU s", "TP/this", "peak RSS MiB",
            "growth MiB", "params -", "MACs -"]
    rows = []
    for label, vs in results.items():
        # against the faster Torch-Pruning setting: the conservative comparison
        tp = min((v for v in vs if v.tool == "Torch-Pruning" and v.ok), key=lambda v: v.median("seconds"),
                 default=None)
        for v in vs:
            if not v.ok:
                rows.append([label, v.tool, v.setting, "FAILED", *[""] * (len(head) - 4)])
                continue
            wall = [r["seconds"] for r in v.ok]
            rows.append([label, v.tool, v.setting, f"{v.median('seconds'):.2f}", f"{min(wall):.2f}",
                         f"{max(wall):.2f}", f"{v.median('cpu_seconds'):.2f}",
                         f"{tp.median('seconds') / v.median('seconds'):.2f}x" if tp else "n/a",
                         f"{v.median('rss_peak_mib'):.0f}",
                         f"{v.median('rss_peak_mib') - v.median('rss_start_mib'):.0f}",
                         _removed(v.ok[0].get("params")), _removed(v.ok[0].get("macs"))])
    return (f"1. Pruning cost at {SPARSITY:.0%} channels (median of {repeats} runs, each in a fresh process)\n"
            + table(head, rows))


STAGES = ["analyze", "score", "select", "compensate", "surgery", "validate"]


def _runs_with(results: dict[str, list[Variant]], key: str) -> Iterator[tuple[str, Variant, list[Result]]]:
    """(model label, variant, its successful runs) for every variant whose runs report `key`."""
    for label, vs in results.items():
        for v in vs:
            ok = [r for r in v.ok if key in r]
            if ok:
                yield label, v, ok


def stage_table(results: dict[str, list[Variant]]) -> str:
    rows = []
    for label, v, ok in _runs_with(results, "stages"):
        g = ok[0]["groups"]
        rows.append([label, v.tool, v.setting,
                     *(f"{statistics.median(r['stages'].get(k, 0.0) for r in ok):.2f}" for k in STAGES),
                     f"{g['pruned']}/{g['prunable']}/{g['total']}"])
    return ("1b. graphprune wall time per stage, s (median), and groups pruned/prunable/total\n"
            + table(["model", "tool", "setting", *STAGES, "groups"], rows))


def obs_table(results: dict[str, list[Variant]]) -> str:
    rows = []
    for label, v, ok in _runs_with(results, "obs"):
        o = ok[0]["obs"]
        rows.append([label, v.setting, f"{v.median('seconds'):.1f}", f"{v.median('cpu_seconds'):.1f}",
                     f"{v.median('rss_peak_mib'):.0f}", f"{o['layers_kron']}/{o['layers_exact']}",
                     f"{o['relative_error_uncompensated']:.4f}", f"{o['relative_error_compensated']:.4f}",
                     "yes" if o["applied"] else "no"])
    return ("1c. graphprune with OBS compensation (50% FLOPs, 128 synthetic samples, validate=False): layers with a "
            "Kronecker-factored / exact H, and the held-out relative output error without and with compensation\n"
            + table(["model", "setting", "wall s", "CPU s", "peak RSS MiB", "kron/exact", "error plain",
                     "error OBS", "applied"], rows, left=2))


def speed_table(results: dict[str, list[Variant]], latency: dict[str, Result], runs: int) -> str:
    head = ["model", "variant", "GMACs (own)", "MACs / (own)", "MACs / (gp)", "ms median", "ms min",
            "speed-up", "speed-up (min)", "speed-up / MACs", "vs cleaned"]
    rows = []
    for label, lat in latency.items():
        if "error" in lat:
            rows.append([label, "FAILED: " + lat["error"], *[""] * (len(head) - 2)])
            continue
        ms, ms_min, gp = lat["latency_ms"], lat["latency_min_ms"], lat["macs_gp_counter"]
        own = {v.tool: v.ok[0]["macs"] for v in results[label] if v.save_to and v.ok and "macs" in v.ok[0]}
        clean = ORIGINAL + CLEANED
        for name in ms:
            macs = own.get(name.removesuffix(CLEANED))
            fold = macs["before"] / macs["after"] if macs else gp[ORIGINAL] / gp[name]
            speedup = ms[ORIGINAL] / ms[name]
            rows.append([label, name,
                         f"{macs['before'] / 1e9:.2f} -> {macs['after'] / 1e9:.2f}" if macs
                         else f"{gp[name] / 1e9:.2f}",
                         f"{fold:.2f}x", f"{gp[ORIGINAL] / gp[name]:.2f}x", f"{ms[name]:.1f}",
                         f"{ms_min[name]:.1f}", f"{speedup:.2f}x", f"{ms_min[ORIGINAL] / ms_min[name]:.2f}x",
                         f"{speedup / fold:.2f}" if macs else "",
                         f"{ms[clean] / ms[name]:.2f}x" if clean in ms else "n/a"])
    if all(r[-1] == "n/a" for r in rows if len(r) == len(head)):  # no clean-up rows (--quick)
        head, rows = head[:-1], [r[:-1] for r in rows]
    return (f"2. Realized speed-up at {SPARSITY:.0%} channels: onnxruntime CPU, {ORT_THREADS} intra-op threads, "
            f"batch 1, {runs} runs per model interleaved; speed-ups are against '{ORIGINAL}'\n"
            + table(head, rows, left=2))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="small models (ResNet-18, 2-layer BERT), 1 repeat")
    ap.add_argument("--repeats", type=int, help="runs per pruning measurement (default 3, quick 1)")
    ap.add_argument("--latency-runs", type=int, help="onnxruntime runs per model (default 50, quick 10)")
    ap.add_argument("--models", nargs="*", help="subset of model labels to run")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="also cProfile one graphprune prune per model and print the top N functions")
    ap.add_argument("--json", type=pathlib.Path, help="also write raw results here")
    ap.add_argument("--obs", action="store_true", help="also graphprune with OBS compensation")
    ap.add_argument("--obs-exact", action="store_true", help="--obs, and OBS with an exact H on every layer")
    args = ap.parse_args(argv)
    cases = QUICK if args.quick else FULL
    if args.models:
        cases = [c for c in cases if c.label in args.models]
    repeats = args.repeats or (1 if args.quick else 3)
    lat_runs = args.latency_runs or (10 if args.quick else 50)
    out_dir = CACHE / "pruned"
    out_dir.mkdir(parents=True, exist_ok=True)
    started, load = time.perf_counter(), os.getloadavg()[0]

    results: dict[str, list[Variant]] = {}
    latency: dict[str, Result] = {}
    profiles: dict[str, Result] = {}
    for case in cases:
        print(f"{case.label}:", flush=True)
        results[case.label] = measure_case(case, repeats, out_dir, args.quick, 2 if args.obs_exact else int(args.obs))
        latency[case.label] = measure_latency(case, results[case.label], out_dir, lat_runs, not args.quick)
        if args.profile:
            profiles[case.label] = in_child(profile_job, str(cached_onnx(case)), args.profile)

    versions = ", ".join(f"{d} {metadata.version(d)}" for d in
                         ("torch", "torch-pruning", "transformers", "onnx", "onnxruntime", "graphprune"))
    print(f"\n(total {time.perf_counter() - started:.0f} s; python {sys.version.split()[0]}, {versions}, "
          f"{os.cpu_count()} CPUs; 1-min load average {load:.1f} at start, {os.getloadavg()[0]:.1f} at end)\n")
    print(cost_table(results, repeats), end="\n\n")
    print(stage_table(results), end="\n\n")
    if args.obs or args.obs_exact:
        print(obs_table(results), end="\n\n")
    print(speed_table(results, latency, lat_runs))
    for label, prof in profiles.items():
        print(f"\n3. cProfile of graphprune.prune on {label} (validate=True)\n"
              + prof.get("profile", "FAILED: " + str(prof.get("error"))))
    failures = [f"{label} {v.tool} {v.setting}: {e}" for label, vs in results.items() for v in vs
                for e in v.errors]
    failures += [f"{label} latency: {r['error']}" for label, r in latency.items() if "error" in r]
    if failures:
        print("\nFailures:\n" + "\n".join(failures))
    if args.json:
        raw = {"results": {k: [{"tool": v.tool, "setting": v.setting, "runs": v.runs} for v in vs]
                           for k, vs in results.items()}, "latency": latency, "profiles": profiles}
        args.json.write_text(json.dumps(raw, indent=2, default=str))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
