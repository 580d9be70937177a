"""Report metrics against hand-computed values."""

import numpy as np
import pytest

from rayforge.report.metrics import uniformity_over


def test_uniformity_over_the_pors_dataset():
    # D' = {0, 1, 2} (point 3 excluded): counts 2, 1, 1 -> 0.5, 0.25, 0.25 against 1/3 each
    value = uniformity_over([np.array([0, 1]), np.array([0, 2])], 4, np.array([3]))
    assert value == pytest.approx(1 / 6 + 2 * (1 / 3 - 1 / 4))
    # an original log that uses every point equally often is exactly uniform
    assert uniformity_over([np.array([0, 1]), np.array([2, 3])], 4, np.array([], dtype=np.int64)) == 0.0
