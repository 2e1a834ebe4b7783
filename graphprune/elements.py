"""Channel elements: every prunable channel position is labelled by an element id.

Producers (Conv, Gemm, MatMul with a constant...) create fresh elements; coupling rules merge them
with a union-find, so one equivalence class (a *unit*) is the smallest thing that can be removed.
Keeping labels per position (not per tensor) is what makes Concat offsets, Flatten blocks and head
structure exact: a position's fate is the fate of its label.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

Labels = NDArray[np.int64]


@dataclass(frozen=True)
class Space:
    """A run of fresh elements created by one producer (e.g. the output channels of one Conv)."""

    index: int
    node: str
    tensor: str
    start: int
    size: int


class ElementPool:
    """Union-find over channel elements with a per-element 'blocked' flag."""

    def __init__(self) -> None:
        self._parent = np.zeros(0, dtype=np.int64)
        self._blocked = np.zeros(0, dtype=bool)
        self.spaces: list[Space] = []
        self._space_of = np.zeros(0, dtype=np.int64)

    def __len__(self) -> int:
        return int(self._parent.size)

    def new(self, size: int, node: str, tensor: str) -> Labels:
        start = len(self)
        space = Space(len(self.spaces), node, tensor, start, size)
        self.spaces.append(space)
        self._parent = np.concatenate([self._parent, np.arange(start, start + size, dtype=np.int64)])
        self._blocked = np.concatenate([self._blocked, np.zeros(size, dtype=bool)])
        self._space_of = np.concatenate([self._space_of, np.full(size, space.index, dtype=np.int64)])
        return np.arange(start, start + size, dtype=np.int64)

    def find(self, x: int) -> int:
        parent = self._parent
        root = x
        while parent[root] != root:
            root = int(parent[root])
        while parent[x] != root:
            parent[x], x = root, int(parent[x])
        return root

    def union(self, a: Labels, b: Labels) -> None:
        if a.shape != b.shape:
            raise ValueError(f"cannot couple {a.size} channels with {b.size}")
        # Vectorised: every root only ever points to a smaller root, so rounds of "hook the larger root
        # under the smaller" cannot form cycles and end when all pairs share a root (the per-pair Python
        # loop was a tenth of ResNet-50's analysis).
        a, b = a.ravel(), b.ravel()
        while True:
            ra, rb = self._roots_of(a), self._roots_of(b)
            differ = ra != rb
            if not differ.any():
                return
            lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
            np.minimum.at(self._parent, hi, lo)

    def _roots_of(self, labels: Labels) -> Labels:
        """Roots of `labels`, compressing their paths."""
        parent = self._parent
        roots = parent[labels]
        while True:
            up = parent[roots]
            if np.array_equal(up, roots):
                break
            roots = up
        parent[labels] = roots
        return roots

    def block(self, labels: Labels) -> None:
        self._blocked[labels] = True

    def roots(self) -> Labels:
        """Root of every element (fully compressed)."""
        parent = self._parent.copy()
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                return parent
            parent = nxt

    def blocked(self) -> NDArray[np.bool_]:
        return self._blocked.copy()

    def space_of(self) -> Labels:
        return self._space_of.copy()
