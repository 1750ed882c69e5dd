"""1-D k-means palettization in pure numpy: exact DP on sorted runs, Lloyd polish, batched over rows."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from qconvert.quant.layout import to_rows

MAX_ITERATIONS = 300
NEAREST_CHUNK = 1 << 18  # values per search in `nearest`
SCALED_FIT_VALUES = 1 << 17  # a scaled palette's codebook is fitted on at most this many values
WEIGHT_FLOOR = 1e-6  # scaled palettes: the smallest weight of a value's error, relative to the largest
COMPARE_MAX = 31  # `nearest` compares with up to this many midpoints (5 bits), else searches
Side = Literal["left", "right"]


@dataclass(frozen=True)
class Palette:
    """A palettized tensor: `codebook[c, indices]` rebuilds row c of the weight (rows = channels); with
    `scale`, one shared codebook of normalised values, row c times scale[c]; with `owner`, fewer codebooks
    than rows, row c taking codebook[owner[c]]."""

    codebook: np.ndarray  # [C, K] (with scale: [1, K]; with owner: [B, K]), the weight's dtype, rows ascending
    indices: np.ndarray  # [C, n] uint8, < K
    scale: np.ndarray | None = None  # [C] float32 >= 0: per-channel scales over one codebook
    owner: np.ndarray | None = None  # [C] intp < B: each row's codebook (grouped palettes)

    def levels(self, dtype: type | None = None) -> np.ndarray:
        """[C, K]: the values each row can take (computed in `dtype`, default the codebook's)."""
        codebook = self.codebook.astype(dtype or self.codebook.dtype)
        if self.owner is not None:
            return codebook[self.owner]
        return codebook if self.scale is None else self.scale[:, None].astype(codebook.dtype) * codebook


def palettize(
    rows: np.ndarray, *, bits: int, max_points: int | None = None, weights: np.ndarray | None = None
) -> Palette:
    """Cluster each row of `rows` ([C, n] float) into 2**bits centroids minimising squared error.

    With `weights` ([C, n], > 0) the error of each value counts that many times: Σ w·(x − c)².
    The optimum is found exactly by dynamic programming over at most `max_points` runs of
    the sorted row (every value, when the row is that short), then polished by Lloyd iterations on all
    values. Rows with at most 2**bits distinct values are represented exactly. Deterministic.
    """
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if rows.ndim != 2 or rows.shape[1] == 0:
        raise ValueError(f"expected a non-empty [C, n] array, got shape {rows.shape}")
    if weights is not None and (weights.shape != rows.shape or not np.all(weights > 0)):
        raise ValueError("weights must be positive and shaped like rows")
    k = 1 << bits
    if weights is None:
        x, w = rows.astype(np.float64), None  # [C, n]
        x.sort(axis=1)
    else:
        order = np.argsort(rows, axis=1, kind="stable")
        x = np.take_along_axis(rows.astype(np.float64), order, axis=1)
        w = np.take_along_axis(weights.astype(np.float64), order, axis=1)
    centroids = np.empty((x.shape[0], k))
    distinct = 1 + np.count_nonzero(x[:, 1:] != x[:, :-1], axis=1)
    exact = distinct <= k
    for c in np.flatnonzero(exact):  # the palette is the set of values
        values = np.unique(x[c])
        centroids[c, : values.size] = values
        centroids[c, values.size :] = values[-1]
    if not exact.all():
        rest = ~exact
        budget = max_points or default_max_points(bits, int(np.sum(rest)))
        every = bool(rest.all())  # then x itself is clustered (and used up), not a copy
        centroids[rest] = _cluster(x if every else x[rest], w if every or w is None else w[rest], k, budget)

    del x, w
    codebook = np.sort(centroids, axis=1).astype(rows.dtype)  # rounded to what will be stored
    return Palette(codebook=codebook, indices=nearest(rows, codebook))


def palettize_scaled(
    array: np.ndarray, bits: int, axis: int, importance: np.ndarray | None = None, max_points: int | None = None
) -> Palette:
    """One codebook for the rows along `axis` divided by their scales (each row's largest magnitude), so
    that 4 bytes per channel buy the channels' own ranges (per-channel codebooks cost 2**bits values each).
    A row's squared error counts its scale squared, and `importance` as in `palettize_tensor`."""
    rows = to_rows(array, axis)
    scale = np.max(np.abs(rows), axis=1).astype(np.float32)  # 0 for a row of zeros, which stays exact
    divisor = np.where(scale > 0, scale, 1)
    square = divisor.astype(np.float64) ** 2  # float64: a huge channel's square would overflow float32
    weights = np.empty(rows.shape, np.float32)
    weights[:] = (square / square.max())[:, None]
    if importance is not None:
        weights *= to_rows(np.broadcast_to(importance, array.shape), axis)
        weights /= weights.max()
    np.maximum(weights, WEIGHT_FLOOR, out=weights)  # a dead channel still counts a little
    normalised = (rows / divisor[:, None]).astype(rows.dtype).reshape(1, -1)
    flat = weights.reshape(1, -1)
    if normalised.size > SCALED_FIT_VALUES:  # the codebook from a seeded sample; every value then takes its nearest
        picked = np.sort(np.random.default_rng(0).choice(normalised.size, SCALED_FIT_VALUES, replace=False))
        codebook = palettize(normalised[:, picked], bits=bits, weights=flat[:, picked], max_points=max_points).codebook
        return Palette(codebook, nearest(normalised, codebook).reshape(rows.shape), scale)
    shared = palettize(normalised, bits=bits, weights=flat, max_points=max_points)
    return Palette(shared.codebook, shared.indices.reshape(rows.shape), scale)


def palettize_grouped(
    array: np.ndarray,
    bits: int,
    axis: int,
    size: int,
    importance: np.ndarray | None = None,
    max_points: int | None = None,
) -> Palette:
    """One codebook per `size` channels along `axis`: the channels sorted by their largest magnitude and cut
    into ceil(C / size) groups of near-equal count, so that each codebook serves channels of like range."""
    rows = to_rows(array, axis)
    weights = None if importance is None else to_rows(np.broadcast_to(importance, array.shape), axis)
    groups = -(-rows.shape[0] // size)
    order = np.argsort(np.max(np.abs(rows), axis=1), kind="stable")
    owner = np.empty(rows.shape[0], np.intp)
    codebook = np.empty((groups, 1 << bits), rows.dtype)
    members = np.array_split(order, groups)  # the longer groups first: at most two lengths
    for length in sorted({m.size for m in members}, reverse=True):
        picked = [g for g, m in enumerate(members) if m.size == length]
        channels = np.concatenate([members[g] for g in picked])
        fitted = palettize(
            rows[channels].reshape(len(picked), -1),
            bits=bits,
            weights=None if weights is None else weights[channels].reshape(len(picked), -1),
            max_points=max_points,
        )
        codebook[picked] = fitted.codebook
        owner[channels] = np.repeat(picked, length)
    return Palette(codebook, nearest(rows, codebook[owner]), owner=owner)


def palettize_tensor(array: np.ndarray, bits: int, axis: int | None, importance: np.ndarray | None = None) -> Palette:
    """`palettize` of a whole weight: one codebook, or one per slice along `axis` (a process-pool job).

    `importance` (broadcastable to the array, > 0) weighs each value's squared error.
    """
    weights = None if importance is None else to_rows(np.broadcast_to(importance, array.shape), axis)
    return palettize(to_rows(array, axis), bits=bits, weights=weights)


def _cluster(x: np.ndarray, w: np.ndarray | None, k: int, max_points: int) -> np.ndarray:
    """Optimal centroids ([C, k]) of sorted rows ([C, n], used up: centred, then overwritten) with
    weights w (None: all 1): DP over runs, then Lloyd on every value. Holds about two copies of x at a
    time: the full running sums are kept for the first moment only."""
    x_shift = x.mean(axis=1, keepdims=True)  # centred sums keep the DP's variance terms accurate
    x -= x_shift
    cuts = _run_cuts(x, max_points)
    few = cuts.size - 1 <= k  # no more runs than clusters: each run starts as its own cluster
    if not few:  # each temporary is gone before the next: x and one more copy at a time
        squares = np.square(x) if w is None else np.square(x) * w
        prefix_sq = np.zeros((x.shape[0], cuts.size))  # running sums of squares at the cuts only
        np.cumsum(np.add.reduceat(squares, cuts[:-1], axis=1), axis=1, out=prefix_sq[:, 1:])
        del squares
    counts = None if w is None else _prefix(w)  # running weight; None: the position itself
    prefix = _prefix(x if w is None else x * w)
    if few:
        bounds = np.broadcast_to(cuts, (x.shape[0], cuts.size))
    else:
        run_counts = cuts.astype(np.float64) if counts is None else counts[:, cuts]
        bounds = cuts[optimal_bounds(run_counts, prefix[:, cuts], prefix_sq, k)]
    centroids = _lloyd(x, counts, prefix, bounds) + x_shift
    if centroids.shape[1] < k:  # fewer runs than centroids: repeat the largest
        centroids = np.pad(centroids, ((0, 0), (0, k - centroids.shape[1])), mode="edge")
    return centroids


def default_max_points(bits: int, rows: int, budget: int = 1 << 21) -> int:
    """How many runs per row the exact DP sees: the most whose estimated work fits `budget` evaluations.

    Measured against the exact optimum (Laplacian weights, after the Lloyd polish): per tensor, 4096
    runs at 4 bits are exact, 1024 at 8 bits cost 1-3 % more error; per channel, 64-128 runs at 4 bits
    cost 0.3-1 %.
    """
    k = 1 << bits
    layers = np.arange(1, k)
    for m in (4096, 2048, 1024, 512, 256, 128, 64, 32):
        work = rows * np.minimum(2 * m * np.log2(m), m * m / (2 * layers)).sum()
        if work <= budget and m > k:
            return m
    return k  # too much work for the DP: k runs seed Lloyd directly


def nearest(rows: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest codebook entry ([C, K], rows sorted) for each value of `rows` ([C, n]): the
    number of midpoints between neighbouring entries that lie below the value (a tie goes to the lower).

    Small codebooks count with one comparison per midpoint over all rows, in the values' own float type
    (each midpoint taken down to the largest value of that type at or below it, which decides alike);
    larger ones search each row exactly (a banded single search loses ties when a row spans ~1e16).
    """
    cb = codebook.astype(np.float64)
    mids = (cb[:, 1:] + cb[:, :-1]) / 2  # [C, K-1]
    if mids.shape[1] <= COMPARE_MAX and rows.dtype in (np.float16, np.float32, np.float64):
        below = mids.astype(rows.dtype)
        below = np.where(below.astype(np.float64) > mids, np.nextafter(below, rows.dtype.type(-np.inf)), below)
        count = np.zeros(rows.shape, np.uint8)
        above = np.empty(rows.shape, bool)
        for k in range(mids.shape[1]):
            np.greater(rows, below[:, k : k + 1], out=above)
            count += above
        return count
    out = np.empty(rows.shape, np.uint8)
    for c in range(rows.shape[0]):
        for start in range(0, rows.shape[1], NEAREST_CHUNK):  # in pieces: no float64 copy of a whole row
            piece = slice(start, start + NEAREST_CHUNK)
            out[c, piece] = np.searchsorted(mids[c], rows[c, piece].astype(np.float64), side="left")
    return out


def reconstruct(palette: Palette) -> np.ndarray:
    """The [C, n] tensor the palette stands for (the inverse of `palettize`)."""
    return np.take_along_axis(palette.levels(), palette.indices.astype(np.intp), axis=1)


def _run_cuts(x: np.ndarray, max_points: int) -> np.ndarray:
    """Positions cutting the sorted rows ([C, n]) into at most `max_points` runs, shared by all rows.

    Half the cuts are equal-count (dense centre), half equal-width (sparse tails, where a k-means
    centroid may sit on a handful of values); short rows keep every value as its own run.
    """
    n = x.shape[1]
    if n <= max_points:
        return np.arange(n + 1)
    half = max_points // 2
    by_count = np.round(np.linspace(0, n, half + 1)).astype(np.intp)
    levels = np.linspace(x[:, 0], x[:, -1], half + 1, axis=1)[:, 1:-1]  # [C, half - 1]
    by_width = np.round(np.median(_rowwise_searchsorted(x, levels, side="left"), axis=0)).astype(np.intp)
    return np.unique(np.concatenate([by_count, by_width]))


def _prefix(x: np.ndarray) -> np.ndarray:
    """[C, n] -> [C, n + 1] running sums starting at 0."""
    out = np.zeros((x.shape[0], x.shape[1] + 1))
    np.cumsum(x, axis=1, out=out[:, 1:])
    return out


def optimal_bounds(weight: np.ndarray, total: np.ndarray, total_sq: np.ndarray, k: int) -> np.ndarray:
    """Exact weighted 1-D k-means over sorted points, by dynamic programming, batched over rows.

    weight: [m + 1] (or [C, m + 1]) running count (or weight) of values; total, total_sq: [C, m + 1]
    running (weighted) sums of the values and of their squares. Returns [C, k + 1] cluster bounds as
    point positions (0 first, m last).

    cost(i, j) is the squared error of one cluster holding points i..j-1, and layer c of the DP is
    best_c(j) = min over i of best_{c-1}(i) + cost(i, j). The optimal i, opt_c(j), never decreases with
    j nor with c (1-D k-means is monotone), so a layer is solved either by divide and conquer over j
    (O(m log m)) or, once clusters are small, by scanning i in [opt_{c-1}(j), j) for every j at once.
    All rows and all pending sub-ranges go through numpy together.
    """
    c_count, m = total.shape[0], total.shape[1] - 1
    k = min(k, m)
    rows = np.arange(c_count)
    weight = np.broadcast_to(weight, total.shape)
    flat_total, flat_total_sq = total.ravel(), total_sq.ravel()  # 1-D takes beat 2-D fancy indexing
    flat_weight = weight.ravel()

    def cost(base: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        s = flat_total[base + j] - flat_total[base + i]
        return (flat_total_sq[base + j] - flat_total_sq[base + i]) - s * s / (
            flat_weight[base + j] - flat_weight[base + i]
        )

    best = np.full((c_count, m + 1), np.inf)
    best[:, 1:] = total_sq[:, 1:] - total[:, 1:] ** 2 / weight[:, 1:]
    choice = np.zeros((k, c_count, m + 1), np.int32)
    divide_cost = 2 * c_count * m * max(1, int(np.log2(m)))
    for layer in range(1, k):
        new_best = np.full_like(best, np.inf)
        # A task asks, for row r, the best i for every j in [j_lo, j_hi], knowing it is in [i_lo, i_hi].
        j_all = np.arange(layer + 1, m + 1)
        floor = np.maximum(choice[layer - 1][:, layer + 1 :], layer)  # opt_{c-1}(j) <= opt_c(j)
        if int(np.sum(j_all - floor)) <= divide_cost:  # scan: one task per (row, j)
            r_task = np.repeat(rows, j_all.size)
            j_lo = j_hi = np.tile(j_all, c_count)
            i_lo, i_hi = floor.ravel(), j_lo - 1
        else:  # divide and conquer over j
            r_task = rows
            j_lo, j_hi = np.full(c_count, layer + 1), np.full(c_count, m)
            i_lo, i_hi = np.full(c_count, layer), np.full(c_count, m - 1)
        while r_task.size:
            j_mid = (j_lo + j_hi) >> 1
            lengths = np.minimum(i_hi, j_mid - 1) - i_lo + 1
            starts = np.zeros_like(lengths)
            np.cumsum(lengths[:-1], out=starts[1:])
            task = np.repeat(np.arange(lengths.size), lengths)
            flat = np.arange(task.size)
            i = i_lo[task] + flat - starts[task]
            base = r_task[task] * (m + 1)
            value = best.ravel()[base + i] + cost(base, i, j_mid[task])
            low = np.minimum.reduceat(value, starts)
            first = np.minimum.reduceat(np.where(value <= low[task], flat, task.size), starts)
            arg = i[first]
            new_best[r_task, j_mid] = low
            choice[layer, r_task, j_mid] = arg
            left, right = j_lo < j_mid, j_mid < j_hi
            r_task = np.concatenate([r_task[left], r_task[right]])
            j_lo, j_hi = np.concatenate([j_lo[left], j_mid[right] + 1]), np.concatenate([j_mid[left] - 1, j_hi[right]])
            i_lo, i_hi = np.concatenate([i_lo[left], arg[right]]), np.concatenate([arg[left], i_hi[right]])
        best = new_best
    bounds = np.zeros((c_count, k + 1), np.intp)
    bounds[:, k] = m
    for layer in range(k - 1, 0, -1):
        bounds[:, layer] = choice[layer, rows, bounds[:, layer + 1]]
    return bounds


def _lloyd(x: np.ndarray, counts: np.ndarray | None, prefix: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Lloyd iterations on sorted rows (overwritten) from the given cluster bounds; returns [C, K] centroids.

    counts: running weight ([C, n + 1]) of the values, None for unweighted (the count is the position);
    prefix: running weighted sums.

    In 1-D a cluster is a run of the sorted values bounded by midpoints between neighbouring centroids,
    so each step is a binary search per boundary plus prefix-sum differences: O(C·K·log n).
    """
    c_count, n = x.shape
    row = np.arange(c_count)[:, None]
    bands = _Bands(x[:, 0].copy(), x[:, -1].copy())
    keys = bands.keys(x, out=x)
    centroids = np.zeros((c_count, bounds.shape[1] - 1))
    for _ in range(MAX_ITERATIONS):
        mass = np.diff(bounds if counts is None else counts[row, bounds], axis=1)
        sums = np.diff(prefix[row, bounds], axis=1)
        # An empty cluster keeps its centroid; Lloyd never increases the error either way.
        centroids = np.where(mass > 0, sums / np.where(mass > 0, mass, 1), centroids)
        mids = (centroids[:, 1:] + centroids[:, :-1]) / 2
        inner = bands.search(keys, mids, side="right")  # ties go to the lower cluster
        new_bounds = np.concatenate([bounds[:, :1], inner, bounds[:, -1:]], axis=1)
        if np.array_equal(new_bounds, bounds):
            break
        bounds = new_bounds
    return centroids


class _Bands:
    """Maps row c's values monotonically into its own band [4c, 4c + 1] of one flat float64 axis.

    One flat `np.searchsorted` then serves all rows at once; float64 keeps float32 neighbours apart in
    bands up to c ~ 10^6.
    """

    def __init__(self, lo: np.ndarray, hi: np.ndarray) -> None:  # [C] each
        self.lo = lo[:, None]
        self.span = np.where(hi > lo, hi - lo, 1.0)[:, None]
        self.band = 4.0 * np.arange(lo.shape[0])[:, None]

    def keys(self, values: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """[C, m] values -> [C * m] sorted-compatible keys (values outside [lo, hi] are clamped);
        `out` may be `values` itself."""
        keys = np.subtract(values, self.lo, out=out)  # in place from here: one array as large as the values
        keys /= self.span
        np.clip(keys, 0.0, 1.0, out=keys)
        keys += self.band
        return keys.ravel()

    def search(self, sorted_keys: np.ndarray, queries: np.ndarray, *, side: Side) -> np.ndarray:
        """Row-local positions ([C, q]) of `queries` among the rows whose keys are `sorted_keys`."""
        rows, per_row = queries.shape[0], sorted_keys.size // queries.shape[0]
        found = np.searchsorted(sorted_keys, self.keys(queries), side=side).reshape(queries.shape)
        return found - per_row * np.arange(rows)[:, None]


def _rowwise_searchsorted(sorted_rows: np.ndarray, queries: np.ndarray, *, side: Side) -> np.ndarray:
    """`np.searchsorted` row by row: [C, m] sorted rows, [C, q] queries -> [C, q] positions."""
    lo = np.minimum(sorted_rows[:, 0], queries.min(axis=1))
    hi = np.maximum(sorted_rows[:, -1], queries.max(axis=1))
    bands = _Bands(lo, hi)
    return bands.search(bands.keys(sorted_rows), queries, side=side)
