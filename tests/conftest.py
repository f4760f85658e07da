"""Shared test fixtures: the golden outputs of the official code, and the reduced models they came from."""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# CI clones the repo with shared/ beside it; REST_JAX_GOLDEN points elsewhere if needed.
GOLDEN = Path(os.environ.get('REST_JAX_GOLDEN', REPO.parent / 'shared' / 'golden'))

# The official classes and arguments behind each golden file (shared/golden/README.md).
REDUCED = {
    'v1_reduced': ('rest_lite', dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], mlp_ratios=[4, 4, 4, 4],
                                     qkv_bias=True, depths=[1, 1, 2, 1], sr_ratios=[8, 4, 2, 1],
                                     apply_transform=True, num_classes=10)),
    'v2_reduced': ('restv2_tiny', dict(embed_dims=[16, 32, 64, 128], num_heads=[1, 2, 4, 8], depths=[1, 1, 2, 1],
                                       sr_ratios=[8, 4, 2, 1], num_classes=10)),
    'v2_reduced_wide_heads': ('restv2_tiny', dict(embed_dims=[32, 64, 128, 256], num_heads=[2, 4, 8, 16],
                                                  depths=[1, 1, 1, 1], sr_ratios=[8, 4, 2, 1], num_classes=10)),
}


def golden_path(name: str) -> Path:
    """A file of shared/golden; skipped locally if absent, a failure under CI (CI=true)."""
    path = GOLDEN / name
    if not path.exists():
        message = f'golden file {path} not found (set REST_JAX_GOLDEN to the shared/golden directory)'
        if os.environ.get('CI'):
            pytest.fail(message)
        pytest.skip(message)
    return path


def relative_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: the golden README's measure."""
    import numpy as np
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())
