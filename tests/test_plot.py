"""The mask picture shows attention.py's rule: its grid against the rule written out again, and the PNG it draws."""
import pytest

import plot
from attention import CONTEXT, PAD, SPAN


def test_mask_grid_is_the_hybrid_rule():
    labels, roles, grid = plot.mask_grid()
    T = len(roles)
    assert len(labels) == T and len(grid) == T and all(len(row) == T for row in grid)
    assert {PAD, CONTEXT, SPAN} <= set(roles)  # the example shows every role
    for i in range(T):
        for j in range(T):
            if roles[i] == PAD:
                expected = i == j  # a PAD query attends only to itself
            elif roles[j] == PAD:
                expected = False  # nobody else attends to padding
            else:
                expected = ((roles[i] in (CONTEXT, SPAN) and roles[j] == CONTEXT)
                            or (roles[i] == SPAN and roles[j] == SPAN and j <= i))
            assert grid[i][j] == expected, f"query {i} ({labels[i]}) -> key {j} ({labels[j]})"


def test_plot_mask_writes_a_png(tmp_path):
    matplotlib = pytest.importorskip("matplotlib", reason="matplotlib is needed only to draw figures (pip install "
                                                          "matplotlib)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    out = tmp_path / "mask.png"
    plot.plot_mask(plt, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
