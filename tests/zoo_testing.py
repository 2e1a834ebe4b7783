"""What the tests over zoo models share: a model's path or a skip, and the share of parameters a
prune removed."""

from __future__ import annotations

import pytest
import zoo

import graphprune


def path_or_skip(name: str) -> str:
    """The zoo model's path; the test skips, saying what to install, where its source is missing."""
    try:
        return str(zoo.path(name))
    except zoo.ZooUnavailable as e:
        pytest.skip(str(e))


def params_removed(result: graphprune.PruneResult) -> float:
    return 1 - result.report.params["after"] / result.report.params["before"]
