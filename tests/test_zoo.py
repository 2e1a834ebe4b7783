"""The zoo is the ground truth for pruning tests, so every model must be a valid, runnable
ONNX file that reproduces its source framework; otherwise pruning tests would be chasing
exporter or cache bugs."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import zoo


def _load_or_skip(name: str) -> Path:
    try:
        return zoo.path(name)
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=[pytest.mark.slow] if m.slow else [], id=n) for n, m in zoo.MODELS.items()]
)
def test_model_is_valid_and_matches_source(name: str) -> None:
    file = _load_or_skip(name)
    model = onnx.load(file)
    assert model.ir_version <= 10, "onnxruntime 1.31 refuses newer IR versions"
    assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    onnx.checker.check_model(model, full_check=True)

    ref = zoo.reference(name)
    session = ort.InferenceSession(file, providers=["CPUExecutionProvider"])
    assert {i.name for i in session.get_inputs()} == set(ref.inputs)
    outputs = session.run(None, ref.inputs)
    assert [o.shape for o in outputs] == ref.output_shapes
    if ref.outputs is not None:  # None only for shipped models: their source framework is not here
        for got, want in zip(outputs, ref.outputs, strict=True):
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_catalogue_is_consistent() -> None:
    suffix = {"torchscript": "-ts", "dynamo": "-dynamo"}
    for name, model in zoo.MODELS.items():
        assert model.name == name
        assert model.slow == (model.framework in {"transformers", "timm"} or name in zoo.SHIPPED), name
        if model.framework in {"pytorch", "transformers", "timm"} and name not in {"minilm"} | zoo.SHIPPED:
            assert name.endswith(suffix[model.exporter]), name


def test_unknown_model_is_a_key_error() -> None:
    with pytest.raises(KeyError, match="unknown zoo model"):
        zoo.path("no_such_model")


def test_missing_package_raises_zoo_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = zoo._SPECS["ppocr_det"]
    monkeypatch.setitem(zoo._SPECS, "ppocr_det", zoo._Spec(spec.model, spec.build, ("no-such-dist-zz9",)))
    with pytest.raises(zoo.ZooUnavailable, match="no-such-dist-zz9"):
        zoo.path("ppocr_det")


def test_import_is_cheap() -> None:
    """Collection imports zoo; it must not drag in torch or transformers."""
    code = "import sys, zoo; assert not {'torch', 'transformers', 'onnx'} & set(sys.modules), sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(zoo.__file__).parent)


def test_concurrent_builds_share_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Parallel builders (xdist workers) must end with one complete file and no temp leftovers."""
    monkeypatch.setenv("GRAPHPRUNE_ZOO_DIR", str(tmp_path))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(zoo.path("skl_mlp"))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert sorted(p.suffix for p in tmp_path.iterdir() if p.suffix != ".lock") == [".npz", ".onnx"]
    onnx.checker.check_model(onnx.load(results[0]), full_check=True)

    monkeypatch.setattr(zoo, "ZOO_VERSION", zoo.ZOO_VERSION + "-changed")
    assert zoo.path("skl_mlp") != results[0], "a new ZOO_VERSION must rebuild under a new name"
