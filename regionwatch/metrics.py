"""Pure maths of the probe: every formula of docs/method.md §4-§5 and §8 has its one home here.

Functions take and return tensors (or floats) and know nothing about models, so the fast engine,
the slow reference, reports and sinks all compute each number the same way.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

# docs/method.md §4: the reference plots drop pairs whose d(1) <= 0.01 (outputs that barely move);
# dividing by such a d(1) amplifies round-off into nonsense slopes.
MIN_END_DISTANCE = 0.01
# method.md §6.4: a pair whose steepest increment is < 1.5x its mean increment lies in one region.
LINEAR_LAMBDA = 1.5
# docs/method.md §6.4 averages the first ten increments (all of them at the reference's S = 11).
LAMBDA_INCREMENTS = 10
QUARTILES = (0.25, 0.5, 0.75)


def wide(t: Tensor) -> Tensor:
    """`t` in float64 if it already is, else float32: the precision distances are computed in."""
    return t if t.dtype == torch.float64 else t.float()


def alpha_grid(num_alphas: int) -> Tensor:
    """The weights a_k = linspace(0, 1, S) in float32 (a_0 = 0 and a_{S-1} = 1 exactly)."""
    return torch.linspace(0.0, 1.0, num_alphas, dtype=torch.float32)


def interpolation_points(x_a: Tensor, x_b: Tensor, alphas: Tensor) -> Tensor:
    """Points x(a) = (1 - a) x_A + a x_B on the segment, computed in this form (docs/method.md §4).

    Args:
        x_a: write vectors of the contexts, shape [pairs, d_model].
        x_b: write vectors of the partners, shape [pairs, d_model].
        alphas: weights, shape [alphas].

    Returns:
        Shape [pairs, alphas, d_model], in float32 (float64 for float64 vectors).
    """
    x_a, x_b = wide(x_a), wide(x_b)
    a = alphas.to(x_a.dtype)[None, :, None]
    return (1 - a) * x_a[:, None, :] + a * x_b[:, None, :]


def distance(h: Tensor, h_ref: Tensor) -> Tensor:
    """Euclidean distance ||h - h_ref|| over the last axis, in float32 (float64 if given)."""
    return torch.linalg.vector_norm(wide(h) - wide(h_ref), dim=-1)


def relative(dist: Tensor) -> Tensor:
    """d(a) / d(1) per pair; a pair whose d(1) <= MIN_END_DISTANCE gets a row of NaN.

    Such pairs (identical prompts, or outputs that barely move) are counted by `excluded`, never
    divided by: their "curve" would be round-off over round-off (docs/method.md §4, our deviation).

    Args:
        dist: d(a) per pair, shape [..., alphas].

    Returns:
        Same shape; r(1) = 1 exactly for every kept pair.
    """
    end = dist[..., -1:]
    return torch.where(end > MIN_END_DISTANCE, dist / end, torch.nan)


def excluded(dist: Tensor) -> Tensor:
    """Boolean mask [...] of pairs whose d(1) is too small to normalize by (see `relative`)."""
    return ~(dist[..., -1] > MIN_END_DISTANCE)


def max_slope(rel: Tensor) -> Tensor:
    """The reference's max slope s = (S - 1) * max_k (r_{k+1} - r_k) (docs/method.md §4).

    A straight line gives 1, a perfect one-interval step gives S - 1; s depends on S, so never
    compare slopes measured with different numbers of alphas.

    Args:
        rel: relative distances, shape [..., alphas].

    Returns:
        Shape [...]; NaN where the row is NaN.
    """
    steps = rel.shape[-1] - 1
    return steps * torch.diff(rel, dim=-1).amax(dim=-1)


def lipschitz_ratio(rel: Tensor) -> Tensor:
    """Lambda = max_k dr_k / mean(dr_0..dr_9) per pair (method.md §6.4); ~1 for a straight line."""
    increments = torch.diff(rel, dim=-1)
    return increments.amax(dim=-1) / increments[..., :LAMBDA_INCREMENTS].mean(dim=-1)


def logit_diff(diffs: Tensor) -> Tensor:
    """1 - n_k, n_k = (L_k - L_{S-1}) / (L_0 - L_{S-1}) (method.md §4.1): 0 at a = 0, 1 at a = 1.

    Args:
        diffs: L_k = logit[t_A] - logit[t_B] along the path, shape [..., alphas].

    Returns:
        Same shape; NaN for a pair whose endpoints agree (t_A == t_B gives L_k = 0 everywhere).
    """
    first, last = diffs[..., :1], diffs[..., -1:]
    return 1 - (diffs - last) / (first - last)


def median_curve(rel: Tensor) -> Tensor:
    """Elementwise median over pairs of r(a), ignoring excluded (NaN) pairs.

    `torch.nanmedian`, like the reference's `torch.median`, returns the lower middle value for an
    even count, so 99 pairs give the exact middle.

    Args:
        rel: shape [pairs, alphas].

    Returns:
        Shape [alphas]; NaN everywhere when no pair is kept.
    """
    return torch.nanmedian(rel, dim=0).values


def quartile_band(rel: Tensor) -> tuple[Tensor, Tensor]:
    """q25 and q75 of r(a) over pairs at each alpha, ignoring excluded (NaN) pairs.

    Args:
        rel: shape [pairs, alphas].

    Returns:
        Two tensors of shape [alphas]: the band drawn around `median_curve`.
    """
    levels = torch.tensor([QUARTILES[0], QUARTILES[-1]], dtype=rel.dtype)
    low, high = torch.nanquantile(rel, levels, dim=0)
    return low, high


def quartiles(values: Tensor) -> tuple[float, float, float]:
    """q25, median, q75 of the finite values (linear, as `torch.quantile`); NaN if none."""
    finite = values[torch.isfinite(values)].double()
    if finite.numel() == 0:
        return (math.nan, math.nan, math.nan)
    q = torch.quantile(finite, torch.tensor(QUARTILES, dtype=torch.float64))
    return (float(q[0]), float(q[1]), float(q[2]))


def plane(a: Tensor, b: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    """The plane through three write vectors (docs/method.md §5).

    Args:
        a: write vector of A, shape [..., d_model].
        b: write vector of B, same shape.
        c: write vector of C, same shape.

    Returns:
        t (shape [...]), the position of c's foot point on line AB, and u (shape [..., d_model]),
        c's offset orthogonal to AB, so that p(alpha, beta) = a + alpha (b - a) + beta u passes
        through a at (0, 0), b at (1, 0) and c at (t, 1).
    """
    a, b, c = wide(a), wide(b), wide(c)
    ab = b - a
    t = ((c - a) * ab).sum(-1) / (ab * ab).sum(-1)
    u = c - (a + t[..., None] * ab)
    return t, u


def map_grid(grid: int, span: tuple[float, float]) -> Tensor:
    """The region-map axis values g = linspace(span[0], span[1], grid), float32."""
    return torch.linspace(span[0], span[1], grid, dtype=torch.float32)


def plane_points(a: Tensor, b: Tensor, u: Tensor, axis: Tensor) -> Tensor:
    """All grid points p(alpha, beta) = a + alpha (b - a) + beta u of one plane.

    Args:
        a: write vector of A, shape [d_model].
        b: write vector of B, shape [d_model].
        u: C's offset orthogonal to AB, shape [d_model] (see `plane`).
        axis: grid values, shape [grid], used for both alpha and beta.

    Returns:
        Shape [grid (beta, top to bottom), grid (alpha, left to right), d_model], float32 (or
        float64): the
        reference's orientation (docs/method.md §5), row-major like the image it becomes.
    """
    a, b, u = wide(a), wide(b), wide(u)
    alpha = axis.to(a.dtype)[None, :, None]
    beta = axis.to(a.dtype)[:, None, None]
    return a + alpha * (b - a) + beta * u


def region_rgb(dist: Tensor) -> Tensor:
    """RGB = 1 - D / max(D) per channel over the whole grid (docs/method.md §5, Figure 1's colours).

    Args:
        dist: D_A, D_B, D_C, shape [..., 3, grid, grid].

    Returns:
        Shape [..., grid, grid, 3] in [0, 1]; an anchor's pixel is saturated in its own colour.
    """
    peak = dist.flatten(-2).amax(-1)[..., None, None]
    rgb = 1 - dist / torch.where(peak > 0, peak, 1.0)
    return rgb.movedim(-3, -1)


def frac_linear(rel: Tensor) -> float:
    """Fraction of kept pairs with Lambda < LINEAR_LAMBDA: inside one region (method.md §6.4)."""
    ratios = lipschitz_ratio(rel)
    kept = ratios[torch.isfinite(ratios)]
    return float((kept < LINEAR_LAMBDA).float().mean()) if kept.numel() else math.nan


def summary(
    random: tuple[Tensor, Tensor, Tensor, Tensor] | None,
    similar: Tensor | None = None,
    dissimilar: Tensor | None = None,
    maps: tuple[Tensor, Tensor, Tensor] | None = None,
) -> dict[str, float]:
    """The headline scalars of one snapshot, under docs/method.md §8's names (the TensorBoard tags).

    Args:
        random: (distance [P, K], relative [P, K], top_a [P], top_b [P]) of the random pairs,
            or None if not measured.
        similar: max slopes of the similar pairs, [n], or None.
        dissimilar: max slopes of the dissimilar pairs, [n], or None.
        maps: (rgb, anchors, axis) of the region maps (see `solid_fraction`), or None.

    Returns:
        `max_slope/median`, `max_slope/q25`, `max_slope/q75`, `max_slope/frac_linear`,
        `dist/d1_median`, `pairs/measured`, `pairs/excluded` for the random pairs;
        `max_slope/{similar,dissimilar}_{q25,median,q75}` and
        `max_slope/dissimilar_over_similar` (ratio of medians) for the labelled pairs;
        `align/auc` (see `alignment`) for the random pairs, with its two groups' sizes
        `align/differ_pairs` and `align/agree_pairs`; `maps/solid_fraction` (mean of
        `solid_fraction` over the maps).
    """
    out: dict[str, float] = {}
    if random is not None:
        dist, rel, top_a, top_b = random
        slopes = max_slope(rel)
        q25, med, q75 = quartiles(slopes)
        out |= {"max_slope/median": med, "max_slope/q25": q25, "max_slope/q75": q75}
        out["max_slope/frac_linear"] = frac_linear(rel)
        out["dist/d1_median"] = quartiles(dist[:, -1])[1]
        out["pairs/measured"] = float(len(dist))
        out["pairs/excluded"] = float(excluded(dist).sum())
        out["align/auc"] = alignment(slopes, top_a, top_b)
        kept = torch.isfinite(slopes)
        differ = int(((top_a != top_b) & kept).sum())
        out["align/differ_pairs"] = float(differ)  # the AUC's two groups: its noise
        out["align/agree_pairs"] = float(int(kept.sum()) - differ)
    for name, slopes in (("similar", similar), ("dissimilar", dissimilar)):
        if slopes is not None:
            q25, med, q75 = quartiles(slopes)
            out |= {
                f"max_slope/{name}_q25": q25,
                f"max_slope/{name}_median": med,
                f"max_slope/{name}_q75": q75,
            }
    if similar is not None and dissimilar is not None:
        out["max_slope/dissimilar_over_similar"] = (
            out["max_slope/dissimilar_median"] / out["max_slope/similar_median"]
        )
    if maps is not None:
        out["maps/solid_fraction"] = float(solid_fraction(*maps).mean())
    return out


# A map cell counts as "solid" when its colour is within this Chebyshev distance (max over RGB
# channels) of one anchor's colour: 0.1 is a tenth of the colour range, well above the round-off
# of the anchors themselves and below the gradient one grid step away from them at random init.
SOLID_MARGIN = 0.1


def solid_fraction(
    rgb: Tensor, anchors: Tensor, axis: Tensor, margin: float = SOLID_MARGIN
) -> Tensor:
    """Fraction of each map's cells whose colour is within `margin` of one of its anchors' colours.

    A smooth gradient (random init) has only discs round the anchors near an anchor's colour (a
    map whose distances grow linearly from each anchor scores about 0.1 at the default margin);
    solid regions (method.md §7.2 claim 6) fill large patches with it (up to 1). An anchor's colour
    is the map's colour at the pixel nearest to it (A and B sit on pixel centres at grid 25 or 37).

    Args:
        rgb: region-map colours, [maps, grid, grid, 3].
        anchors: (alpha, beta) of A, B, C per map, [maps, 3, 2].
        axis: the grid values, [grid].
        margin: the largest channel difference that still counts as the anchor's colour.

    Returns:
        Shape [maps], values in (0, 1].
    """
    col = (anchors[..., 0, None] - axis).abs().argmin(-1)  # [maps, 3] pixel column (alpha)
    row = (anchors[..., 1, None] - axis).abs().argmin(-1)  # [maps, 3] pixel row (beta)
    maps = torch.arange(len(rgb))[:, None]
    colours = rgb[maps, row, col]  # [maps, 3 anchors, 3 channels]
    gap = (rgb[:, :, :, None, :] - colours[:, None, None]).abs().amax(-1)  # [maps, g, g, anchors]
    return (gap.amin(-1) <= margin).float().flatten(1).mean(1)


def alignment(slopes: Tensor, top_a: Tensor, top_b: Tensor) -> float:
    """How well a pair's max slope predicts that A and B predict different next tokens (an AUC).

    The probability that a random pair whose clean top tokens differ has a larger max slope than a
    random pair whose top tokens agree (ties count half): 0.5 means slopes carry no information,
    1 means every crossing of a boundary changes the prediction (docs/method.md §7.2 claim 7). The
    Mann-Whitney U statistic normalized by the number of (differ, agree) comparisons.

    Args:
        slopes: max slope per pair, [P] (NaN pairs are skipped).
        top_a: A's clean top token per pair, [P].
        top_b: B's clean top token per pair, [P].

    Returns:
        The AUC, or NaN when either group is empty.
    """
    keep = torch.isfinite(slopes)
    differ = (top_a != top_b)[keep]
    values = slopes[keep].double()
    high, low = values[differ], values[~differ]
    if high.numel() == 0 or low.numel() == 0:
        return math.nan
    wins = (high[:, None] > low[None, :]).double() + 0.5 * (high[:, None] == low[None, :]).double()
    return float(wins.mean())


def emergence_onset(
    tokens: Sequence[float], medians: Sequence[float], init_q75: float
) -> float | None:
    """The first token count from which the median max slope stays above its init band.

    The init band is the interquartile range of the pairs' max slopes at initialization (the
    step-0 snapshot); the onset is the earliest snapshot whose median exceeds the band's top
    (`init_q75`) and after which every later median does too, so a single noisy point does not
    count. Snapshots without a median (NaN: every pair excluded) carry no information and are
    skipped. Which snapshot is the initialization, and keeping the onset as a run grows, is
    `regionwatch.onset`'s: the monitor, the report and `show` all go through it.

    Args:
        tokens: tokens seen of each snapshot, ascending.
        medians: median max slope of each snapshot (NaN or None: skipped).
        init_q75: q75 of the max slopes at initialization.

    Returns:
        The tokens of the onset snapshot, or None while the curve has not left the band for
        good, before a second snapshot, or without a finite `init_q75`.
    """
    series = [
        (t, m) for t, m in zip(tokens, medians, strict=True) if m is not None and math.isfinite(m)
    ]
    if len(series) < 2 or not math.isfinite(init_q75):  # noqa: PLR2004  (init + one more)
        return None
    onset = None
    for t, m in series:
        if m <= init_q75:
            onset = None
        elif onset is None:
            onset = t
    return onset
