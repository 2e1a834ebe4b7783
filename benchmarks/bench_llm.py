"""Scale: a billion-parameter decoder with external data, graphprune against Torch-Pruning, side by side.

A Llama-style decoder (hidden 2048, 20 layers, 32 query / 4 KV heads, MLP 5632, vocab 32000: 1.01 B
parameters, 4.06 GB of float32) is built from a transformers config with random weights (seed 0),
exported once with the TorchScript exporter (opset 17; past 2 GiB the exporter writes external data)
and cached under `benchmarks/.cache/llm-<fingerprint>/`, never committed. Each measurement runs in a
fresh process (`bench_prune.in_child`), so its peak RSS is its own:

* graphprune: `prune(model.onnx, sparsity=0.3, latency_runs=0)` with validation on, then `save` (the
  output goes to external data), with `--compensate none` and, with `--obs`, with default OBS;
* the saved model loaded back by onnxruntime from its files and run once (the output shape must match);
* Torch-Pruning on the same torch model: heads and MLP widths at 30% as in its LLM example
  (`num_heads` for q/k/v, `prune_num_heads`, L2 group magnitude, `lm_head` ignored).

Run `python benchmarks/bench_llm.py` (~15 min and up to ~20 GB on 2 cores) or `--layers 2` for a
0.2 B-parameter smoke run.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pathlib
import shutil
import sys
import time
import warnings
from dataclasses import asdict
from importlib import metadata
from typing import TYPE_CHECKING, Any

if __package__ in (None, ""):
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks.bench_prune import CACHE, MAX_IR_VERSION, OPSET, in_child, table
from benchmarks.measure import measured

if TYPE_CHECKING:
    from torch import nn

Result = dict[str, Any]
CONFIG = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 20, "num_attention_heads": 32,
          "num_key_value_heads": 4, "vocab_size": 32000, "max_position_embeddings": 2048}
SEQ = 16
SPARSITY = 0.3
EXPORT_VERSION = "1"


def config(layers: int) -> dict[str, Any]:
    return {**CONFIG, "num_hidden_layers": layers}


def build(layers: int) -> nn.Module:
    """The decoder as a module taking `input_ids` and returning the logits (eval mode, seed 0)."""
    import torch
    import transformers
    from torch import nn

    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM._from_config(transformers.LlamaConfig(**config(layers), use_cache=False),
                                                    attn_implementation="eager")

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = hf

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            # an explicit mask: without one transformers 5 builds it with aten::diff, which the
            # TorchScript exporter cannot export
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    return Logits().eval()


def example() -> tuple[Any, Any]:
    import torch

    ids = torch.randint(0, CONFIG["vocab_size"], (1, SEQ), generator=torch.Generator().manual_seed(1))
    return ids, torch.ones(1, SEQ, dtype=torch.int64)


def _export_job(layers: int, path: str) -> Result:
    import onnx
    import torch

    model = build(layers)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, example(), path, dynamo=False, opset_version=OPSET,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"])
    proto = onnx.load(path, load_external_data=False)  # the skeleton only: external references are kept
    if proto.ir_version > MAX_IR_VERSION:
        proto.ir_version = MAX_IR_VERSION
        onnx.save_model(proto, path)
    return {}


def cached_onnx(layers: int) -> pathlib.Path:
    versions = [f"{d}=={metadata.version(d)}" for d in ("torch", "transformers", "onnx")]
    key = hashlib.sha256(json.dumps([EXPORT_VERSION, config(layers), SEQ, versions]).encode()).hexdigest()[:10]
    folder = CACHE / f"llm-{layers}l-{key}"
    path = folder / "model.onnx"
    if not path.exists():
        tmp = folder.with_suffix(".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        t0 = time.perf_counter()
        res = in_child(_export_job, layers, str(tmp / "model.onnx"))
        if "error" in res:
            raise RuntimeError(f"export failed: {res['error']}")
        tmp.rename(folder)
        print(f"  exported {folder.name} in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def folder_bytes(path: pathlib.Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.is_file())


def graphprune_job(path: str, compensate: str, out: str) -> Result:
    import graphprune

    with measured() as sec:
        res = graphprune.prune(path, sparsity=SPARSITY, compensate=compensate, latency_runs=0, validate=True)
        res.save(out)
    rep = res.report.to_dict()
    return {**asdict(sec), "params": rep["params"], "stages": rep["timings_s"],
            "groups": {k: rep["groups"][k] for k in ("total", "prunable", "pruned")},
            "statistics": rep["compensation"].get("statistics"), "self_check": rep["compensation"]["self_check"]}


def run_job(path: str) -> Result:
    """The saved model, loaded from its files by onnxruntime and run once."""
    import numpy as np
    import onnxruntime as ort

    with measured() as sec:
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        ids, mask = example()
        y = sess.run(None, {"input_ids": ids.numpy().astype(np.int64), "attention_mask": mask.numpy()})[0]
    return {**asdict(sec), "shape": list(y.shape)}


def torch_pruning_job(layers: int) -> Result:
    import torch
    import torch_pruning as tp

    torch.set_num_threads(1)  # its OpenMP workers busy-wait on a shared machine (benchmarks/README.md)
    model = build(layers)
    hf = model.model
    heads: dict[Any, int] = {}
    for layer in hf.model.layers:
        a = layer.self_attn
        heads |= {a.q_proj: CONFIG["num_attention_heads"], a.k_proj: CONFIG["num_key_value_heads"],
                  a.v_proj: CONFIG["num_key_value_heads"]}
    before = sum(p.numel() for p in model.parameters())
    with measured() as sec:
        pruner = tp.pruner.MetaPruner(model, example(), importance=tp.importance.GroupMagnitudeImportance(p=2),
                                      pruning_ratio=SPARSITY, global_pruning=False, ignored_layers=[hf.lm_head],
                                      num_heads=heads, prune_num_heads=True, prune_head_dims=False,
                                      head_pruning_ratio=SPARSITY)
        pruner.step()
    after = sum(p.numel() for p in model.parameters())
    return {**asdict(sec), "params": {"before": before, "after": after}}


def _said(res: Result) -> str:
    return str(res["error"]) if "error" in res else f"{res['seconds']:.0f} s, peak {res['rss_peak_mib'] / 1024:.1f} GiB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"], help="decoder layers (default 20)")
    ap.add_argument("--obs", action="store_true", help="also graphprune with default OBS compensation")
    ap.add_argument("--no-torch-pruning", action="store_true", help="leave out the Torch-Pruning run")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    path = cached_onnx(args.layers)
    size = folder_bytes(path)
    print(f"model: {path.parent.name}, {size / 1e9:.2f} GB on disk", flush=True)
    out_dir = CACHE / "pruned" / path.parent.name
    runs: list[tuple[str, str, Result]] = []
    for compensate in ("none", "obs") if args.obs else ("none",):
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        out = out_dir / "model.onnx"
        res = in_child(graphprune_job, str(path), compensate, str(out))
        runs.append(("graphprune", f"compensate={compensate}, validate, save", res))
        print(f"  graphprune {compensate}: {_said(res)}", flush=True)
        if "error" not in res:
            loaded = in_child(run_job, str(out))
            runs.append(("onnxruntime", f"load + run the {compensate} output", loaded))
    if not args.no_torch_pruning:
        res = in_child(torch_pruning_job, args.layers)
        runs.append(("Torch-Pruning", "heads + MLP, 1 thread", res))
        print(f"  Torch-Pruning: {_said(res)}", flush=True)
    rows = []
    for tool, setting, r in runs:
        if "error" in r:
            rows.append([tool, setting, r["error"][:80], "", "", "", ""])
            continue
        params = r.get("params")
        removed = f"{1 - params['after'] / params['before']:.1%}" if params else ", ".join(map(str, r["shape"]))
        rows.append([tool, setting, f"{r['seconds']:.0f}", f"{r['cpu_seconds']:.0f}",
                     f"{r['rss_peak_mib'] / 1024:.1f}", f"{r['rss_peak_mib'] * 2**20 / size:.2f}x", removed])
    print(f"\n(total {time.perf_counter() - t0:.0f} s; model {size / 1e9:.2f} GB, sparsity {SPARSITY}, 2 CPUs)\n")
    print(table(["tool", "setting", "wall s", "CPU s", "peak RSS GiB", "peak / model", "params - / shape"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
