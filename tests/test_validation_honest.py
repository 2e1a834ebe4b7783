"""What the report says about its own numbers: where each input shape came from, user shapes checked
against the model before any analysis, fidelity metrics flagged where they cannot mean anything, enough
validation samples, and latency as interleaved medians with their spread."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from onnx import ModelProto, TensorProto, helper, numpy_helper

import graphprune
from graphprune import api, cli, runtime, validate
from graphprune.demo import demo_model
from graphprune.errors import UsageError
from graphprune.model import save_model

FAST: dict[str, Any] = {"sparsity": 0.3, "latency_runs": 0, "compensate": "none"}


def _cnn(dims: list[int | str], extra_outputs: bool = False) -> ModelProto:
    """Conv -> Relu -> Conv -> GlobalAveragePool -> Flatten -> Gemm (class scores); with `extra_outputs`
    also outputs no fidelity number can judge: near zero, near constant, one value per sample."""
    rng = np.random.default_rng(0)

    def w(name: str, *shape: int) -> TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [w("c1.w", 8, 3, 3, 3), w("c1.b", 8), w("c2.w", 8, 8, 3, 3), w("c2.b", 8), w("fc.w", 5, 8), w("fc.b", 5),
             numpy_helper.from_array(np.array(1e-9, np.float32), "tiny"),
             numpy_helper.from_array(np.array(1e-7, np.float32), "small"),
             numpy_helper.from_array(np.array(5.0, np.float32), "five")]
    nodes = [helper.make_node("Conv", ["x", "c1.w", "c1.b"], ["c1"], pads=[1] * 4),
             helper.make_node("Relu", ["c1"], ["a1"]),
             helper.make_node("Conv", ["a1", "c2.w", "c2.b"], ["c2"], pads=[1] * 4),
             helper.make_node("Relu", ["c2"], ["a2"]),
             helper.make_node("GlobalAveragePool", ["a2"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], transB=1)]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [dims[0], 5])]
    if extra_outputs:
        nodes += [helper.make_node("Mul", ["logits", "tiny"], ["vanishing"]),
                  helper.make_node("Mul", ["logits", "small"], ["scaled"]),
                  helper.make_node("Add", ["scaled", "five"], ["flat_five"]),
                  helper.make_node("ReduceMean", ["logits"], ["score"], axes=[1], keepdims=1)]
        outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                    for n in ("vanishing", "flat_five", "score")]
    graph = helper.make_graph(nodes, "cnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


# --- input shapes: where they came from, and checked up front ---


def test_guessed_dims_are_reported_with_a_warning_naming_the_fix() -> None:
    report = graphprune.prune(_cnn(["N", 3, "H", "W"]), **FAST).report
    assert report.model["inputs"] == [{"name": "x", "shape": [2, 3, 32, 32], "source": "guessed"}]
    (warning,) = [w for w in report.warnings if "input 'x'" in w]
    assert "0 (N) = 2, 2 (H) = 32, 3 (W) = 32" in warning and "--input-shape x=N,3,H,W" in warning
    assert "input_shapes" in warning
    assert "(guessed)" in report.to_html()
    assert "warning: input 'x' has dynamic dims" in report.summary()


def test_given_and_declared_shapes_say_so_and_do_not_warn() -> None:
    given = graphprune.prune(_cnn(["N", 3, "H", "W"]), **FAST, input_shapes={"x": [1, 3, 48, 64]}).report
    assert given.model["inputs"] == [{"name": "x", "shape": [1, 3, 48, 64], "source": "given"}]
    declared = graphprune.prune(_cnn([2, 3, 16, 16]), **FAST).report
    assert declared.model["inputs"][0]["source"] == "declared"
    assert not [w for w in given.warnings + declared.warnings if "input 'x'" in w]


def test_analyze_reports_sources_and_warnings_too() -> None:
    summary = graphprune.analyze(_cnn(["N", 3, "H", "W"])).summary()
    assert summary["inputs"][0]["source"] == "guessed" and "--input-shape x=" in summary["warnings"][0]


@pytest.mark.parametrize(("shapes", "words"), [
    ({"bogus": [1, 2]}, ["'bogus'", "its inputs are: input [batch, 3, 16, 16]"]),
    ({"input": [1, 3, 16]}, ["rank 3", "rank 4", "[batch, 3, 16, 16]"]),
    ({"input": [1, 4, 16, 16]}, ["contradicts", "dim 1 is 3"]),
])
def test_bad_input_shapes_are_usage_errors_before_any_analysis(shapes: dict[str, list[int]], words: list[str],
                                                                 tmp_path: Path) -> None:
    for call in (graphprune.analyze, graphprune.prune):
        with pytest.raises(UsageError) as err:
            call(demo_model(), input_shapes=shapes)
        assert all(w in str(err.value) for w in words), str(err.value)
    path = tmp_path / "demo.onnx"
    save_model(demo_model(), path)
    arg = ",".join(map(str, next(iter(shapes.values()))))
    flag = ["--input-shape", f"{next(iter(shapes))}={arg}"]
    assert cli.main(["inspect", str(path), *flag]) == 2
    assert cli.main(["prune", str(path), str(tmp_path / "out.onnx"), "-q", *flag]) == 2
    assert not (tmp_path / "out.onnx").exists()


# --- fidelity metrics that cannot mean anything ---


def test_degenerate_outputs_are_flagged_and_cosine_is_not_claimed() -> None:
    report = graphprune.prune(_cnn(["N", 3, 16, 16], extra_outputs=True), **FAST).report
    rows = {o["output"]: o for o in report.validation["outputs"]}
    assert rows["vanishing"]["degenerate"] == "near_zero"
    assert rows["flat_five"]["degenerate"] == "near_constant"
    assert "degenerate" not in rows["logits"] and rows["logits"]["cosine"] is not None
    assert rows["score"]["cosine"] is None and rows["score"]["values_per_sample"] == 1
    text = "\n".join(report.warnings)
    assert "output 'vanishing' of the original model is near zero" in text and "--calibration" in text
    assert "output 'flat_five' of the original model is nearly constant" in text
    summary = report.summary()
    assert "score: cosine n/a (one value per sample)" in summary
    assert "vanishing: cosine" in summary and "[near zero: not evidence of fidelity]" in summary


def test_validation_runs_enough_samples_for_top1() -> None:
    v = graphprune.prune(demo_model(), **FAST).report.validation
    assert v["samples"] == api.VALIDATION_SAMPLES >= validate.TOP1_MIN_SAMPLES
    assert v["inputs"] == "synthetic:blobs"
    assert 0.0 <= v["outputs"][0]["top1_agreement"] <= 1.0
    assert v["equivalence"]["passed"]


def test_top1_on_too_few_samples_is_not_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(api, "VALIDATION_VALUES", 8 * 3 * 16 * 16)  # a budget of 8 demo inputs
    report = graphprune.prune(demo_model(), **FAST).report
    assert report.validation["samples"] == 8
    assert report.validation["outputs"][0]["top1_agreement"] is None
    assert any("top-1 agreement of output 'logits' is not reported" in w for w in report.warnings)
    assert "top-1" not in report.summary().split("output  logits")[1].splitlines()[0]


def test_a_fixed_batch_model_is_validated_in_its_own_batches() -> None:
    v = graphprune.prune(_cnn([2, 3, 16, 16]), **FAST).report.validation
    assert v["samples"] == api.VALIDATION_SAMPLES and v["outputs"][0]["shape"] == [2, 5]


def test_calibration_inputs_are_what_validation_runs_on(tmp_path: Path) -> None:
    npz = tmp_path / "calib.npz"
    np.savez(npz, input=np.random.default_rng(1).uniform(0, 1, (40, 3, 16, 16)).astype(np.float32))
    v = graphprune.prune(demo_model(), **FAST, calibration=str(npz)).report.validation
    assert v["inputs"] == "calibration" and v["samples"] == 40


# --- latency ---


def test_latency_is_interleaved_medians_with_spread() -> None:
    report = graphprune.prune(demo_model(), sparsity=0.3, compensate="none", latency_runs=7).report
    lat = report.validation["latency_ms"]
    assert lat["runs"] == 7 and lat["interleaved"] is True and lat["threads"] >= 1
    assert lat["before"] > 0 and lat["after"] > 0 and set(lat["spread_ms"]) == {"before", "after"}
    assert isinstance(lat["noisy"], bool)
    line = next(x for x in report.summary().splitlines() if x.startswith("latency"))
    assert "median of 7 interleaved runs" in line and ("noisy" in line) == lat["noisy"]
    assert "interleaved runs" in report.to_html()


def test_one_run_gives_no_ratio() -> None:
    report = graphprune.prune(demo_model(), sparsity=0.3, compensate="none", latency_runs=1).report
    assert report.validation["latency_ms"]["noisy"] is True
    line = next(x for x in report.summary().splitlines() if x.startswith("latency"))
    assert "no ratio" in line and "x;" not in line


def test_large_models_are_timed_in_separate_phases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "INTERLEAVE_MAX_BYTES", 0)
    report = graphprune.prune(demo_model(), sparsity=0.3, compensate="none", latency_runs=3).report
    lat = report.validation["latency_ms"]
    assert lat["interleaved"] is False and lat["runs"] == 3 and lat["before"] > 0 and lat["after"] > 0


def test_noisy_means_the_interquartile_ranges_overlap() -> None:
    clear = validate.latency([10.0, 10.2, 10.1, 9.9, 10.0], [5.0, 5.1, 4.9, 5.0, 5.2], 2, True)
    assert clear["noisy"] is False and clear["before"] == 10.0 and clear["after"] == 5.0
    assert clear["spread_ms"]["before"] == pytest.approx(0.1)
    overlapping = validate.latency([10.0, 6.0, 9.0, 7.0, 8.0], [5.0, 9.0, 6.0, 8.0, 7.0], 2, True)
    assert overlapping["noisy"] is True
    assert validate.latency([10.0, 10.0], [5.0, 5.0], 1, True)["noisy"] is True  # too few runs to judge


@pytest.mark.parametrize(("runs", "held"), [(0, 1), (3, 2)])
def test_two_sessions_are_held_only_while_both_are_timed(monkeypatch: pytest.MonkeyPatch, runs: int,
                                                         held: int) -> None:
    """Interleaved timing keeps the original's session while the pruned one runs; without timing,
    validation still holds one model's weights at a time."""
    live: set[int] = set()
    most = 0
    make = runtime.session

    def counted(*args: Any, **kwargs: Any) -> ort.InferenceSession:
        nonlocal most
        gc.collect()
        sess = make(*args, **kwargs)
        live.add(id(sess))
        weakref.finalize(sess, live.discard, id(sess))
        most = max(most, len(live))
        return sess

    monkeypatch.setattr(runtime, "session", counted)
    graphprune.prune(demo_model(), sparsity=0.3, compensate="none", latency_runs=runs)
    assert most == held
