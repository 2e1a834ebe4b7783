"""The OBS importance criterion on small torch-exported nets: its score is the OBS error compensation
predicts, redundant channels score ~0, and one statistics pass serves both scoring and compensation."""

from __future__ import annotations

import io
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from graphprune import api, cli, runtime
from graphprune import compensate as comp_mod
from graphprune.api import analyze
from graphprune.compensate import HeldOutErrors, LayerStatistics, MomentSums, compensate, measure_layers
from graphprune.config import PruneConfig
from graphprune.groups import Group
from graphprune.importance import ScoringContext, criterion
from graphprune.inputs import signature
from graphprune.synthetic import batches
from graphprune.validate import relative_error

torch = pytest.importorskip("torch")
nn = torch.nn


class Branches(nn.Module):
    """c1's channels feed two consumers (a 3x3 conv and a 1x1 conv or a ConvTranspose, summed), so a unit's
    score is a sum."""

    def __init__(self, third: str = "conv") -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(6, 8, 3, padding=1)
        self.c3 = {"conv": lambda: nn.Conv2d(6, 8, 1), "transpose": lambda: nn.ConvTranspose2d(6, 8, 3, padding=1),
                   # cropping more than the kernel reaches: no Conv equals it, so OBS cannot view it
                   "cropping_transpose": lambda: nn.ConvTranspose2d(6, 8, 3, stride=2, padding=5, output_padding=1),
                   }[third]()
        self.head = nn.Linear(8, 4)

    def forward(self, x: Any) -> Any:
        a = self.c1(x)  # no nonlinearity: a channel can be an exact combination of others
        y = torch.relu(self.c2(a) + self.c3(a))
        return self.head(y.mean(dim=(2, 3)))


def _export(net: nn.Module) -> onnx.ModelProto:
    buf = io.BytesIO()
    net.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), buf, dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}, "y": {0: "b"}})
    proto = onnx.load_from_string(buf.getvalue())
    proto.ir_version = min(proto.ir_version, 10)
    return proto


def _net(redundant: bool = False, third: str = "conv") -> onnx.ModelProto:
    torch.manual_seed(0)
    net = Branches(third)
    if redundant:  # c1's channel 3 = channel 0 + 2 * channel 1, bias included
        with torch.no_grad():
            net.c1.weight[3] = net.c1.weight[0] + 2 * net.c1.weight[1]
            net.c1.bias[3] = net.c1.bias[0] + 2 * net.c1.bias[1]
    return _export(net)


def _scored(model: onnx.ModelProto, **cfg: Any) -> tuple[api.Analysis, PruneConfig, LayerStatistics,
                                                            dict[int, np.ndarray], dict[str, Any]]:
    config = PruneConfig(criterion="obs", samples=32, **cfg)
    an = analyze(model, config)
    stats = LayerStatistics(an.graph, an.specs, config)
    crit = criterion("obs")
    crit.prepare(ScoringContext(an.graph, an.grouping, an.specs, config, stats))
    rng = np.random.default_rng(0)
    scores = {g.id: crit.score_group(an.graph, g, "mean", "none", rng) for g in an.grouping.prunable}
    return an, config, stats, scores, crit.describe()


def _c1_group(an: api.Analysis) -> Group:
    return next(g for g in an.grouping.prunable if any("c1" in p for p in g.producers))


def _removed_elements(an: api.Analysis, group: Group, units: list[int]) -> np.ndarray:
    removed_root = np.zeros(an.grouping.roots.size, dtype=bool)
    removed_root[group.roots[units]] = True
    return removed_root[an.grouping.roots]


KRON = pytest.mark.parametrize("kron", [1024, 0], ids=["exact", "kron"])  # kron_columns: 0 factors c2's H


@KRON
@pytest.mark.parametrize("third", ["conv", "transpose"])
def test_score_is_the_obs_error_compensation_predicts(kron: int, third: str) -> None:
    an, cfg, stats, scores, info = _scored(_net(third=third), kron_columns=kron)
    group = _c1_group(an)
    assert info["consumers_by_obs"] >= 3 and "magnitude_fallback" not in info
    # c3: a 1x1 Conv or a 3x3 ConvTranspose seen as the Conv it equals: neither has its H factored
    hessians = ["kron" if kron == 0 else "exact", "exact"]
    for unit in range(group.size):
        comp = compensate(an.graph, _removed_elements(an, group, [unit]), an.specs, cfg, statistics=stats)
        assert [layer["op"] for layer in comp.layers] == ["Conv", "ConvTranspose" if third == "transpose" else "Conv"]
        assert [layer["hessian"] for layer in comp.layers] == hessians
        predicted = sum(layer["predicted_rel_error"] for layer in comp.layers)
        assert scores[group.id][unit] == pytest.approx(predicted, rel=1e-6)


def test_scores_are_normalised_within_the_group_for_global_ranking() -> None:
    an, cfg, stats, raw, _ = _scored(_net())
    crit = criterion("obs")
    crit.prepare(ScoringContext(an.graph, an.grouping, an.specs, cfg, stats))
    rng = np.random.default_rng(0)
    for g in an.grouping.prunable:
        mean, top = (crit.score_group(an.graph, g, "mean", n, rng) for n in ("mean", "max"))
        np.testing.assert_allclose(mean, raw[g.id] / raw[g.id].mean())
        np.testing.assert_allclose(top, raw[g.id] / raw[g.id].max())
        assert np.argsort(mean, kind="stable").tolist() == np.argsort(raw[g.id], kind="stable").tolist()


@KRON
def test_a_channel_the_others_reproduce_scores_zero(kron: int) -> None:
    # damping far below the default 1e-2, yet above the float32 rounding of each batch's Gram matrix
    an, _, _, scores, _ = _scored(_net(redundant=True), damping=1e-6, kron_columns=kron)
    s = scores[_c1_group(an).id]
    # 3 = 0 + 2·1, so each of 0, 1, 3 is exactly what the other two reproduce; 2, 4, 5 are not
    assert s[[0, 1, 3]].max() < 1e-3 * s[[2, 4, 5]].min()


def test_compensation_reuses_the_criterion_statistics_unchanged() -> None:
    an, cfg, stats, _, _ = _scored(_net())
    group = _c1_group(an)
    removed = _removed_elements(an, group, [1, 4])
    shared = compensate(an.graph, removed, an.specs, cfg, statistics=stats)
    fresh = compensate(an.graph, removed, an.specs, cfg)
    assert stats.passes == 1
    assert shared.overrides.keys() == fresh.overrides.keys()
    for name, value in shared.overrides.items():
        np.testing.assert_array_equal(value, fresh.overrides[name])


@KRON
@pytest.mark.parametrize("third", ["conv", "transpose"])
def test_measured_error_on_the_fitting_statistics_is_the_predicted_one(kron: int, third: str) -> None:
    an, cfg, stats, _, _ = _scored(_net(third=third), damping=0.0, kron_columns=kron)
    removed = _removed_elements(an, _c1_group(an), [0, 2, 5])
    comp = compensate(an.graph, removed, an.specs, cfg, statistics=stats)
    views = [v for v, _ in comp.fits]
    measure_layers(an.graph, comp, dict(zip([v.node for v in views], stats.each(views, lambda v, h: h), strict=True)))
    for layer in comp.layers:
        assert layer["measured_rel_error"] == pytest.approx(layer["predicted_rel_error"], rel=1e-6, abs=1e-12)
        assert layer["measured_rel_error"] < layer["measured_rel_error_uncompensated"]


def test_consumer_obs_cannot_view_falls_back_to_magnitude_and_says_so() -> None:
    an, _, _, scores, info = _scored(_net(third="cropping_transpose"))
    fallback = info["magnitude_fallback"]
    assert [c["op"] for c in fallback["consumers"]] == ["ConvTranspose"]
    assert fallback["groups"] == 1
    assert np.all(scores[_c1_group(an).id] > 0)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    calls: list[int] = []
    real: Callable[..., Any] = comp_mod.layer_moments

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(args[1]))
        return real(*args, **kwargs)

    monkeypatch.setattr(comp_mod, "layer_moments", counted)
    return calls


def test_cli_prune_with_obs_criterion_runs_one_statistics_pass(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    src, out, rep = tmp_path / "m.onnx", tmp_path / "p.onnx", tmp_path / "r.json"
    onnx.save_model(_net(), src)
    calls = _counting(monkeypatch)
    rc = cli.main(["prune", str(src), str(out), "--sparsity", "0.4", "--target", "flops", "--criterion", "obs",
                   "--global", "--samples", "32", "--latency-runs", "0", "--report", str(rep)])
    assert rc == 0 and out.is_file()
    assert len(calls) == 1  # scoring asked for every consumer; compensation found its subset there
    report = json.loads(rep.read_text())
    assert report["importance"]["criterion"] == "obs"
    layers = report["compensation"]["layers"]
    assert layers and all(lay["measured_rel_error"] >= 0 for lay in layers)
    assert "held-out" in capsys.readouterr().out  # the per-layer table in the summary


def test_weight_criteria_still_compute_statistics_only_for_compensation(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _counting(monkeypatch)
    res = api.prune(_net(), sparsity=0.4, criterion="l2", samples=32, latency_runs=0)
    assert len(calls) == 1 and calls[0] == len(res.report.compensation["layers"])
    assert res.report.importance == {"criterion": "l2"}


def test_prune_with_a_factored_h_reports_it_per_layer_and_still_helps() -> None:
    """kron_columns=0: c2 (3x3) holds H Kronecker-factored end to end (scoring, compensation, held-out
    measurement), c3 (1x1, the same either way) stays exact; validation still passes."""
    res = api.prune(_net(), sparsity=0.4, criterion="obs", samples=32, latency_runs=0, kron_columns=0)
    layers = {lay["node"].split("/")[1]: lay for lay in res.report.compensation["layers"]}
    assert layers["c2"]["hessian"] == "kron" and layers["c3"]["hessian"] == "exact"
    for lay in layers.values():
        assert lay["measured_rel_error"] < lay["measured_rel_error_uncompensated"]
    check = res.report.compensation["self_check"]
    assert check["relative_error_compensated"] < check["relative_error_uncompensated"]



class Decoder(nn.Module):
    """Upsampling by a stride-2 ConvTranspose2d, as in U-Net/FPN decoders and GAN generators."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 12, 3, padding=1)
        self.up = nn.ConvTranspose2d(12, 6, 3, stride=2, padding=1, output_padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: Any) -> Any:
        return self.head(torch.relu(self.up(torch.relu(self.c1(x)))).mean(dim=(2, 3)))


@pytest.mark.parametrize("kron", [1024, 0], ids=["default", "factor-every-conv"])
def test_an_upsampling_conv_transpose_is_compensated_like_a_conv(kron: int) -> None:
    torch.manual_seed(0)
    dense = _export(Decoder())
    # the ConvTranspose keeps its outputs, so its own output can be compared with the dense one
    res = api.prune(dense, sparsity=0.4, latency_runs=0, samples=32, kron_columns=kron, exclude=["up.bias"])
    comp = res.report.compensation
    (up,) = comp["layers"]
    assert (up["op"], up["removed_inputs"], up["hessian"]) == ("ConvTranspose", 4, "exact")
    assert up["measured_rel_error"] < 0.8 * up["measured_rel_error_uncompensated"] and comp["applied"]
    plain = api.prune(dense, sparsity=0.4, latency_runs=0, compensate="none", exclude=["up.bias"]).model
    out = next(n.output[0] for n in dense.graph.node if n.op_type == "ConvTranspose")
    feeds = next(iter(batches(signature(dense), 64, None, "blobs", 123)))
    want, got, cut = ({out: runtime.run(runtime.probe_session(m, [out]), feeds, [out])[out]}
                      for m in (dense, res.model, plain))
    assert relative_error(want, got) < 0.6 * relative_error(want, cut)


def test_a_small_statistics_budget_takes_more_passes_to_the_same_pruned_model(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 12: past `obs_memory` the moments are computed in chunks, one pass each, and none are held;
    the pruned model must not depend on it (rows sampled per consumer, the same activations exposed)."""
    calls = _counting(monkeypatch)
    whole = api.prune(_net(), sparsity=0.4, samples=32, latency_runs=0)
    assert len(calls) == 1 and whole.report.compensation["statistics"]["passes"] == 1
    viewed = calls[0]
    calls.clear()
    tight = api.prune(_net(), sparsity=0.4, samples=32, latency_runs=0, obs_memory=1)
    compensated = len(tight.report.compensation["layers"])
    assert calls == [1] * (viewed + compensated)  # one consumer a pass, scoring then compensation again
    assert tight.report.compensation["statistics"] == {"source": "synthetic:mixed", "passes": viewed + compensated,
                                                       "budget_bytes": 1}
    assert tight.report.compensation["layers"] == whole.report.compensation["layers"]
    for a, b in zip(whole.model.graph.initializer, tight.model.graph.initializer, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))


@KRON
def test_held_out_errors_summed_from_rows_are_the_moments_measurement(kron: int) -> None:
    """The self-check measures exact layers from their sampled input rows instead of d×d held-out moments:
    the same numbers as `measure_layers` on the moments of those rows."""
    an, cfg, stats, _, _ = _scored(_net(), kron_columns=kron)
    comp = compensate(an.graph, _removed_elements(an, _c1_group(an), [1, 2, 5]), an.specs, cfg, statistics=stats)
    streamed = HeldOutErrors(an.graph, comp, seed=7)
    sums = MomentSums([v for v, _ in comp.fits], seed=7)
    sess = runtime.probe_session(an.model, streamed.names)
    for batch in batches(an.specs, 32, 16, "blobs", 5):
        acts = runtime.run(sess, batch, streamed.names)
        streamed.add(acts)
        sums.add(acts)
    streamed.finish()
    from_rows = [dict(layer) for layer in comp.layers]
    measure_layers(an.graph, comp, sums.means())
    assert len(from_rows) == 2 and all(lay["measured_rel_error"] > 0 for lay in from_rows)
    for rows, moments in zip(from_rows, comp.layers, strict=True):
        for key in ("measured_rel_error", "measured_rel_error_uncompensated"):
            assert rows[key] == pytest.approx(moments[key], rel=1e-4)
