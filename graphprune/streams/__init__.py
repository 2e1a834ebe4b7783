"""Residual streams read through RMSNorm: found on the graph (find.py), rotated and sliced (rotate.py);
LayerNorm streams are made RMSNorm streams first (centre.py)."""

from graphprune.streams.find import Norm, Stream, find_streams
from graphprune.streams.rotate import Basis, principal_basis, slice_stream, stream_grams

__all__ = ["Basis", "Norm", "Stream", "find_streams", "principal_basis", "slice_stream", "stream_grams"]
