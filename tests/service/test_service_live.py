"""Through a real uvicorn on 127.0.0.1: server-sent events, the Python client, `graphprune submit`,
and the README's Service examples exactly as written (only the port differs)."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import onnx
import pytest
from service_testing import DEMO, FAST, OCTET, live_app, live_server

from graphprune.cli import main
from graphprune.client import Client, JobFailedError, ServiceError
from service import upload
from service.settings import Settings
from service.worker import job_error

Make = Callable[..., Settings]
README = Path(__file__).resolve().parents[2] / "README.md"


def test_events_stream_progress_until_the_job_ends(settings: Make) -> None:
    with live_server(settings(worker_stage_delay_s=0.25)) as url, httpx.Client(base_url=url) as http:
        job = http.post("/v1/jobs?latency_runs=0", content=DEMO, headers=OCTET).json()
        events = []
        with http.stream("GET", f"/v1/jobs/{job['id']}/events", timeout=30) as stream:
            assert stream.headers["content-type"].startswith("text/event-stream")
            events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
        stages = [e["stage"] for e in events]
        assert events[-1]["status"] == "succeeded" and stages[-1] == "done"
        assert {"analyze", "select", "validate"} <= set(stages)
        progress = [e["progress"] for e in events]
        assert progress == sorted(progress)


def test_an_open_event_stream_gets_a_final_event_on_shutdown(settings: Make) -> None:
    """uvicorn waits for open connections before the app hears of shutdown: an /events stream used to
    be cut when the graceful timeout ran out (a protocol error); now it ends with a `shutdown` event."""
    lines: list[str] = []
    failure: list[BaseException] = []
    opened = threading.Event()

    def follow(url: str, job_id: str) -> None:
        try:
            with httpx.Client(base_url=url) as http, http.stream("GET", f"/v1/jobs/{job_id}/events",
                                                                timeout=30) as stream:
                for line in stream.iter_lines():
                    lines.append(line)
                    opened.set()
        except BaseException as exc:  # what the client would see: RemoteProtocolError when cut
            failure.append(exc)
            opened.set()

    with live_server(settings(worker_stage_delay_s=60)) as url:
        job = httpx.post(f"{url}/v1/jobs", params=FAST, content=DEMO, headers=OCTET).json()
        reader = threading.Thread(target=follow, args=(url, job["id"]))
        reader.start()
        assert opened.wait(15)
        started = time.monotonic()
    reader.join(15)
    assert not failure, failure
    assert "event: shutdown" in lines, lines
    final = json.loads(next(line for line in reversed(lines) if line.startswith("data:"))[5:])
    assert final["id"] == job["id"] and final["status"] in ("queued", "running")
    assert time.monotonic() - started < 10


def test_client_round_trip_and_cancel(settings: Make, tmp_path: Path) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(DEMO)
    with live_server(settings()) as url, Client(url) as client:
        seen: list[str] = []
        report = client.prune(model, tmp_path / "out.onnx", {"sparsity": 0.3}, latency_runs=0,
                              progress=lambda stage, _: seen.append(stage))
        assert report["groups"]["pruned"] > 0 and seen[-1] == "done"
        onnx.checker.check_model(onnx.load(str(tmp_path / "out.onnx")), full_check=True)
        with pytest.raises(ServiceError) as refused:
            client.submit(b"not a model")
        assert refused.value.status == 400 and refused.value.exit_code == 3
        with pytest.raises(ServiceError) as invalid:
            client.submit(model, sparsity=7)
        assert invalid.value.status == 422 and invalid.value.exit_code == 2
        assert "sparsity" in invalid.value.problem["detail"]
    with live_server(settings(worker_stage_delay_s=60)) as url, Client(url) as client:
        job = client.submit(DEMO)
        cancelled = client.cancel(job["id"])
        assert cancelled is not None and cancelled["status"] == "cancelled"
        with pytest.raises(JobFailedError) as failed:
            client.wait(job["id"])
        assert failed.value.kind == "Cancelled"
        assert client.cancel(job["id"]) is None  # a second DELETE removes the record
        assert job["id"] not in {j["id"] for j in client.jobs()["items"]}


def test_cli_submit_exit_codes(settings: Make, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, out, report = tmp_path / "model.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    model.write_bytes(DEMO)
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01 not a model")
    with live_server(settings()) as url:
        common = ["--server", url, "-q", "--latency-runs", "0"]
        assert main(["submit", str(model), str(out), "--sparsity", "0.4", "--report", str(report), *common]) == 0
        assert json.loads(report.read_text())["config"]["sparsity"] == 0.4 and out.is_file()
        assert main(["submit", str(garbage), str(out), "--sparsity", "0.3", *common]) == 3
        assert main(["submit", str(model), str(out), "--sparsity", "1.5", *common]) == 2
        assert main(["submit", str(model), str(out), "--sparsity", "0.99", "--target", "params", *common]) == 4
        assert "TargetImpossibleError" in capsys.readouterr().err
        slow = ["--server", url, "-q", "--latency-runs", "0", "--recover", "distill", "--recover-steps", "100000"]
        assert main(["submit", str(model), str(out), "--timeout", "0.5", *slow]) == 7
        assert "goes on on the server" in capsys.readouterr().err
    assert main(["submit", str(model), str(out), "--sparsity", "0.3", "--server", url, "-q"]) == 6  # unreachable


def _readme_blocks(language: str) -> list[str]:
    service = README.read_text().split("\n## Service\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", service, re.S)


def test_readme_service_examples_work_as_written(settings: Make, tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(DEMO)
    (bash,), (python,) = _readme_blocks("bash"), _readme_blocks("python")
    with live_server(settings()) as url:
        port = url.rsplit(":", 1)[1]
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        for cmd in (["bash", "-euo", "pipefail", "-c", bash], [sys.executable, "-c", python]):
            run = subprocess.run([c.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for c in cmd], cwd=tmp_path,
                                 env=env, capture_output=True, text=True, timeout=120)
            assert run.returncode == 0, run.stdout + run.stderr
    onnx.checker.check_model(onnx.load(str(tmp_path / "model.pruned.onnx")), full_check=True)
    assert json.loads((tmp_path / "report.json").read_text())["config"]["target"] == "flops"
    assert (tmp_path / "model.pruned-50.onnx").is_file()


def test_deeply_nested_json_is_a_422_not_a_500(settings: Make) -> None:
    """The JSON decoder recurses per level: 2,000 levels used to end the request in a RecursionError."""
    deep = "[" * 2000 + "]" * 2000
    with live_server(settings()) as url, httpx.Client(base_url=url) as http:
        answers = [
            http.post("/v1/jobs", params={"config": deep}, content=DEMO, headers=OCTET),
            http.post("/v1/jobs", params={"input_shapes": deep}, content=DEMO, headers=OCTET),
            http.post("/v1/jobs", content="[" * 20_000 + "]" * 20_000, headers={"Content-Type": "application/json"}),
            http.post("/v1/jobs", files={"model": ("m.onnx", DEMO)}, data={"config": deep}),
            http.post("/v1/jobs", params={"config": json.dumps({"input_shapes": {"x": [[[[[[[[1]]]]]]]]}})},
                      content=DEMO, headers=OCTET),
        ]
        for response in answers:
            assert response.status_code == 422, response.text
            assert response.headers["content-type"] == "application/problem+json"
            assert "nests deeper than 8 levels" in response.json()["detail"]
        assert http.get("/readyz").status_code == 200


def _slow_body(pause_s: float) -> Iterator[bytes]:
    """The demo model in two halves with a pause between: the request sits in its body meanwhile."""
    yield DEMO[: len(DEMO) // 2]
    time.sleep(pause_s)
    yield DEMO[len(DEMO) // 2:]


def test_queue_limit_holds_under_concurrent_uploads(settings: Make) -> None:
    """The slot is taken before the body is read: 12 uploads arriving together against a limit of 3 used
    to be 12 x 202 (each checked the queue before any of them had become a job)."""
    with live_server(settings(queue_limit=3, max_concurrent_jobs=1, worker_stage_delay_s=1.0)) as url:
        def post(_: int) -> httpx.Response:
            with httpx.Client(base_url=url, timeout=30) as http:
                return http.post("/v1/jobs", params=FAST, content=_slow_body(1.5), headers=OCTET)

        with ThreadPoolExecutor(12) as pool:
            answers = list(pool.map(post, range(12)))
        codes = sorted(r.status_code for r in answers)
        assert codes == [202] * 3 + [429] * 9, codes
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["content-type"] == "application/problem+json"
        assert "GRAPHPRUNE_QUEUE_LIMIT" in refused.json()["detail"] and refused.headers["Retry-After"]


def test_a_full_disk_is_a_507_and_not_ready(settings: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """Below the free-space reserve: uploads get 507 and /readyz 503, both naming the setting; a disk that
    fills up mid-upload (ENOSPC injected into the write) is a 507 that leaves no partial file."""
    s = settings()
    with live_server(replace(s, min_free_bytes=1 << 60)) as url, httpx.Client(base_url=url) as http:
        full = http.post("/v1/jobs", params=FAST, content=DEMO, headers=OCTET)
        assert full.status_code == 507 and full.headers["content-type"] == "application/problem+json"
        assert "GRAPHPRUNE_MIN_FREE_BYTES" in full.json()["detail"] and full.headers["Retry-After"]
        ready = http.get("/readyz")
        assert ready.status_code == 503 and "GRAPHPRUNE_MIN_FREE_BYTES" in ready.json()["detail"]

    def no_space(out: Any, digest: Any, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with live_server(s) as url, httpx.Client(base_url=url) as http:
        monkeypatch.setattr(upload, "_write", no_space)
        answer = http.post("/v1/jobs", params=FAST, content=DEMO, headers=OCTET)
        assert answer.status_code == 507, answer.text
        assert "disk filled up" in answer.json()["detail"]
        assert not any((s.data_dir / "uploads").iterdir())
        monkeypatch.undo()
        assert http.get("/readyz").status_code == 200
        assert http.post("/v1/jobs", params=FAST, content=DEMO, headers=OCTET).status_code == 202


def test_a_job_that_fills_the_disk_fails_with_the_reason() -> None:
    error = job_error(OSError(errno.ENOSPC, "No space left on device"), None)
    assert error.kind == "DiskFull" and "GRAPHPRUNE_MIN_FREE_BYTES" in error.message


def test_readiness_says_when_jobs_cannot_run(settings: Make, monkeypatch: pytest.MonkeyPatch) -> None:
    """/readyz is 503 with the reason when the job store does not answer or the dispatcher has stopped
    (it used to check only the data directory, and a broken store answered 500)."""
    import sqlite3

    with live_app(settings()) as (url, app), httpx.Client(base_url=url) as http:
        rt = app.state.runtime

        def broken() -> None:
            raise sqlite3.OperationalError("database disk image is malformed")

        monkeypatch.setattr(rt.store, "counts", broken)
        answer = http.get("/readyz")
        assert answer.status_code == 503 and answer.headers["content-type"] == "application/problem+json"
        assert "job store does not answer" in answer.json()["detail"] and "malformed" in answer.json()["detail"]
        monkeypatch.undo()
        assert http.get("/readyz").status_code == 200
        dispatcher = rt.executor._dispatcher
        dispatcher.get_loop().call_soon_threadsafe(dispatcher.cancel)  # it runs on the server's loop
        deadline = time.monotonic() + 10
        while not dispatcher.done():
            assert time.monotonic() < deadline
            time.sleep(0.02)
        answer = http.get("/readyz")
        assert answer.status_code == 503 and "dispatcher has stopped" in answer.json()["detail"]


def test_a_body_of_countless_tiny_fields_is_refused_quickly(settings: Make) -> None:
    """The upload pre-check walks top-level protobuf fields in Python; it stops at MAX_TOP_LEVEL_FIELDS
    instead of holding the GIL for seconds over a body made of millions of them (~0.7 CPU-s per MB)."""
    s = settings()
    body = b"\x08\x01" * (4 * upload.MAX_TOP_LEVEL_FIELDS)  # ir_version = 1, over and over: 800 KB
    with live_server(s) as url, httpx.Client(base_url=url) as http:
        start = time.process_time()  # the server runs in this process: its CPU time counts here
        answer = http.post("/v1/jobs", params=FAST, content=body, headers=OCTET)
        assert answer.status_code == 400 and "top-level protobuf fields" in answer.json()["detail"]
        assert time.process_time() - start < 1.0
        assert not any((s.data_dir / "uploads").iterdir())


def test_a_chunked_multipart_over_the_cap_names_the_cap(settings: Make) -> None:
    """The 413 for a streamed form names GRAPHPRUNE_MAX_UPLOAD_BYTES, not the cap plus the allowance for
    the form's framing that the stream is really cut at."""
    def form() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="model"; filename="m.onnx"\r\n\r\n'
        for _ in range(3):
            yield b"\0" * (1 << 20)
        yield b"\r\n--b--\r\n"

    with live_server(settings(max_upload_bytes=1000)) as url, httpx.Client(base_url=url) as http:
        answer = http.post("/v1/jobs", content=form(), headers={"Content-Type": "multipart/form-data; boundary=b"})
        assert answer.status_code == 413 and answer.headers["content-type"] == "application/problem+json"
        assert "(1,000 bytes, GRAPHPRUNE_MAX_UPLOAD_BYTES)" in answer.json()["detail"]


def test_bad_options_and_lifted_limits_are_422_before_any_job(settings: Make) -> None:
    """On a real server: an out-of-range seed used to be accepted and fail the job later (ValueError), and
    a client could lift the model-bomb budget or ask for unbounded samples; each is now a 422 naming the
    option or the server's cap, and no job is created."""
    with live_server(settings(max_samples=64)) as url, httpx.Client(base_url=url) as http:
        for params, words in (({"seed": -1}, ["seed", "[0, 2**63)"]),
                              ({"max_model_bytes": 10**15}, ["GRAPHPRUNE_MAX_MODEL_BYTES"]),
                              ({"samples": 65}, ["limit of 64", "GRAPHPRUNE_MAX_SAMPLES"])):
            answer = http.post("/v1/jobs", params={**FAST, **params}, content=DEMO, headers=OCTET)
            assert answer.status_code == 422 and answer.headers["content-type"] == "application/problem+json"
            assert all(w in answer.json()["detail"] for w in words), answer.json()["detail"]
        assert http.get("/v1/jobs").json()["items"] == []
