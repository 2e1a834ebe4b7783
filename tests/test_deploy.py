"""The container image's install steps, replayed without a Docker engine.

The Dockerfile builds the graphprune wheel (`pip wheel --no-deps`), installs it into a fresh venv next
to pinned dependencies, and runs `graphprune serve` as its entrypoint. Here the wheel goes into a
throwaway venv whose dependencies come from the project venv (so nothing is downloaded), and the
server must come up from that install alone: /livez and /readyz answer 200.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
def test_wheel_installs_and_serves(tmp_path: Path) -> None:
    # a copy of the build context the Dockerfile uses (.dockerignore), so no build output lands in the repo
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for pkg in ("graphprune", "service"):
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)

    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    wheels = tmp_path / "wheels"
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", str(wheels), str(src)],
                   check=True, cwd=tmp_path, timeout=120)
    (wheel,) = wheels.glob("graphprune-*.whl")

    # a fresh venv that sees the project venv's packages (the dependencies) through a .pth path line;
    # .pth files inside that folder (the editable install of graphprune) are not processed, so the
    # only graphprune it can import is the wheel's
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    vpy = venv / "bin" / "python"
    site = subprocess.run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([*pip, "--python", str(vpy), "install", "--no-deps", str(wheel)],
                   check=True, cwd=tmp_path, timeout=120)

    env = {k: v for k, v in os.environ.items() if not k.startswith("GRAPHPRUNE_") and k != "PYTHONPATH"}
    env |= {"GRAPHPRUNE_DATA_DIR": str(tmp_path / "data"), "GRAPHPRUNE_MAX_CONCURRENT_JOBS": "1"}
    where = subprocess.run([str(vpy), "-c", "import graphprune, service; print(graphprune.__file__, service.__file__)"],
                           check=True, capture_output=True, text=True, cwd=tmp_path, env=env).stdout.split()
    assert all(Path(f).is_relative_to(venv) for f in where), where  # the wheel's code, not the checkout's

    exe = venv / "bin" / "graphprune"  # the console script the image's ENTRYPOINT runs
    version = subprocess.run([str(exe), "--version"], check=True, capture_output=True, text=True,
                             cwd=tmp_path, env=env, timeout=60)
    assert version.stdout.startswith("graphprune ")

    port = _free_port()
    log = (tmp_path / "serve.log").open("w+")
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port)],
                            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        status: dict[str, int] = {}
        deadline = time.monotonic() + 45
        while time.monotonic() < deadline and status != {"/livez": 200, "/readyz": 200}:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{Path(log.name).read_text()}"
            for path in ("/livez", "/readyz"):
                try:
                    status[path] = httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code
                except httpx.TransportError:
                    status[path] = 0
            time.sleep(0.2)
        assert status == {"/livez": 200, "/readyz": 200}, Path(log.name).read_text()
        assert (tmp_path / "data" / "jobs.sqlite3").exists()  # GRAPHPRUNE_DATA_DIR was honoured
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
