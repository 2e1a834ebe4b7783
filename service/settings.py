"""Server settings: every field can be set as GRAPHPRUNE_<FIELD> in the environment.

Defaults are embedded so `graphprune serve` needs nothing else: SQLite and files in a data
directory, jobs run as local processes.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, get_type_hints

from graphprune.errors import UsageError

ENV_PREFIX = "GRAPHPRUNE_"


def _default_data_dir() -> Path:
    return Path(os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share") / "graphprune"


@dataclass(frozen=True)
class Settings:
    data_dir: Path = field(default_factory=_default_data_dir)
    max_upload_bytes: int = 2 * 1024**3  # protobuf cannot parse a larger single-file model anyway
    max_concurrent_jobs: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    queue_limit: int = 100  # queued jobs beyond which submissions get 429
    min_free_bytes: int = 256 * 1024**2  # disk the data directory keeps free: uploads past it get 507, /readyz 503
    job_timeout_s: float = 3600.0  # wall clock, from the worker's start
    job_memory_bytes: int = 16 * 1024**3  # RLIMIT_AS of a worker; 0 = unlimited
    job_cpu_s: int = 7200  # RLIMIT_CPU of a worker (all its threads); 0 = unlimited
    result_ttl_s: float = 24 * 3600.0  # results and reports are deleted this long after a job ends
    max_attempts: int = 2  # runs a job gets when server restarts interrupt it
    shutdown_grace_s: float = 10.0  # running jobs get this long to finish before they are re-queued
    api_token: str | None = None  # when set, /v1 requires `Authorization: Bearer <token>`
    executor: str = "local"  # "ray": jobs run as Ray tasks on the cluster at RAY_ADDRESS (graphprune[ray])
    ray_job_cpus: float = 1.0  # CPUs Ray reserves per job (with job_memory_bytes as its memory request)
    ray_schedule_timeout_s: float = 600.0  # a Ray task not started by then fails as Unschedulable
    worker_stage_delay_s: float = 0.0  # sleep after every stage: makes cancel/restart testable
    # Caps on what one job may ask for (more is a 422 naming the cap; unasked, an option gets the
    # library's default or the cap, whichever is lower): a client cannot lift a server-side limit.
    max_model_bytes: int = 4 * 1024**3  # the load-time budget of declared tensor bytes (model bombs)
    max_samples: int = 1024  # inputs for the OBS statistics
    max_obs_memory: int = 8 * 1024**3  # the most a job's `obs_memory` may ask for (unasked: 40% of what is free)
    max_latency_runs: int = 50
    max_input_values: int = 1 << 24  # elements of one input's concrete shape (input_shapes)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_dir", Path(self.data_dir).expanduser())
        positive = ("max_upload_bytes", "max_concurrent_jobs", "queue_limit", "job_timeout_s", "max_attempts",
                    "ray_job_cpus", "ray_schedule_timeout_s", "max_model_bytes", "max_samples", "max_input_values",
                    "max_obs_memory")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UsageError(f"{ENV_PREFIX}{name.upper()} must be > 0, got {getattr(self, name)}")
        for name in ("min_free_bytes", "job_memory_bytes", "job_cpu_s", "result_ttl_s", "shutdown_grace_s",
                     "worker_stage_delay_s", "max_latency_runs"):
            if getattr(self, name) < 0:
                raise UsageError(f"{ENV_PREFIX}{name.upper()} must be >= 0, got {getattr(self, name)}")

    @property
    def db_path(self) -> Path:
        return self.data_dir / "jobs.sqlite3"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from GRAPHPRUNE_* variables; `overrides` (e.g. CLI flags) win."""
        env = os.environ if env is None else env
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw:  # an empty variable counts as unset (never as an empty API token)
                values[f.name] = _parse(f.name, hints[f.name], raw)
        return replace(cls(**values), **overrides)


def _parse(name: str, hint: Any, raw: str) -> Any:
    kind = next((t for t in (int, float, Path) if hint is t), str)
    try:
        return kind(raw.strip()) if kind is not str else raw
    except ValueError:
        raise UsageError(f"{ENV_PREFIX}{name.upper()} must be a {kind.__name__}, got {raw!r}") from None
