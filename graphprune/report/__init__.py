"""The report of one prune: the data (`Report`), and its renderings (terminal summary, JSON, HTML page)."""

from graphprune.report.model import Report

__all__ = ["Report"]
