"""BatchNormalization folded into its producer (graphprune/passes/fold.py), on exported and shipped models.

Folding must change nothing but the graph: outputs equal the unfolded model's, graph output names stay,
what cannot fold exactly (a shared producer, non-constant weights or parameters, a grouped ConvTranspose,
a BN over a batched MatMul's tokens, training mode) stays as it was.
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
import zoo
from onnx import ModelProto, TensorProto
from rules.helpers import Net

import graphprune
from graphprune import runtime
from graphprune import weights as gw
from graphprune.cli import _options, _parser, main
from graphprune.errors import UsageError
from graphprune.loading import load_model
from graphprune.normalize import normalize
from graphprune.passes import fold_batchnorms, folded_affine
from graphprune.protowalk import copy_proto

torch = pytest.importorskip("torch")
nn = torch.nn


def _bn_count(model: ModelProto) -> int:
    return Counter(n.op_type for n in model.graph.node)["BatchNormalization"]


def _randomize(net: Any) -> Any:
    """Running statistics and affine parameters far from the identity, so a wrong fold shows."""
    torch.manual_seed(0)
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.2, 3)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-1, 1)
    return net.eval()


def _conv_bn_relu() -> Any:
    """Conv (with and without bias) -BN-ReLU, then Linear-BN1d as Gemm and, without bias, as MatMul."""
    return _randomize(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(),
        nn.Linear(12, 10, bias=False), nn.BatchNorm1d(10)))


def _convtranspose_bn() -> Any:
    """ConvTranspose-BN twice; the grouped one cannot fold (W's axis 1 holds one group's channels)."""
    return _randomize(nn.Sequential(
        nn.ConvTranspose2d(3, 8, 4, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 3, padding=1, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4)))


def _export(net: Any) -> ModelProto:
    """The TorchScript export with its BatchNormalization nodes (constant folding would fuse them)."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 16, 16),), f, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}},
                          do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    model = onnx.load_from_string(f.getvalue())
    assert _bn_count(model) == sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    return model


def _zoo_path(name: str) -> str:
    try:
        return str(zoo.path(name))
    except zoo.ZooUnavailable as exc:
        pytest.skip(str(exc))


def _feeds(model: ModelProto, shape: tuple[int, ...], seed: int = 0) -> dict[str, np.ndarray]:
    return {model.graph.input[0].name: np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)}


def _outputs(model: ModelProto, feeds: dict[str, np.ndarray], **options: Any) -> dict[str, np.ndarray]:
    return runtime.run(runtime.session(model, timed=False, **options), feeds)


def _folded(model: ModelProto) -> tuple[ModelProto, ModelProto, int]:
    """(the normalized model, a folded copy, how many were folded), the copy checked in full."""
    dense = normalize(load_model(model.SerializeToString()))
    folded = copy_proto(dense)
    count = fold_batchnorms(folded)
    onnx.checker.check_model(folded, full_check=True)
    assert [o.name for o in folded.graph.output] == [o.name for o in dense.graph.output]
    return dense, folded, count


def _assert_same(ref: dict[str, np.ndarray], got: dict[str, np.ndarray], rtol: float = 1e-4) -> None:
    assert list(ref) == list(got)
    for name, r in ref.items():
        np.testing.assert_allclose(got[name], r, rtol=0, atol=rtol * float(np.abs(r).max()), err_msg=name)


@pytest.mark.parametrize(("build", "folds", "left"), [(_conv_bn_relu, 4, 0), (_convtranspose_bn, 2, 1)])
def test_exported_nets_fold_to_the_same_outputs(build: Any, folds: int, left: int) -> None:
    dense, folded, count = _folded(_export(build()))
    assert count == folds and _bn_count(folded) == left
    assert len(folded.graph.node) == len(dense.graph.node) - folds
    assert folded.ByteSize() < dense.ByteSize()
    ops = Counter(n.op_type for n in folded.graph.node)
    if build is _conv_bn_relu:
        assert ops["Gemm"] == 2 and not ops["MatMul"]  # the 2-D MatMul became a Gemm with the BN as its bias
    for seed in range(3):
        feeds = _feeds(dense, (4, 3, 16, 16), seed)
        _assert_same(_outputs(dense, feeds), _outputs(folded, feeds))


def test_folded_affine_is_the_layer_then_the_normalization() -> None:
    rng = np.random.default_rng(0)
    w, b, x = rng.standard_normal((5, 3)), rng.standard_normal(5), rng.standard_normal((7, 3))
    scale, shift, mean, var = rng.standard_normal(5), rng.standard_normal(5), rng.standard_normal(5), rng.uniform(
        0.1, 2, 5)
    want = (x @ w.T + b - mean) / np.sqrt(var + 1e-3) * scale + shift
    fw, fb = folded_affine(w.astype(np.float16), b, scale, shift, mean, var, 1e-3, 0)
    assert fw.dtype == fb.dtype == np.float16  # the layer's dtype, computed in float64
    np.testing.assert_allclose(x @ fw.astype(np.float64).T + fb, want, rtol=0, atol=5e-3 * np.abs(want).max())
    fw, fb = folded_affine(w, b, scale, shift, mean, var, 1e-3, 0)
    np.testing.assert_allclose(x @ fw.T + fb, want, rtol=1e-12, atol=1e-12)


def _bn(n: Net, y: str, channels: int, **attrs: Any) -> Any:
    var = n.const(f"{y}.var", np.random.default_rng(1).uniform(0.5, 2.0, channels), np.float32)
    return n.op("BatchNormalization", [y, n.w(f"{y}.scale", [channels]), n.w(f"{y}.shift", [channels]),
                                       n.w(f"{y}.mean", [channels]), var], **attrs)


def test_float16_weights_stay_float16() -> None:
    n = Net()
    x = n.input("x", [2, 3, 8, 8], TensorProto.FLOAT16)
    n.output(_bn(n, n.conv(x, 3, 4, "c", k=3), 4))
    model = n.model(check=False)
    for t in model.graph.initializer:
        t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(np.float16), t.name))
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    folded = copy_proto(model)
    assert fold_batchnorms(folded) == 1
    onnx.checker.check_model(folded, full_check=True)
    assert {t.data_type for t in folded.graph.initializer} == {TensorProto.FLOAT16}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float16)}
    _assert_same(_outputs(model, feeds), _outputs(folded, feeds), rtol=1e-2)


def test_a_chain_of_batchnorms_folds_into_one_conv() -> None:
    n = Net()
    n.output(_bn(n, _bn(n, n.conv(n.input("x", [2, 3, 8, 8]), 3, 4, "c", k=3, bias=False), 4), 4))
    model = n.model()
    folded = copy_proto(model)
    assert fold_batchnorms(folded) == 2 and [n.op_type for n in folded.graph.node] == ["Conv"]
    onnx.checker.check_model(folded, full_check=True)
    assert {t.name for t in folded.graph.initializer} == {"c.w", "c.w_bias"}
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3, 8, 8)).astype(np.float32)}
    _assert_same(_outputs(model, feeds), _outputs(folded, feeds))


def test_gemm_with_beta_and_a_row_bias_folds() -> None:
    n = Net()
    x = n.input("x", [5, 6])
    y = n.op("Gemm", [x, n.w("g.w", [4, 6]), n.w("g.c", [1, 4])], transB=1, alpha=0.5, beta=2.0)
    n.output(_bn(n, y, 4))
    model = n.model()
    folded = copy_proto(model)
    assert fold_batchnorms(folded) == 1 and _bn_count(folded) == 0
    onnx.checker.check_model(folded, full_check=True)
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 6)).astype(np.float32)}
    _assert_same(_outputs(model, feeds), _outputs(folded, feeds))


def _shared_output(n: Net) -> None:
    y = n.conv(n.input("x", [1, 3, 8, 8]), 3, 4, "c")
    n.output(_bn(n, y, 4), n.op("Relu", [y]))


def _weight_input(n: Net) -> None:
    x, w = n.input("x", [1, 3, 8, 8]), n.input("w", [4, 3, 1, 1])
    n.output(_bn(n, n.op("Conv", [x, w]), 4))


def _param_input(n: Net) -> None:
    y = n.conv(n.input("x", [1, 3, 8, 8]), 3, 4, "c")
    n.output(n.op("BatchNormalization", [y, n.w("s", [4]), n.w("b", [4]), n.input("mean", [4]), n.w("v", [4])]))


def _shared_weight(n: Net) -> None:
    x, w = n.input("x", [1, 3, 8, 8]), n.w("w", [4, 3, 1, 1])
    n.output(_bn(n, n.op("Conv", [x, w]), 4), _bn(n, n.op("Conv", [x, w]), 4))


def _grouped_convtranspose(n: Net) -> None:
    n.output(_bn(n, n.conv(n.input("x", [1, 4, 8, 8]), 4, 4, "t", k=3, group=2, op="ConvTranspose"), 4))


def _batched_matmul(n: Net) -> None:
    n.output(_bn(n, n.op("MatMul", [n.input("x", [2, 6, 6]), n.w("w", [6, 6])]), 6))  # BN over axis 1: tokens


def _training(n: Net) -> None:
    y = n.conv(n.input("x", [1, 3, 8, 8]), 3, 4, "c")
    n.output(_bn(n, y, 4, outputs=3, training_mode=1)[0])


@pytest.mark.parametrize("build", [_shared_output, _weight_input, _param_input, _shared_weight,
                                   _grouped_convtranspose, _batched_matmul, _training])
def test_what_does_not_fold_exactly_is_left_alone(build: Any) -> None:
    n = Net()
    build(n)
    model = n.model(check=False)
    folded = copy_proto(model)
    assert fold_batchnorms(folded) == 0
    assert folded.SerializeToString() == model.SerializeToString()


def test_mapped_weights_are_replaced_not_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapped weight's file is the user's: the folded weight goes to a scratch file, the source's bytes
    stay as they were."""
    monkeypatch.setattr(gw, "MAP_MIN_BYTES", 1024)
    dense = normalize(load_model(_export(_conv_bn_relu()).SerializeToString()))
    source = tmp_path / "model.onnx"
    onnx.save_model(dense, source, save_as_external_data=True, location="weights.bin", size_threshold=1024)
    before = (tmp_path / "weights.bin").read_bytes()
    model = normalize(load_model(source), copy=False)
    mapped = {t.name for t in model.graph.initializer if gw.is_mapped(t)}
    assert mapped
    feeds = _feeds(dense, (2, 3, 16, 16))
    want = _outputs(model, feeds)
    assert fold_batchnorms(model) == 4
    replaced = [t for t in model.graph.initializer if t.name in mapped]
    assert replaced and all(gw.is_mapped(t) for t in replaced)
    assert {Path(e.value).parent for t in replaced for e in t.external_data if e.key == "location"} == {
        gw.Spill.folder()}
    assert (tmp_path / "weights.bin").read_bytes() == before
    _assert_same(want, _outputs(model, feeds))


# PP-OCR (paddle2onnx) from rapidocr: BNs the folder cannot take (det: one after an Add) stay
@pytest.mark.parametrize(("name", "shape", "folds", "left"), [
    ("ppocr_cls", (2, 3, 48, 192), 35, 0), ("ppocr_rec", (1, 3, 48, 320), 6, 0), ("ppocr_det", (1, 3, 64, 64), 2, 1)])
def test_ppocr_folds(name: str, shape: tuple[int, ...], folds: int, left: int) -> None:
    dense, folded, count = _folded(onnx.load(_zoo_path(name)))
    assert count == folds and _bn_count(folded) == left
    assert len(folded.graph.node) == len(dense.graph.node) - folds and folded.ByteSize() < dense.ByteSize()
    # the folded BNs' outputs keep their names: compared where each fold happened, and at the outputs
    left_names = {n.output[0] for n in folded.graph.node if n.op_type == "BatchNormalization"}
    bns = [n.output[0] for n in dense.graph.node if n.op_type == "BatchNormalization" and n.output[0] not in left_names]
    outputs = [o.name for o in dense.graph.output]
    # except the detector's: its sigmoid gives ~1e-5 on noise after BN variances up to 1e8, and rounding
    # alone (onnxruntime's own Conv+BN fusion) moves that by percents
    names = bns + (outputs if name != "ppocr_det" else [])
    feeds = _feeds(dense, shape)
    ref = runtime.run(runtime.session(dense, timed=False, extra_outputs=bns), feeds, names)
    _assert_same(ref, runtime.run(runtime.session(folded, timed=False, extra_outputs=bns), feeds, names))


@pytest.mark.parametrize("name", ["densenet_tiny-ts", "densenet_tiny-dynamo"])
def test_densenet_batchnorms_after_concat_and_shared_convs_stay(name: str) -> None:
    dense, folded, count = _folded(onnx.load(_zoo_path(name)))
    assert count == 0 and _bn_count(folded) == _bn_count(dense) == 7
    assert folded.SerializeToString() == dense.SerializeToString()


@pytest.mark.parametrize("compensate", ["obs", "none"])
def test_prune_folds_and_validates_the_folded_model(compensate: str) -> None:
    model = _export(_conv_bn_relu())
    res = graphprune.prune(model, {"sparsity": 0.3}, compensate=compensate, latency_runs=0)
    kept = graphprune.prune(model, {"sparsity": 0.3}, compensate=compensate, latency_runs=0, fold_bn=False)
    assert res.report.graph == {"batchnorms_folded": 4} and kept.report.graph == {}
    assert _bn_count(res.model) == 0 and _bn_count(kept.model) == 4
    assert res.report.validation["equivalence"]["passed"]
    assert "4 BatchNormalization node(s) folded" in res.report.summary()
    assert "folded" not in kept.report.summary()
    assert len(res.model.graph.node) == len(kept.model.graph.node) - 4
    assert res.model.ByteSize() < kept.model.ByteSize()
    assert [o.name for o in res.model.graph.output] == ["y"]
    feeds = _feeds(model, (4, 3, 16, 16))
    _assert_same(_outputs(kept.model, feeds), _outputs(res.model, feeds))


def test_prune_ppocr_cls_folds_its_35_batchnorms() -> None:
    res = graphprune.prune(_zoo_path("ppocr_cls"), {"sparsity": 0.3}, latency_runs=0)
    assert res.report.graph == {"batchnorms_folded": 35} and _bn_count(res.model) == 0
    assert res.report.validation["equivalence"]["passed"]
    onnx.checker.check_model(res.model, full_check=True)
    page = res.report.to_html()
    assert "35 BatchNormalization node(s) folded" in page and "<td>fold_bn</td>" in page


def test_recovery_trains_the_batchnorms_then_they_fold() -> None:
    """Recovery's torch view runs on the unfolded pruned model (BN scale and shift are trained
    parameters); folding comes after it, on the model that is validated."""
    res = graphprune.prune(_export(_convtranspose_bn()), {"sparsity": 0.3}, latency_runs=0, recover="distill",
                           recover_steps=4, recover_batch=8, samples=16)
    rec = res.report.recovery
    assert not rec.get("skipped"), rec
    assert res.report.graph == {"batchnorms_folded": 2} and _bn_count(res.model) == 1
    assert res.report.validation["equivalence"]["passed"]


def test_fold_bn_option_cli_flag_and_check(tmp_path: Path) -> None:
    args = ["prune", "in.onnx", "out.onnx"]
    assert _options(_parser().parse_args(args))["fold_bn"] is True
    assert _options(_parser().parse_args([*args, "--no-fold-bn"]))["fold_bn"] is False
    with pytest.raises(UsageError, match="fold_bn"):
        graphprune.PruneConfig(fold_bn="false")  # type: ignore[arg-type]
    source, report = tmp_path / "m.onnx", tmp_path / "r.json"
    onnx.save_model(_export(_conv_bn_relu()), source)
    assert main(["prune", str(source), str(tmp_path / "o.onnx"), "--no-fold-bn", "-q", "--latency-runs", "0",
                 "--report", str(report)]) == 0
    assert _bn_count(onnx.load(str(tmp_path / "o.onnx"))) == 4
    assert '"graph": {}' in report.read_text()
