"""Typed errors: each carries the CLI exit code and names the node/op and the fix."""

from __future__ import annotations

# The fix for a model that is malformed as exported; it ends many InvalidModelError messages.
REEXPORT = "re-export the model (torch.onnx.export / tf2onnx / skl2onnx)"


class GraphpruneError(Exception):
    """Base class; `exit_code` is what the CLI returns for it."""

    exit_code = 1


class UsageError(GraphpruneError):
    """Options that contradict each other or are out of range."""

    exit_code = 2


class InvalidModelError(GraphpruneError):
    """The input is not a loadable, safe, valid ONNX model."""

    exit_code = 3


class ModelTooLargeError(InvalidModelError):
    """The model declares more bytes than the configured budget allows."""


class TargetImpossibleError(GraphpruneError):
    """The requested sparsity cannot be reached with the prunable groups."""

    exit_code = 4


class ValidationFailedError(GraphpruneError):
    """The pruned model failed the checker, onnxruntime or the equivalence self-check."""

    exit_code = 5


class ServerUnreachableError(GraphpruneError):
    """No connection to the graphprune server (or it broke): retry or fix the URL, the model is not at fault."""

    exit_code = 6


class WaitTimeoutError(GraphpruneError, TimeoutError):
    """The remote job did not end within the time the caller would wait; it goes on on the server."""

    exit_code = 7
