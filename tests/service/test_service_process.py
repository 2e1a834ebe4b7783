"""`graphprune serve` as a real process: the README's Quick start command, and a server killed with
SIGKILL mid-job whose successor re-runs the job (its orphaned worker must not live on)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from service_testing import DEMO, OCTET, free_port

README = Path(__file__).resolve().parents[2] / "README.md"
GRAPHPRUNE = str(Path(sys.executable).parent / "graphprune")


@contextmanager
def serve(args: list[str], env: dict[str, str], url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen([GRAPHPRUNE, "serve", *args], env={**os.environ, **env},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            assert proc.wait(20) == 0


def test_quick_start_command_serves_on_8000_with_embedded_defaults(tmp_path: Path) -> None:
    block = re.search(r"## Quick start\n\n```bash\n(.*?)```", README.read_text(), re.S)
    assert block is not None
    first, second = block.group(1).strip().splitlines()
    assert second == "bash scripts/test.sh"
    assert first.endswith("&& .venv/bin/graphprune serve")  # the rest installs; this starts it, no options
    try:
        httpx.get("http://127.0.0.1:8000/livez", timeout=1)
        pytest.skip("something already listens on 127.0.0.1:8000")
    except httpx.TransportError:
        pass
    home = {"HOME": str(tmp_path), "XDG_DATA_HOME": "", "GRAPHPRUNE_DATA_DIR": ""}
    with serve([], home, "http://127.0.0.1:8000"):
        assert httpx.get("http://127.0.0.1:8000/readyz").json()["status"] == "ready"
    assert (tmp_path / ".local" / "share" / "graphprune" / "jobs.sqlite3").is_file()


def test_killed_server_reruns_the_interrupted_job(tmp_path: Path) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {"GRAPHPRUNE_DATA_DIR": str(tmp_path / "data")}
    with serve(["--port", str(port)], {**env, "GRAPHPRUNE_WORKER_STAGE_DELAY_S": "60"}, url) as server:
        job = httpx.post(f"{url}/v1/jobs?latency_runs=0", content=DEMO, headers=OCTET).json()
        deadline = time.monotonic() + 30
        while (running := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["stage"] != "analyze":
            assert time.monotonic() < deadline, running
            time.sleep(0.05)
        server.kill()
        server.wait()
    worker = _worker_pid(tmp_path / "data", job["id"])
    deadline = time.monotonic() + 5
    while _alive(worker):  # PR_SET_PDEATHSIG: the worker dies with its server
        assert time.monotonic() < deadline, "the orphaned worker kept running"
        time.sleep(0.05)
    with serve(["--port", str(port)], env, url):
        deadline = time.monotonic() + 30
        while (done := httpx.get(f"{url}/v1/jobs/{job['id']}").json())["status"] not in ("succeeded", "failed"):
            assert time.monotonic() < deadline, done
            time.sleep(0.1)
        assert done["status"] == "succeeded" and done["attempts"] == 2
        assert httpx.get(f"{url}/v1/jobs/{job['id']}/result").status_code == 200


def _worker_pid(data_dir: Path, job_id: str) -> int:
    import sqlite3

    with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
        pid: int = db.execute("SELECT worker_pid FROM jobs WHERE id = ?", (job_id,)).fetchone()[0]
        return pid


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie (dead, not yet reaped by init) counts as gone
    return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"


@pytest.mark.parametrize(("exitcode", "memory"), [(-signal.SIGKILL, True), (-signal.SIGABRT, True),
                                                  (-signal.SIGSEGV, False), (-signal.SIGTERM, False), (1, False)])
def test_only_a_kill_or_abort_suggests_memory(tmp_path: Path, exitcode: int, memory: bool) -> None:
    """The OOM killer's SIGKILL and a failed native allocation's abort() point at memory; a segfault or
    an exit status does not (it used to say "out of memory?" for any dead worker)."""
    from service.artifacts import Artifacts
    from service.executors import LocalExecutor
    from service.jobs import JobStore
    from service.settings import Settings

    settings = Settings(data_dir=tmp_path)
    store = JobStore(settings.db_path, settings.result_ttl_s)
    try:
        error = LocalExecutor(settings, store, Artifacts(tmp_path), lambda job: None)._exit_error(exitcode, False)
    finally:
        store.close()
    assert error.kind == "WorkerCrashed" and ("out of memory?" in error.message) == memory, error.message
