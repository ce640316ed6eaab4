"""The pure maths of docs/method.md §4-§5: analytic cases and invariants."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from regionwatch import metrics


def random_curves(seed: int, pairs: int = 5, alphas: int = 11) -> torch.Tensor:
    """Monotone-ish positive distance curves [pairs, alphas] with d(1) well above the threshold."""
    g = torch.Generator().manual_seed(seed)
    steps = torch.rand(pairs, alphas, generator=g)
    return torch.cumsum(steps, dim=1) + 0.05


@given(scale=st.floats(1e-2, 1e3), seed=st.integers(0, 2**16))
def test_relative_is_scale_invariant(scale: float, seed: int) -> None:
    """Scaling every distance by c > 0 leaves d(a)/d(1) unchanged."""
    curve = random_curves(seed)
    torch.testing.assert_close(metrics.relative(scale * curve), metrics.relative(curve))


@given(seed=st.integers(0, 2**16), alphas=st.integers(3, 40))
def test_relative_ends_at_one_and_slope_bounds_increment(seed: int, alphas: int) -> None:
    """r(1) = 1 exactly, and s >= 1 - r(0) because the increments telescope (docs/method.md §4)."""
    g = torch.Generator().manual_seed(seed)
    curve = torch.rand(7, alphas, generator=g) * 5 + 0.02  # not monotone: slopes may be negative
    rel = metrics.relative(curve)
    assert torch.equal(rel[:, -1], torch.ones(7))
    slope = metrics.max_slope(rel)
    assert torch.all(slope >= (1 - rel[:, 0]) - 1e-6)


# A float32 linspace is not exactly uniform: a perfect line r_k = alpha_k has increments off by
# up to one ulp, so s = 1 + (S - 1) * eps32 at worst (1.4e-6 at S = 21). Grids whose step is a
# power of two (S - 1 = 16, 32) are exact.
EPS32 = torch.finfo(torch.float32).eps


def test_max_slope_of_line_and_step() -> None:
    """A straight line gives s = 1; a perfect one-interval step gives s = S - 1."""
    for steps in (11, 17, 21, 30, 33):
        alphas = metrics.alpha_grid(steps)
        line = metrics.relative(3.0 * alphas[None])
        exact_grid = (steps - 1) & (steps - 2) == 0
        bound = 1e-7 if exact_grid else (steps - 1) * EPS32
        assert metrics.max_slope(line).item() == pytest.approx(1.0, abs=bound)
        step = torch.zeros(1, steps)
        step[0, steps // 2 :] = 2.0
        assert metrics.max_slope(metrics.relative(step)).item() == pytest.approx(steps - 1)


def test_alpha_grid_ends_exactly() -> None:
    """alpha_0 = 0 and alpha_{S-1} = 1 exactly in float32."""
    grid = metrics.alpha_grid(21)
    assert grid.dtype == torch.float32
    assert grid[0].item() == 0.0
    assert grid[-1].item() == 1.0


def test_interpolation_points_endpoints() -> None:
    """x(0) = x_A and x(1) = x_B exactly; x(0.5) is the midpoint."""
    g = torch.Generator().manual_seed(0)
    x_a, x_b = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    points = metrics.interpolation_points(x_a, x_b, metrics.alpha_grid(5))
    assert torch.equal(points[:, 0], x_a)
    assert torch.equal(points[:, -1], x_b)
    torch.testing.assert_close(points[:, 2], (x_a + x_b) / 2)


def test_tiny_end_distance_is_excluded_not_divided() -> None:
    """A pair with d(1) <= 0.01 gets a NaN row and is counted as excluded."""
    dist = torch.tensor([[0.0, 1.0, 2.0], [0.0, 0.004, 0.009], [0.0, 0.0, 0.0]])
    rel = metrics.relative(dist)
    assert torch.equal(rel[0], torch.tensor([0.0, 0.5, 1.0]))
    assert torch.isnan(rel[1:]).all()
    assert metrics.excluded(dist).tolist() == [False, True, True]
    assert torch.isnan(metrics.max_slope(rel)[1:]).all()


def test_logit_diff_goes_from_zero_to_one() -> None:
    """1 - n_k is 0 at alpha = 0 and 1 at alpha = 1, a step where L jumps; NaN if L is flat."""
    diffs = torch.tensor([[4.0, 3.9, -2.0, -2.1], [0.0, 0.0, 0.0, 0.0]])
    out = metrics.logit_diff(diffs)
    assert out[0, 0].item() == 0.0
    assert out[0, -1].item() == 1.0
    assert out[0, 2].item() == pytest.approx((4.0 + 2.0) / (4.0 + 2.1))
    assert torch.isnan(out[1]).all()


def test_quartiles_match_numpy_linear() -> None:
    """quartiles() is torch.quantile's linear interpolation and ignores NaN."""
    values = torch.tensor([1.0, 5.0, 2.0, float("nan"), 9.0, 3.0])
    finite = np.array([1.0, 5.0, 2.0, 9.0, 3.0])
    expected = np.percentile(finite, [25, 50, 75])
    assert metrics.quartiles(values) == pytest.approx(tuple(expected))
    assert all(math.isnan(q) for q in metrics.quartiles(torch.tensor([float("nan")])))


def test_median_curve_is_lower_middle_and_skips_excluded() -> None:
    """The median curve takes the lower middle of an even count and ignores NaN rows."""
    rel = torch.tensor([[0.0, 0.2, 1.0], [0.0, 0.6, 1.0], [float("nan")] * 3])
    assert metrics.median_curve(rel).tolist() == pytest.approx([0.0, 0.2, 1.0])


@given(seed=st.integers(0, 2**16), width=st.integers(2, 16))
def test_plane_passes_through_anchors(seed: int, width: int) -> None:
    """p(0,0) = a, p(1,0) = b, p(t,1) = c, and u is orthogonal to b - a (docs/method.md §5)."""
    g = torch.Generator().manual_seed(seed)
    a, b, c = (torch.randn(width, generator=g, dtype=torch.float64).float() for _ in range(3))
    t, u = metrics.plane(a, b, c)
    axis = torch.tensor([0.0, 1.0])
    points = metrics.plane_points(a, b, u, axis)  # [beta, alpha, d]
    torch.testing.assert_close(points[0, 0], a)
    torch.testing.assert_close(points[0, 1], b)
    torch.testing.assert_close(a + t * (b - a) + u, c, atol=1e-4, rtol=1e-4)
    assert abs(float(torch.dot(u, b - a))) <= 1e-3 * float(u.norm() * (b - a).norm()) + 1e-5


def test_plane_points_orientation() -> None:
    """Rows are beta top to bottom, columns alpha left to right."""
    a, b, u = torch.zeros(2), torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    axis = metrics.map_grid(3, (0.0, 1.0))
    points = metrics.plane_points(a, b, u, axis)
    assert points[0, 2].tolist() == [1.0, 0.0]  # top row (beta = 0), right column (alpha = 1)
    assert points[2, 0].tolist() == [0.0, 1.0]  # bottom row (beta = 1), left column


def test_region_rgb_normalizes_each_channel_by_its_own_max() -> None:
    """RGB = 1 - D / max per channel; zero distance is saturated, the farthest point is 0."""
    dist = torch.zeros(1, 3, 2, 2)
    dist[0, 0] = torch.tensor([[0.0, 2.0], [4.0, 1.0]])
    dist[0, 1] = torch.tensor([[10.0, 0.0], [5.0, 5.0]])
    dist[0, 2] = 0.0  # a channel that never moves stays white, not NaN
    rgb = metrics.region_rgb(dist)
    assert rgb.shape == (1, 2, 2, 3)
    assert rgb[0, :, :, 0].tolist() == [[1.0, 0.5], [0.0, 0.75]]
    assert rgb[0, :, :, 1].tolist() == [[0.0, 1.0], [0.5, 0.5]]
    assert rgb[0, :, :, 2].tolist() == [[1.0, 1.0], [1.0, 1.0]]


def test_frac_linear_counts_pairs_inside_one_region() -> None:
    """A straight line has Lambda = 1 (linear), a step has Lambda = S-1 (not)."""
    alphas = metrics.alpha_grid(11)
    step = (alphas >= 0.5).float() + 0.0
    rel = torch.stack([alphas, alphas, step])
    assert metrics.frac_linear(rel) == pytest.approx(2 / 3)


def test_summary_names_and_values() -> None:
    """The headline scalars carry docs/method.md §8's names and the quartiles of the slopes."""
    alphas = metrics.alpha_grid(5)
    dist = torch.stack([alphas * 2, alphas * 4, (alphas > 0.5).float() * 3, alphas * 0])
    rel = metrics.relative(dist)
    tops = (torch.tensor([1, 2, 3, 4]), torch.tensor([1, 5, 6, 4]))
    out = metrics.summary((dist, rel, *tops), torch.tensor([1.0, 1.2]), torch.tensor([2.0, 4.0]))
    slopes = metrics.max_slope(rel)[:3]
    assert out["max_slope/median"] == pytest.approx(float(slopes.median()))
    assert out["pairs/excluded"] == 1.0
    assert out["pairs/measured"] == 4.0
    assert out["dist/d1_median"] == pytest.approx(2.5)  # linear median of 0, 2, 3, 4
    assert out["max_slope/similar_median"] == pytest.approx(1.1)
    assert out["max_slope/dissimilar_median"] == pytest.approx(3.0)
    assert out["max_slope/dissimilar_over_similar"] == pytest.approx(3.0 / 1.1)
    # pairs 1 and 2 predict different tokens; pair 0 agrees; pair 3 is excluded (NaN slope)
    assert out["align/auc"] == pytest.approx(metrics.alignment(metrics.max_slope(rel), *tops))


def test_alignment_is_the_probability_that_differing_pairs_have_larger_slopes() -> None:
    """AUC: 1 when every differing pair out-slopes every agreeing one, 0.5 with no information."""
    tops_a, tops_b = torch.tensor([1, 1, 2, 2]), torch.tensor([1, 1, 3, 4])  # pairs 2, 3 differ
    assert metrics.alignment(torch.tensor([1.0, 1.1, 3.0, 5.0]), tops_a, tops_b) == 1.0
    assert metrics.alignment(torch.tensor([3.0, 5.0, 1.0, 1.1]), tops_a, tops_b) == 0.0
    assert metrics.alignment(torch.tensor([2.0, 2.0, 2.0, 2.0]), tops_a, tops_b) == 0.5
    assert metrics.alignment(torch.tensor([1.0, 4.0, 3.0, 5.0]), tops_a, tops_b) == 0.75
    assert math.isnan(metrics.alignment(torch.ones(2), torch.tensor([1, 2]), torch.tensor([1, 2])))


def test_emergence_onset_needs_the_curve_to_stay_above_the_band() -> None:
    """The onset is the first point after which every median stays above the init q75."""
    tokens = [0, 10, 100, 1000, 10000]
    assert metrics.emergence_onset(tokens, [1.1, 1.3, 1.1, 1.4, 1.6], 1.2) == 1000
    assert metrics.emergence_onset(tokens, [1.1, 1.3, 1.4, 1.5, 1.6], 1.2) == 10
    assert metrics.emergence_onset(tokens, [1.1, 1.3, 1.4, 1.5, 1.1], 1.2) is None
    assert metrics.emergence_onset(tokens, [1.1, 1.3, float("nan"), 1.5, 1.6], 1.2) == 10  # skipped
    assert metrics.emergence_onset(tokens[:1], [1.1], 1.0) is None  # needs a second snapshot
    assert metrics.emergence_onset(tokens, [1.1, 1.3, 1.4, 1.5, 1.6], float("nan")) is None


def test_solid_fraction_of_a_gradient_and_of_solid_regions() -> None:
    """Solid patches in the anchors' colours count fully; a smooth gradient barely counts."""
    grid = 13
    axis = metrics.map_grid(grid, (-0.25, 1.25))
    anchors = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.5, 1.0]]])
    # A linear model's map: each channel falls off with the distance to its own anchor.
    points = torch.stack(torch.meshgrid(axis, axis, indexing="xy"), -1)  # [beta, alpha, (a, b)]
    dist = torch.stack([(points - anchor).norm(dim=-1) for anchor in anchors[0]])  # [3, g, g]
    gradient = metrics.region_rgb(dist[None])[0]
    solid = torch.zeros(grid, grid, 3)
    solid[:, : grid // 2] = torch.tensor([1.0, 0.2, 0.2])
    solid[:, grid // 2 :] = torch.tensor([0.2, 1.0, 0.2])
    frac = metrics.solid_fraction(torch.stack([gradient, solid]), anchors.expand(2, -1, -1), axis)
    assert frac[1].item() == 1.0
    assert frac[0].item() < 0.15  # discs of radius 0.1 x max distance round the anchors (~0.1)


def test_quartile_band_is_per_alpha_and_skips_excluded_pairs() -> None:
    """The band is q25..q75 of r at each alpha over the kept pairs."""
    rel = torch.tensor([[0.0, 0.1, 1.0], [0.0, 0.5, 1.0], [0.0, 0.9, 1.0], [float("nan")] * 3])
    low, high = metrics.quartile_band(rel)
    assert low.tolist() == pytest.approx([0.0, 0.3, 1.0])
    assert high.tolist() == pytest.approx([0.0, 0.7, 1.0])
