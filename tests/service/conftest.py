"""Fixtures for the service tests; helpers live in service_testing.py (test modules import it:
a second module named `conftest` would be ambiguous)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from service.settings import Settings


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def settings(tmp_path: Path) -> Callable[..., Settings]:
    """Settings on a fresh data directory; keyword arguments override."""

    def make(**overrides: Any) -> Settings:
        return Settings(**{"data_dir": tmp_path / "data", "max_concurrent_jobs": 2, "shutdown_grace_s": 0.0,
                           **overrides})

    return make
