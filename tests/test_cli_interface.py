"""One interface across `prune`, `inspect` and `submit` (issue 14, item 5): the same defaults as the
server, one exit code per cause, short usage errors, no overwritten input, no silently created folder,
a distinct code for an unreachable server, and progress that does not garble a log."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from graphprune import cli
from graphprune.cli import _parser, main
from graphprune.client import Client
from graphprune.config import PruneConfig
from graphprune.demo import demo_model
from graphprune.errors import ServerUnreachableError, UsageError
from graphprune.model import save_model

FAST = ["--latency-runs", "0", "--samples", "8"]


@pytest.fixture()
def demo(tmp_path: Path) -> Path:
    path = tmp_path / "demo.onnx"
    save_model(demo_model(), path)
    return path


@pytest.fixture()
def no_prune(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pruning must not start: the refusals under test come before it."""

    def refuse(*_: Any, **__: Any) -> Any:
        raise AssertionError("pruning started before the paths were checked")

    monkeypatch.setattr(cli, "prune", refuse)


@pytest.fixture()
def dead_url() -> str:
    """A 127.0.0.1 URL nobody listens on: a port the kernel just handed out, closed again."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_sparsity_defaults_to_the_prune_config_default(demo: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    default = PruneConfig().sparsity
    for command in ("prune", "submit"):
        assert _parser().parse_args([command, "in.onnx", "out.onnx"]).sparsity == default
    assert _parser().parse_args(["demo"]).sparsity == default
    rep = tmp_path / "r.json"
    assert main(["prune", str(demo), str(tmp_path / "o.onnx"), "--report", str(rep), *FAST]) == 0
    assert json.loads(rep.read_text())["config"]["sparsity"] == default
    assert f"target  channels, sparsity {default:g}" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["prune", "inspect", "submit"])
def test_a_missing_input_file_is_a_usage_error_for_every_command(tmp_path: Path, dead_url: str, command: str,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    out = ["out.onnx"] if command != "inspect" else []
    server = ["--server", dead_url] if command == "submit" else []  # 2, not 6: refused before connecting
    for missing, says in ((tmp_path / "nope.onnx", "input model not found"), (tmp_path, "(it is a folder)")):
        assert main([command, str(missing), *[str(tmp_path / o) for o in out], *server]) == 2
        err = capsys.readouterr().err
        assert f"graphprune: error: input model not found: {missing}" in err and says in err


def test_unreadable_input_and_unwritable_folder_are_usage_errors(demo: Path, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """What access(2) says after chmod 0 (simulated: these tests may run as root, who may read anything)."""
    read_only = tmp_path / "ro"
    read_only.mkdir()
    denied: dict[int, Path] = {os.R_OK: demo}
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != denied.get(mode))
    assert main(["inspect", str(demo)]) == 2
    assert main(["prune", str(demo), str(tmp_path / "o.onnx")]) == 2
    assert capsys.readouterr().err.count(f"cannot read the input model {demo}: permission denied") == 2
    denied = {os.W_OK: read_only}
    assert main(["prune", str(demo), str(read_only / "o.onnx")]) == 2
    assert f"folder {read_only} is not writable" in capsys.readouterr().err


def test_argparse_errors_are_two_lines(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["prune", str(demo), str(tmp_path / "o.onnx"), "--criterion", "foo"])
    assert exit_.value.code == 2
    first, second = capsys.readouterr().err.splitlines()
    assert first.startswith("graphprune prune: error: argument --criterion: invalid choice: 'foo' (choose from")
    assert second == "try 'graphprune prune --help'"
    for argv, prog in ((["submit", "m.onnx", "o.onnx", "--sparsity", "lots"], "graphprune submit"),
                       (["inspect"], "graphprune inspect"), ([], "graphprune")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 2 and err[0].startswith(f"{prog}: error: ") and err[1] == f"try '{prog} --help'"


def _aliases(demo: Path, tmp_path: Path) -> list[Path]:
    """Names of the input file: itself, another spelling, a symlink, a hard link."""
    symlink, hardlink = tmp_path / "link.onnx", tmp_path / "hard.onnx"
    symlink.symlink_to(demo)
    os.link(demo, hardlink)
    (tmp_path / "sub").mkdir()
    return [demo, tmp_path / "sub" / ".." / demo.name, symlink, hardlink]


@pytest.mark.usefixtures("no_prune")
@pytest.mark.parametrize("command", ["prune", "submit"])
def test_the_input_is_never_overwritten(demo: Path, tmp_path: Path, dead_url: str, command: str,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    before = demo.read_bytes()
    server = ["--server", dead_url] if command == "submit" else []
    other = str(tmp_path / "o.onnx")
    for alias in _aliases(demo, tmp_path):
        for argv, role in (([str(alias)], "output"), ([other, "--report", str(alias)], "--report"),
                           ([other, "--report-html", str(alias)], "--report-html")):
            assert main([command, str(demo), *argv, *server]) == 2, (alias, role)
            err = capsys.readouterr().err
            assert f"the {role} {alias} is the input {demo}" in err and f"give the {role} another name" in err
    assert f"e.g. {tmp_path / 'demo.pruned.onnx'}" in _refusal(["prune", str(demo), str(demo)], capsys)
    assert demo.read_bytes() == before and not (tmp_path / "o.onnx").exists()


def _refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


@pytest.mark.usefixtures("no_prune")
def test_two_outputs_on_one_file_are_refused(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o.onnx"
    err = _refusal(["prune", str(demo), str(out), "--report", str(out)], capsys)
    assert f"the --report {out} is the output {out}" in err


@pytest.mark.usefixtures("no_prune")
@pytest.mark.parametrize("command", ["prune", "submit"])
def test_a_missing_output_folder_is_refused_before_pruning(demo: Path, tmp_path: Path, dead_url: str,
                                                           command: str, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing"
    server = ["--server", dead_url] if command == "submit" else []
    ok = str(tmp_path / "o.onnx")
    for argv, role in (([str(missing / "o.onnx")], "output"), ([ok, "--report", str(missing / "r.json")], "--report"),
                       ([ok, "--report-html", str(missing / "r.html")], "--report-html")):
        err = _refusal([command, str(demo), *argv, *server], capsys)
        assert f"folder {missing} of the {role} {missing}" in err and "does not exist; create it first" in err
    assert not missing.exists() and not Path(ok).exists()
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert "is not a folder" in _refusal([command, str(demo), str(blocker / "o.onnx"), *server], capsys)
    assert f"the output {tmp_path} is a folder" in _refusal([command, str(demo), str(tmp_path), *server], capsys)


def test_demo_still_creates_its_own_folder(tmp_path: Path) -> None:
    out = tmp_path / "new" / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    assert (out / "demo.pruned.onnx").is_file()


def test_an_unreachable_server_is_exit_code_6(demo: Path, tmp_path: Path, dead_url: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["submit", str(demo), str(tmp_path / "o.onnx"), "--server", dead_url, "-q"]) == 6
    assert time.monotonic() - started < 10
    assert f"cannot reach the graphprune server at {dead_url}" in capsys.readouterr().err
    assert not (tmp_path / "o.onnx").exists()
    with Client(dead_url) as client, pytest.raises(ServerUnreachableError) as unreachable:
        client.get("some-job")
    assert unreachable.value.exit_code == 6
    with Client(dead_url.removeprefix("http://")) as client, pytest.raises(UsageError):
        client.get("some-job")  # no scheme: the caller's mistake, not the network's


def test_progress_in_a_log_is_plain_lines(demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert not sys.stderr.isatty()
    assert main(["prune", str(demo), str(tmp_path / "o.onnx"), *FAST]) == 0
    lines = capsys.readouterr().err.splitlines(keepends=True)
    assert lines and not any("\r" in line for line in lines)
    assert all(re.fullmatch(r"graphprune: \w+ \d+%\n", line) for line in lines), lines
    assert lines[-1] == "graphprune: done 100%\n"
    stages = [line.split()[1] for line in lines]
    for stage in set(stages):  # a stage change, then at most one line per 10%
        assert stages.count(stage) <= 11
    assert main(["prune", str(demo), str(tmp_path / "o.onnx"), "-q", *FAST]) == 0
    assert capsys.readouterr().err == ""


def test_progress_on_a_terminal_is_a_bar(demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["prune", str(demo), str(tmp_path / "o.onnx"), *FAST]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "graphprune: " not in err


def test_as_a_process(demo: Path, tmp_path: Path) -> None:
    """What a CI job sees: stderr a pipe, the exit code of the process."""

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "graphprune", *args], capture_output=True, text=True,
                              timeout=300)

    pruned = run("prune", str(demo), str(tmp_path / "o.onnx"), *FAST)
    assert pruned.returncode == 0, pruned.stderr
    assert "\r" not in pruned.stderr and "graphprune: done 100%" in pruned.stderr
    refused = run("prune", str(demo), str(demo))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
