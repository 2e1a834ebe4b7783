"""Schemathesis (all phases: coverage, fuzzing, stateful) over the OpenAPI spec against a real
uvicorn: no 5xx, no response outside the spec. Half of the generated job ids are real jobs'.
Positive-data acceptance is left out on purpose: the spec says "binary", and random bytes are
rightly refused as not an ONNX model (400)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from service_testing import DEMO, OCTET, live_server

from service.settings import Settings

pytestmark = pytest.mark.slow
EXAMPLES = 30  # per operation and phase: ~1,000 requests, well under a minute


def test_schemathesis_finds_no_server_error_or_spec_violation(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", max_concurrent_jobs=1, queue_limit=5,
                        max_upload_bytes=4 * len(DEMO))
    with live_server(settings) as url:
        ids = [_finished_job(url, p) for p in ({}, {"sparsity": 0.99, "target": "params"})]
        config = tmp_path / "schemathesis.toml"
        config.write_text(f'[dictionaries.jobs]\nvalues = {json.dumps(ids)}\n\n[parameters]\n'
                          '"path.job_id" = { dictionary = "jobs", probability = 0.5 }\n')
        schemathesis = Path(sys.executable).parent / "schemathesis"
        run = subprocess.run(
            [str(schemathesis), "--config-file", str(config), "--no-color", "run", f"{url}/openapi.json",
             "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--max-examples", str(EXAMPLES),
             "--seed", "1", "--generation-database", "none", "--request-timeout", "30"],
            capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert "generated" in run.stdout and " passed" in run.stdout


def _finished_job(url: str, params: dict[str, object]) -> str:
    job_id: str = httpx.post(f"{url}/v1/jobs", params={"latency_runs": 0, **params}, content=DEMO,
                             headers=OCTET).json()["id"]
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] in ("queued", "running"):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return job_id
