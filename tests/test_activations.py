"""Decomposed HardSwish fused (graphprune/passes/activations.py), on exported and shipped models.

The fused graph computes the same function: outputs equal to float rounding, graph output names kept;
a pattern with another constant, or an intermediate something else reads, stays as it was.
"""

from __future__ import annotations

import io
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import ModelProto
from zoo_testing import path_or_skip

import graphprune
from graphprune import runtime
from graphprune.cli import main
from graphprune.errors import UsageError
from graphprune.passes import fuse_hardswish
from graphprune.protowalk import copy_proto

torch = pytest.importorskip("torch")
nn = torch.nn


class _PaddleStyle(nn.Module):
    """Convs with HardSwish written out as paddle2onnx writes it; `divisor` and `leak` vary the pattern."""

    def __init__(self, divisor: float = 6.0, leak: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.divisor, self.leak = divisor, leak

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        clipped = torch.nn.functional.relu6(h + 3)
        y = self.b(h * clipped / self.divisor)
        y = y * torch.nn.functional.relu6(y + 3) / 6
        return y + clipped.mean() if self.leak else y


def _export(net: nn.Module, opset: int) -> ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.randn(2, 3, 16, 16),), f, dynamo=False, opset_version=opset,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return onnx.load_from_string(f.getvalue())


def _feeds(model: ModelProto, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {model.graph.input[0].name: np.random.default_rng(0).uniform(-4, 4, shape).astype(np.float32)}


def _outputs(model: ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(model, timed=False), feeds)


def _fused(model: ModelProto, feeds: dict[str, np.ndarray], rtol: float = 1e-5) -> tuple[ModelProto, int]:
    """A fused copy, checked in full and against the model's outputs."""
    fused = copy_proto(model)
    count = fuse_hardswish(fused)
    onnx.checker.check_model(fused, full_check=True)
    assert [o.name for o in fused.graph.output] == [o.name for o in model.graph.output]
    want, got = _outputs(model, feeds), _outputs(fused, feeds)
    for name in want:
        scale = float(np.abs(want[name]).max())
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=rtol * scale + 1e-7)
    return fused, count


def _ops(model: ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node)


@pytest.mark.parametrize(("opset", "fused_ops"), [(13, {"HardSigmoid": 2, "Mul": 2}), (14, {"HardSwish": 2})])
def test_both_hardswishes_fuse_to_the_ops_the_opset_has(opset: int, fused_ops: dict[str, int]) -> None:
    model = _export(_PaddleStyle(), opset)
    before = _ops(model)
    assert before["Clip"] == 2 and before["Div"] == 2
    fused, count = _fused(model, _feeds(model, (3, 3, 16, 16)))
    after = _ops(fused)
    assert count == 2 and after["Clip"] == after["Div"] == after["Add"] == 0
    assert {op: after[op] for op in fused_ops} == fused_ops
    assert len(fused.graph.node) < len(model.graph.node)
    assert not [t for t in fused.graph.initializer if t.name not in {i for n in fused.graph.node for i in n.input}]


def test_another_divisor_or_a_shared_intermediate_stays() -> None:
    for net, left in ((_PaddleStyle(divisor=5.0), 1), (_PaddleStyle(leak=True), 1)):
        model = _export(net, 14)
        fused, count = _fused(model, _feeds(model, (2, 3, 16, 16)))
        assert count == 1 and _ops(fused)["Clip"] == left  # the second, plain one fuses
    model = _export(_PaddleStyle(), 11)
    del model.opset_import[:]
    model.opset_import.add(domain="", version=5)  # before HardSigmoid: nothing to fuse into
    assert fuse_hardswish(copy_proto(model)) == 0


# paddle2onnx graphs shipped in packages: PP-OCR (opset 11/12: HardSigmoid + Mul), PicoDet (13)
@pytest.mark.parametrize(("name", "shape", "count"), [
    ("ppocr_cls", (2, 3, 48, 192), 18), ("ppocr_rec", (1, 3, 48, 320), 28), ("layout_cdla", (1, 3, 800, 608), 94)])
def test_shipped_paddle_graphs_fuse(name: str, shape: tuple[int, ...], count: int) -> None:
    model = onnx.load(path_or_skip(name))
    fused, got = _fused(model, _feeds(model, shape), rtol=1e-4)
    assert got == count
    assert len(fused.graph.node) < len(model.graph.node) - 2 * count


def test_prune_fuses_when_asked_and_validates_the_fused_model() -> None:
    path = path_or_skip("ppocr_cls")
    common: dict[str, Any] = {"sparsity": 0.3, "latency_runs": 0, "compensate": "none"}
    res = graphprune.prune(path, common, fuse_activations=True)
    plain = graphprune.prune(path, common)
    assert res.report.graph == {"batchnorms_folded": 35, "hardswish_fused": 18}
    assert "hardswish_fused" not in plain.report.graph
    assert res.report.validation["equivalence"]["passed"] and res.report.validation["checker"] == "passed"
    assert _ops(res.model)["Clip"] == 0 and _ops(plain.model)["Clip"] == 18
    assert "18 decomposed HardSwish(es) fused" in res.report.summary()
    assert "18 decomposed HardSwish(es) fused" in res.report.to_html("cls")
    assert "fused" not in plain.report.summary()


def test_fuse_activations_from_the_cli_and_a_config_check(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="fuse_activations"):
        graphprune.PruneConfig(fuse_activations="true")  # type: ignore[arg-type]
    source, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    onnx.save_model(_export(_PaddleStyle(), 14), source)
    for flags, swishes in (([], 0), (["--fuse-activations"], 2)):
        assert main(["prune", str(source), str(out), *flags, "-q", "--latency-runs", "0"]) == 0
        assert _ops(onnx.load(str(out)))["HardSwish"] == swishes
