"""Overlap and density of sparse-update supports.

A support is ``dict[module name -> bool tensor]`` of the weight's shape. Everything here
loops per module and reduces with ``.sum()`` so that no tensor larger than one module's
mask is ever materialised (full-model masks can be billions of entries).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

Support = Mapping[str, torch.Tensor]

__all__ = ["density", "density_per_module", "jaccard", "overlap_matrix", "support_size"]


def _bool(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype == torch.bool else t != 0


def support_size(support: Support) -> int:
    """Number of True entries over all modules."""
    return int(sum(int(_bool(t).sum()) for t in support.values()))


def _intersection_union(a: Support, b: Support) -> tuple[int, int]:
    inter = 0
    union = 0
    for name in set(a) | set(b):
        ta, tb = a.get(name), b.get(name)
        if ta is None or tb is None:
            # Module missing on one side counts as all-False there: no intersection.
            union += int(_bool(tb if ta is None else ta).sum())
            continue
        if ta.shape != tb.shape:
            raise ValueError(
                f"support shapes differ for module {name!r}: {tuple(ta.shape)} vs {tuple(tb.shape)}"
            )
        ba, bb = _bool(ta), _bool(tb.to(ta.device))
        inter += int((ba & bb).sum())
        union += int((ba | bb).sum())
    return inter, union


def jaccard(a: Support, b: Support) -> float:
    """|a∩b| / |a∪b| over all entries of all modules (union of names); 0/0 -> 0.0."""
    inter, union = _intersection_union(a, b)
    return inter / union if union else 0.0


def overlap_matrix(supports: Sequence[Support]) -> np.ndarray:
    """Symmetric T×T Jaccard matrix; the diagonal is 1 for non-empty supports and 0 for empty ones."""
    T = len(supports)
    M = np.zeros((T, T), dtype=float)
    for i in range(T):
        M[i, i] = 1.0 if support_size(supports[i]) > 0 else 0.0
        for j in range(i + 1, T):
            M[i, j] = M[j, i] = jaccard(supports[i], supports[j])
    return M


def density(support: Support) -> float:
    """Fraction of True entries over all modules (0.0 for an empty support dict)."""
    total = sum(t.numel() for t in support.values())
    return support_size(support) / total if total else 0.0


def density_per_module(support: Support) -> dict[str, float]:
    """Per-module fraction of True entries, to see where the sparse update concentrates."""
    return {name: (int(_bool(t).sum()) / t.numel() if t.numel() else 0.0) for name, t in support.items()}
