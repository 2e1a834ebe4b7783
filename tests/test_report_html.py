"""The HTML report: one self-contained page whose charts are drawn from the real report's numbers."""

from __future__ import annotations

import re
from pathlib import Path

from graphprune.api import prune
from graphprune.cli import main
from graphprune.demo import demo_model
from graphprune.model import save_model


def test_demo_report_page_draws_its_numbers(tmp_path: Path) -> None:
    result = prune(demo_model(), sparsity=0.3)
    page = result.report.to_html("demo")
    d = result.report.to_dict()
    assert page.startswith("<!DOCTYPE html>") and "<svg" in page
    assert not re.search(r"(src|href)=\"https?://", page), "the page must not load anything from outside"
    # one stacked bar pair per pruned group, labelled removed/units
    for g in d["groups"]["pruned_list"]:
        assert f">{g['removed']}/{g['units']}<" in page
    # OBS ran: one point per corrected layer on the predicted-vs-measured scatter
    measured = [lay for lay in d["compensation"]["layers"] if "measured_rel_error" in lay]
    assert measured and page.count("<circle") == len(measured)
    assert f"{d['params']['before']:,}" in page and f"{d['params']['after']:,}" in page


def test_cli_writes_html_report(tmp_path: Path) -> None:
    src = tmp_path / "m.onnx"
    save_model(demo_model(), src)
    out = tmp_path / "report.html"
    assert main(["prune", str(src), str(tmp_path / "p.onnx"), "--sparsity", "0.3", "-q",
                 "--report-html", str(out)]) == 0
    text = out.read_text()
    assert "graphprune: m.onnx" in text and text.count("<svg") >= 3

