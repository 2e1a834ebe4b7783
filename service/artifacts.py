"""Where a job's files live in the data directory, and atomic writes for them.

    DATA_DIR/jobs.sqlite3          job records
    DATA_DIR/jobs/<id>/input.onnx  the upload (deleted when the job ends)
    DATA_DIR/jobs/<id>/result.onnx the pruned model    ┐ written as *.tmp, fsynced, then
    DATA_DIR/jobs/<id>/report.json the report          ┘ os.replace'd: never seen half-written
    DATA_DIR/uploads/              bodies still arriving
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` is the disk (or the user's quota) running out: the server's condition, not the job's."""
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


class Artifacts:
    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir / "jobs"
        self.uploads = data_dir / "uploads"
        self.root.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    def dir(self, job_id: str) -> Path:
        return self.root / job_id

    def input(self, job_id: str) -> Path:
        return self.dir(job_id) / "input.onnx"

    def result(self, job_id: str) -> Path:
        return self.dir(job_id) / "result.onnx"

    def report(self, job_id: str) -> Path:
        return self.dir(job_id) / "report.json"

    def remove(self, job_id: str) -> None:
        shutil.rmtree(self.dir(job_id), ignore_errors=True)

    def remove_outputs(self, job_id: str) -> None:
        """What a failed, cancelled or interrupted attempt may have left behind."""
        for path in self.dir(job_id).glob("*"):
            if path.name != "input.onnx":
                path.unlink(missing_ok=True)

    def sweep(self, keep: set[str]) -> None:
        """Drop partial uploads and folders of jobs that were never recorded (a crash mid-submit)."""
        for path in self.uploads.iterdir():
            path.unlink(missing_ok=True)
        for path in self.root.iterdir():
            if path.name not in keep:
                shutil.rmtree(path, ignore_errors=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> tuple[int, str]:
    """Let `write` fill a temporary sibling, fsync it and move it onto `path`; → (bytes, sha256)."""
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        size, digest = file_digest(tmp)
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return size, digest


def file_digest(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()
