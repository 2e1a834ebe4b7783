"""--target latency: the per-layer table measured here, selection toward it, the closed loop."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from onnx import ModelProto, numpy_helper
from rules.helpers import Net
from zoo_testing import path_or_skip

import graphprune
from graphprune import latency
from graphprune.cli import main as cli_main


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRUNE_CACHE_DIR", str(tmp_path / "cache"))


def _two_resolutions() -> ModelProto:
    """The same block twice: at 32x32 and, after a 4x4 pooling, at 8x8, with its weights halved there.
    By magnitude every unit of the second block matters less; one of the first costs 16 times its MACs."""
    n = Net()
    x = n.input("x", [1, 16, 32, 32])
    small = n.op("MaxPool", [x], kernel_shape=[4, 4], strides=[4, 4])
    outs = []
    for name, inp in (("big", x), ("small", small)):
        y = n.op("Relu", [n.conv(inp, 16, 48, f"{name}1", k=3)])
        outs.append(n.conv(y, 48, 16, f"{name}2"))
    n.output(*outs)
    model = n.model()
    inits = {t.name: t for t in model.graph.initializer}
    for w in ("1.w", "1.b", "2.w", "2.b"):
        half = numpy_helper.to_array(inits[f"big{w}"]) / 2
        inits[f"small{w}"].CopyFrom(numpy_helper.from_array(half, f"small{w}"))
    return model


def _removed(result: graphprune.PruneResult, producer: str) -> int:
    return sum(g["removed"] for g in result.report.groups["pruned_list"] if producer in g["producers"])


def test_global_ranking_toward_latency_ranks_by_importance_and_stops_at_the_measured_time() -> None:
    model = _two_resolutions()
    common = {"sparsity": 0.3, "global_ranking": True, "compensate": "none", "latency_runs": 0, "round_to": 1,
              "normalizer": "none"}
    by_time = graphprune.prune(model, target="latency", **common)
    # by importance, as toward MACs: the weaker 8x8 block first, although a unit there saves 16x less;
    # -30% of the time then takes nearly all of it and some of the 32x32 block
    big, small = _removed(by_time, "big1"), _removed(by_time, "small1")
    assert small > big > 0, (big, small)
    by_flops = graphprune.prune(model, target="flops", **common)
    assert _removed(by_flops, "small1") > _removed(by_flops, "big1")
    t = by_time.report.latency
    assert t["threads"] == 1 and t["table"]["layers"] == 4 and t["table"]["layers_timed"] == 4
    assert t["measured_ms"] < t["dense_ms"] and t["predicted_ms"] > 0
    assert by_time.report.groups["achieved"] == pytest.approx(1 - t["measured_ms"] / t["dense_ms"], abs=0.01)
    assert len(t["selections"]) in range(1, latency_corrections() + 2)
    assert by_time.report.validation["equivalence"]["passed"]
    # the HTML report's section: the target and each selection tried, predicted against measured
    page = by_time.report.to_html("two resolutions")
    assert "<h2>Latency target</h2>" in page and f"Target {t['target_ms']:.4g} ms" in page
    for i, sel in enumerate(t["selections"]):
        assert f">try {i + 1}<" in page and f"measured: {sel['measured_ms']:,.6g}" in page
    assert f">try {len(t['selections']) + 1}<" not in page


def latency_corrections() -> int:
    from graphprune.api import LATENCY_CORRECTIONS

    return LATENCY_CORRECTIONS


def test_layers_are_timed_once_per_signature() -> None:
    model = _two_resolutions()
    first = graphprune.prune(model, sparsity=0.3, target="latency", compensate="none", validate=False)
    table = first.report.latency["table"]
    assert table["timings"] > 0
    again = graphprune.prune(model, sparsity=0.4, target="latency", compensate="none", validate=False)
    table = again.report.latency["table"]
    assert table["timings"] == 0 and table["cached"] > 0  # the same layers at the same sample widths
    # toward latency the widths default to the measured multiples
    assert all("multiple" in g for g in again.report.groups["pruned_list"])
    assert again.report.config["round_to"] is None


def test_past_the_budget_layers_take_the_measured_time_per_mac(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(latency, "BUDGET_S", 0.0)
    an = graphprune.analyze(_two_resolutions())
    table = latency.build_table(an.graph, an.cost, [], {"x": np.zeros((1, 16, 32, 32), np.float32)})
    assert table.info["layers_timed"] == 1  # the largest, always
    big, *rest = sorted(table.layers, key=lambda lay: -lay.macs)
    rate = big.ms(1.0) / big.macs
    assert all(lay.ms(1.0) == pytest.approx(lay.macs * rate) for lay in rest)
    # the rest of the network is what the measured model spends beyond the layers: the dense prediction
    # is the measurement
    assert table.predict() == pytest.approx(max(table.dense_ms, sum(lay.ms(1.0) for lay in table.layers)))


def test_a_real_ppocr_classifier_toward_half_its_latency(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = path_or_skip("ppocr_cls")
    out = tmp_path / "cls.onnx"
    code = cli_main(["prune", path, str(out), "--sparsity", "0.5", "--target", "latency",
                     "--input-shape", "x=1,3,48,192", "--compensate", "none", "--report", str(tmp_path / "r.json")])
    assert code == 0
    text = capsys.readouterr().out
    assert "latency target" in text and "measured" in text
    import json

    rep = json.loads((tmp_path / "r.json").read_text())
    t = rep["latency"]
    assert t["table"]["layers"] == t["table"]["layers_timed"] == 54
    assert t["target_ms"] == pytest.approx(0.5 * t["dense_ms"], abs=1e-3)  # both rounded to 1 us
    # MACs fall much more than latency: about 40% of this net's time is spent outside its convs
    assert rep["flops"]["after"] / rep["flops"]["before"] < 0.5
    assert rep["validation"]["checker"] == "passed"
