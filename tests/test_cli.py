"""The CLI contract: subcommands, report keys and documented exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from graphprune.api import PruneResult
from graphprune.cli import main
from graphprune.demo import demo_model
from graphprune.model import save_model


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    path = tmp_path / "demo.onnx"
    save_model(demo_model(), path)
    return path


def test_prune_writes_model_and_report(demo: Path, tmp_path: Path) -> None:
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    rc = main(["prune", str(demo), str(out), "--sparsity", "0.4", "--report", str(rep), "-q",
               "--latency-runs", "1"])
    assert rc == 0
    report = json.loads(rep.read_text())
    assert report["params"]["after"] < report["params"]["before"]
    assert report["flops"]["after"] < report["flops"]["before"]
    assert report["groups"]["total"] == 6 and report["groups"]["prunable"] == 5
    assert report["groups"]["pruned"] == 5
    assert report["validation"]["equivalence"]["passed"] is True
    pruned = onnx.load(str(out))
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == 8
    y = ort.InferenceSession(str(out)).run(None, {"input": np.zeros((3, 3, 16, 16), np.float32)})[0]
    assert y.shape == (3, 10)


def test_a_model_that_cannot_be_written_still_leaves_its_report(demo: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    def full(*_: object) -> None:  # what a full disk does after the paths were checked
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(PruneResult, "save", full)
    out, rep = tmp_path / "out.onnx", tmp_path / "r.json"
    rc = main(["prune", str(demo), str(out), "--sparsity", "0.4", "--report", str(rep), "-q", "--latency-runs", "0"])
    assert rc == 1
    assert f"cannot write {out}" in capsys.readouterr().err
    assert json.loads(rep.read_text())["groups"]["pruned"] == 5


def test_obs_memory_takes_sizes_and_is_reported(demo: Path, tmp_path: Path) -> None:
    rep = tmp_path / "r.json"
    for size, budget in (("1.5K", 1536), ("2M", 2 << 20), ("4096", 4096)):
        assert main(["prune", str(demo), str(tmp_path / "o.onnx"), "--sparsity", "0.3", "--obs-memory", size,
                     "--report", str(rep), "-q", "--latency-runs", "0", "--samples", "8"]) == 0
        report = json.loads(rep.read_text())
        assert report["config"]["obs_memory"] == budget
        assert report["compensation"]["statistics"]["budget_bytes"] == budget
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(demo), str(tmp_path / "o.onnx"), "--sparsity", "0.3", "--obs-memory", "lots"])
    assert exit_.value.code == 2


def test_inspect_json(demo: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(demo), "--json", "--members"]) == 0
    summary = json.loads(capsys.readouterr().out)
    groups = summary["groups"]["list"]
    residual = next(g for g in groups if "stem" in g["producers"])
    # the residual Add couples stem and block_b; the SE gate's Mul couples se_expand with them too
    assert residual["producers"] == ["block_b", "se_expand", "stem"]
    roles = {(m["tensor"], m["role"]) for m in residual["members"]}
    assert ("dw.w", "out") in roles and ("fc1.w", "in") in roles
    blocked = next(g for g in groups if g["producers"] == ["logits"])
    assert blocked["prunable"] is False and blocked["reasons"][0]["kind"] == "graph_output"


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["--sparsity", "1.5"], 2),
        (["--sparsity", "0.3", "--round-to", "0"], 2),
        (["--sparsity", "0.99", "--target", "params"], 4),
    ],
)
def test_exit_codes(demo: Path, tmp_path: Path, args: list[str], code: int) -> None:
    out = tmp_path / "o.onnx"
    assert main(["prune", str(demo), str(out), "-q", *args]) == code
    assert not out.exists()


def test_invalid_model_exit_code(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00\x01 not a model")
    assert main(["prune", str(bad), str(tmp_path / "o.onnx"), "--sparsity", "0.3", "-q"]) == 3
    assert "error" in capsys.readouterr().err


def test_missing_input_is_usage_error(tmp_path: Path) -> None:
    assert main(["prune", str(tmp_path / "nope.onnx"), str(tmp_path / "o.onnx"), "--sparsity", "0.3"]) == 2


def test_demo_runs(tmp_path: Path) -> None:
    assert main(["demo", "--out", str(tmp_path / "d")]) == 0
    assert (tmp_path / "d" / "demo.pruned.onnx").is_file()
    assert json.loads((tmp_path / "d" / "report.json").read_text())["groups"]["pruned"] > 0


def _broken(kind: str) -> onnx.ModelProto:
    """The demo model made unloadable one way: what inspect used to analyse and prune refused late."""
    model = demo_model()
    if kind == "opset":
        next(o for o in model.opset_import if o.domain in ("", "ai.onnx")).version = 1000
    elif kind == "short":
        big = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        big.raw_data = big.raw_data[: len(big.raw_data) // 2]
    else:
        node = model.graph.node[len(model.graph.node) // 2]
        node.op_type, node.domain = "Mystery", "com.example"
        model.opset_import.add(domain="com.example", version=1)
    return model


@pytest.mark.parametrize(("kind", "says"), [("opset", "opset 1000 of the ONNX domain"),
                                            ("short", "the file is corrupt or was cut"),
                                            ("custom", "'Mystery' of domain 'com.example'")])
def test_inspect_refuses_what_prune_refuses(tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str,
                                            says: str) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(_broken(kind).SerializeToString())
    for argv in (["inspect", str(path)], ["prune", str(path), str(tmp_path / "out.onnx"), "--sparsity", "0.3"]):
        assert main(argv) == 3, argv
        assert says in capsys.readouterr().err
    assert not (tmp_path / "out.onnx").exists()
