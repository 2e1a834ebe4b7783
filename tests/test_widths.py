"""--round-to auto: the multiple each group's layers run fastest at, measured on this machine."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rules.helpers import Net

import graphprune
from graphprune import widths
from graphprune.cli import main as cli_main
from graphprune.errors import UsageError
from graphprune.machine import machine_key

TABLE = {"conv": {"multiple": 8}, "depthwise": {"multiple": 4}, "matmul": {"multiple": 1}}


def _inverted_residual() -> Any:
    """1x1 conv (16) -> depthwise 3x3 -> 1x1 conv (24) -> Gemm head: a conv group, a mixed group."""
    n = Net()
    y = n.conv(n.input("x", [1, 3, 8, 8]), 3, 16, "expand")
    y = n.conv(n.op("Relu", [y]), 16, 16, "dw", k=3, group=16)
    y = n.conv(n.op("Relu", [y]), 16, 24, "project")
    y = n.op("Flatten", [n.op("GlobalAveragePool", [n.op("Relu", [y])])], axis=1)
    n.output(n.op("Gemm", [y, n.w("fc", [24, 10])]))
    return n.model()


@pytest.fixture
def table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This machine's measurement, as if cached before: TABLE."""
    monkeypatch.setenv("GRAPHPRUNE_CACHE_DIR", str(tmp_path))
    (tmp_path / "widths.json").write_text(json.dumps({machine_key(): TABLE}))
    widths._cached.cache_clear()
    yield
    widths._cached.cache_clear()


@pytest.mark.usefixtures("table")
def test_each_group_takes_the_largest_preference_of_its_layers() -> None:
    model = _inverted_residual()
    an = graphprune.analyze(model)
    kinds = widths.group_kinds(an.graph, an.grouping)
    expand = next(g for g in an.grouping.groups if "expand" in " ".join(g.producers))
    project = next(g for g in an.grouping.groups if "project" in " ".join(g.producers))
    assert kinds[expand.id] == {"conv", "depthwise"}  # expand's rows, dw's channels, project's columns
    assert kinds[project.id] == {"conv", "matmul"}  # project's rows, the head's columns
    multiples = widths.group_multiples(an.graph, an.grouping, "auto", measure=lambda: TABLE)
    assert multiples[expand.id] == multiples[project.id] == 8  # 8 is at most half of 16 and of 24
    assert widths.group_multiples(an.graph, an.grouping, 4) == {g.id: 4 for g in an.grouping.groups}

    res = graphprune.prune(model, sparsity=0.5, round_to="auto", latency_runs=0)
    kept = {g["producers"][0]: g["units"] - g["removed"] for g in res.report.groups["pruned_list"]}
    assert kept and all(k % 8 == 0 for k in kept.values()), kept
    assert all(g["multiple"] == 8 for g in res.report.groups["pruned_list"])
    assert res.report.groups["round_to_measured"] == TABLE
    assert res.report.validation["equivalence"]["passed"]


def test_a_multiple_is_at_most_half_its_group() -> None:
    assert [widths._capped(16, n) for n in (64, 32, 31, 16, 7, 3)] == [16, 16, 8, 8, 2, 1]


def test_the_measurement_is_cached_per_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHPRUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(widths, "WINDOW", range(30, 42))  # a smaller window: the test's own time
    monkeypatch.setattr(widths, "RUNS", 5)
    widths._cached.cache_clear()
    table = widths.measured_multiples()
    assert set(table) == set(widths.KINDS)
    for entry in table.values():
        assert entry["multiple"] in (1, *widths.CANDIDATES)
        assert all(np.isfinite(v) and v > 0 for v in entry["cost_ratio"].values())
    assert (tmp_path / "widths.json").exists()
    widths._cached.cache_clear()
    monkeypatch.setattr(widths, "_measure", lambda kind: pytest.fail("measured again"))
    assert widths.measured_multiples() == table  # read back from the file
    widths._cached.cache_clear()


def test_round_to_takes_a_number_or_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UsageError, match="integer >= 1 or 'auto'"):
        graphprune.PruneConfig(round_to=0)
    with pytest.raises(UsageError):
        graphprune.PruneConfig(round_to="eight")  # type: ignore[arg-type]
    assert graphprune.PruneConfig(round_to="auto").round_to == "auto"
    with pytest.raises(SystemExit) as exc:
        cli_main(["prune", str(tmp_path / "m.onnx"), str(tmp_path / "o.onnx"), "--round-to", "eight"])
    assert exc.value.code == 2 and "whole number or 'auto'" in capsys.readouterr().err
