"""Exact and near-duplicate images → duplicate groups, so copies never straddle folds.

A copy of a training image in the validation fold inflates every validation figure
(accuracy, recall@k, calibration). :func:`duplicate_groups` gives each image a group
id such that byte-identical files (same SHA-1) and perceptually near-identical images
share a group; a group-aware splitter (scikit-learn's ``StratifiedGroupKFold``) then
keeps each group inside one fold. :func:`group_report` lists the groups for review.

Hash and threshold (measured, not guessed)
    64-bit pHash (``imagehash.phash``: grayscale, 32x32 Lanczos resize, 8x8 lowest
    DCT frequencies, 1 bit per coefficient above their median); two images are near
    duplicates when their hashes differ in at most ``max_distance`` bits, by default
    ``DEFAULT_MAX_DISTANCE`` = 4 (the workflow's ``duplicates.max_distance``). pHash
    nearly always sets exactly 32 bits, so distances are even: 8 acts like 9.

    Why 4: it catches 97-100 % of JPEG re-compressions, resizes and brightness changes
    and makes no false groups on the digits demo (88 of 1,797 images grouped, largest
    group 5, no group across classes); 8 catches 92-97 % of all near copies (crops and
    shifts too) on photos but joins 824 of the 1,797 digits into groups.

    Measured (distance <= 8, share of pairs) on 96-192 px natural-looking images
    (crops of scikit-learn's two sample photos; procedural 1/f textures with shapes,
    stripes, gradients) and on the 32 px digits demo images:

    * caught: JPEG re-compression q50-q95, resize 50-200 %, brightness +-10 %,
      contrast +15 %, grayscale copy, resize 50 % + JPEG q75: 97-100 %; centre crop
      2 %: 83-97 %.
    * partly caught: centre crop 5 %: 81-97 %; shift by cutting 3 % off one corner:
      68-83 %; 5 %: 20-38 %.
    * not caught: mirror images and 90 degree rotations (0 %), 5 degree rotations
      (6-67 %), crops or shifts of 10-20 % (0-13 %), borders, overlays, collages.
      Such copies still leak across folds.
    * false matches: none among ~180,000 pairs of distinct natural-looking images
      (600 textures and 104 photo crops; closest distinct pair 16 bits apart), up to
      distance 10. But digits-like images (8x8 scans upscaled to 32 px: little
      detail, one stroke on a blank field) collide: 0.25 % of same-digit pairs at
      distance <= 6, 0.9 % at <= 8, and since groups are transitive, 8 joins 824 of
      the 1,797 demo digits into groups of up to 142 (6: 371 images, largest 71;
      4: 88, largest 5; 2: 6 images). Use ``max_distance`` <= 2 or -1 for such data.
      Blank images always match: every flat image hashes to ``0`` or ``1 << 63``.

    Group level (every near copy joined to its source, 7 edits per image): 96.7 %
    (textures) and 95.2 % (photo crops) at 8, against 92.7 % at 6 and 97-98.5 % at 10.
    pHash beat dHash (46 % false matches among same-digit pairs at 8, weaker on
    JPEG) and wHash (more crops caught, but at 8 it matched 2 % of crop pairs from the two
    different photos and 62 % of same-digit pairs).

Pixel check of every pHash pair (``min_correlation``)
    pHash alone is no evidence of copying on low-detail images, and groups are transitive,
    so false pairs chain. Measured on Fashion-MNIST's 60,000 training images (28 px
    silhouettes): identical pHashes already pair images whose pixels differ by 14.8 of 255
    (median); at distance 4 the pairs join 17,281 images into groups, one of 9,150 spanning
    every class, and dropping label conflicts removed 14,248 images. So a pHash pair is only
    a candidate: it counts when the two images' 32x32 grayscale thumbnails also correlate
    (Pearson) at ``min_correlation`` or more (:class:`PixelCheck`; ``DEFAULT_MIN_CORRELATION``
    = 0.99, config ``duplicates.min_correlation``; ``None`` skips the check).

    Why 0.99, measured: on Fashion-MNIST (distance 4) it leaves 213 pairs (float32), 358 grouped
    images, largest group 7, 9 images in label conflicts (0.98: largest group 96, 337 in
    conflicts; 0.995: 126 grouped, none in conflicts); of the 48 pairs whose pixels differ by
    <= 4/255 on average (real copies) it keeps 45. On 100 photo crops (96-192 px, scikit-learn's
    sample photos) it keeps what pHash caught of JPEG q75 (98 % of copies), resizes 50-200 %
    (98-100 %), brightness -10 % (99 %), contrast +15 % (98 %), grayscale (100 %); fewer of JPEG
    q50 (95 %), brightness +10 % (91 %: clipped highlights) and 2 % crops (62 %, against 80 %
    caught by pHash alone). No two distinct crops correlate above 0.914. For detailed photos
    0.95 keeps 95 % of 2 % crops and still matches no distinct crop; for low-detail images
    (digits, silhouettes, icons) keep 0.99 or raise it. A flat image (grayscale std below one
    level) correlates with nothing: byte-identical copies of it still group by SHA-1.

Search without all pairs
    :func:`near_pairs` is an exact multi-index hash search (Norouzi et al., "Fast
    search in Hamming space with multi-index hashing", CVPR 2012): the 64 bits are cut
    into ``k`` chunks; two hashes within distance ``d`` must agree to within
    ``d // k`` bits on at least one chunk (generalised pigeonhole), so only hashes in
    the same or nearby chunk buckets are compared, and every candidate is checked on
    the full 64 bits. ``k`` is chosen per call from the number of hashes and ``d``.
"""

from __future__ import annotations

import math
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from labelflow.images import load_image, phash_pixels

PathLike = str | os.PathLike[str]

HASH_BITS = 64

DEFAULT_MAX_DISTANCE = 4
"""Hamming distance (of 64 bits) up to which two pHashes count as near duplicates.

Safe on low-detail images such as the digits demo and enough for re-compressed, resized
or re-exposed copies (see the module docstring for the measurements). For photographs
and other detailed images of 64 px or more, 8 also catches small crops and shifts; on
digits-like images 8 joins unrelated images into large groups.
"""

DEFAULT_MIN_CORRELATION = 0.99
"""Pearson correlation of two images' 32x32 grayscale thumbnails from which a pHash pair is a
near copy (see "Pixel check" in the module docstring for the measurements)."""

THUMBNAIL_SIZE = 32

# Cap on candidate pairs expanded at once in near_pairs (two int64 arrays of this
# length plus temporaries, about 100 MB), so memory does not grow with the data set.
_MAX_CANDIDATES_PER_BATCH = 2_000_000

# Chunk widths up to this many bits may get a direct-addressed bucket table (2**22
# int64 offsets = 32 MB); wider chunks are looked up by binary search instead.
_MAX_TABLE_BITS = 22

# Rough cost, in "candidate checks", of one Python-level loop step over all queries;
# keeps the chunk planner from choosing thousands of flip masks for a few hashes.
_COST_PER_FLIP_MASK = 2_000


# --------------------------------------------------------------------------- hashing


def perceptual_hash(image: PathLike | np.ndarray) -> int | None:
    """64-bit pHash of an image file or of a decoded image array, as a Python ``int``.

    A path is decoded with :func:`labelflow.images.load_image` (EXIF orientation
    applied, transparency composited onto black, first frame of a GIF/TIFF), the same
    pixels training sees. An array must be ``uint8`` ``H x W x 3`` RGB (what
    ``load_image`` returns) or ``H x W`` grayscale; pass the array when the image is
    already decoded, so a scan decodes each file once.

    Returns ``None`` when the file cannot be read or decoded (missing, not an image,
    truncated, unsupported mode): like :func:`labelflow.images.check_image`, one bad
    file must not stop a scan of a million, and :func:`duplicate_groups` treats a
    ``None`` hash as "exact duplicates only". Raises ``TypeError``/``ValueError`` for
    an argument that is neither a path nor a suitable array (a caller bug).

    The bits are the ``imagehash`` 8x8 boolean matrix read row by row, most
    significant bit first, so ``f"{h:016x}"`` equals ``str(imagehash.phash(...))``.
    Store hashes in CSV files as that 16-digit hex string: pandas would turn a column
    of large integers with gaps into floats and lose bits.
    """
    if isinstance(image, np.ndarray):
        return phash_pixels(image)
    if not isinstance(image, (str, os.PathLike)):
        raise TypeError(
            f"perceptual_hash needs a path or a numpy array, got {type(image).__name__}"
        )
    try:
        if not stat.S_ISREG(os.stat(image).st_mode):
            return None  # opening a FIFO or device could block forever
        pixels = load_image(image)
    except Exception:  # noqa: BLE001 - Pillow fails with many exception types
        return None
    return phash_pixels(pixels)


def hamming_distance(a: np.ndarray | int, b: np.ndarray | int) -> np.ndarray:
    """Element-wise number of differing bits between 64-bit hashes."""
    return np.bitwise_count(np.bitwise_xor(np.asarray(a, np.uint64), np.asarray(b, np.uint64)))


def pixel_thumbnail(pixels: np.ndarray) -> np.ndarray:
    """``THUMBNAIL_SIZE``\u00b2 grayscale of a ``uint8`` image, centred and scaled to unit
    length (float32): the dot product of two is their pixels' Pearson correlation. A flat
    image (std below one gray level) gives zeros, which correlate with nothing."""
    from PIL import Image

    gray = Image.fromarray(np.ascontiguousarray(pixels)).convert("L")
    small = gray.resize((THUMBNAIL_SIZE, THUMBNAIL_SIZE), Image.Resampling.BILINEAR)
    vector = np.asarray(small, dtype=np.float32).ravel()
    vector = vector - vector.mean()
    norm = float(np.linalg.norm(vector))
    if norm < np.sqrt(vector.size):  # std < 1 gray level
        return np.zeros_like(vector)
    return vector / norm


class PixelCheck:
    """Confirms candidate pairs of rows on their pixels: thumbnails correlating at
    ``min_correlation`` or more (:func:`pixel_thumbnail`). ``files[i]`` is row i's image.

    Only rows that take part in a candidate pair are decoded, once each; their thumbnails are
    kept as float16 (2 KB per such row: 35 MB for Fashion-MNIST's 17,281 candidates of 60,000;
    the correlation changes by < 1e-3); an unreadable file confirms nothing.
    """

    def __init__(self, files: Sequence[PathLike], min_correlation: float = DEFAULT_MIN_CORRELATION):
        self.files = list(files)
        self.min_correlation = float(min_correlation)
        self._thumbnails: dict[int, np.ndarray] = {}
        self.decoded = 0

    def _thumbnail(self, row: int) -> np.ndarray:
        found = self._thumbnails.get(row)
        if found is None:
            try:
                found = pixel_thumbnail(load_image(self.files[row])).astype(np.float16)
            except Exception:  # noqa: BLE001 - Pillow fails with many exception types
                found = np.zeros(THUMBNAIL_SIZE * THUMBNAIL_SIZE, dtype=np.float16)
            self._thumbnails[row] = found
            self.decoded += 1
        return found

    def correlation(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        """Pearson correlation of each pair's thumbnails (0 where either is flat or unreadable)."""
        rows = np.unique(np.concatenate([first, second]))
        table = np.stack([self._thumbnail(int(r)) for r in rows]) if len(rows) else np.empty((0, THUMBNAIL_SIZE**2))
        a, b = np.searchsorted(rows, first), np.searchsorted(rows, second)
        result = np.empty(len(first), dtype=np.float32)
        step = 16_384  # pairs per product: two 64 MB gathers, whatever the number of pairs
        for start in range(0, len(first), step):
            part = slice(start, start + step)
            result[part] = np.einsum("ij,ij->i", table[a[part]].astype(np.float32), table[b[part]].astype(np.float32))
        return result

    def __call__(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return self.correlation(first, second) >= self.min_correlation


# --------------------------------------------------------------------------- near pairs


def near_pairs(
    hashes: np.ndarray | Sequence[int], max_distance: int, n_chunks: int | None = None
) -> np.ndarray:
    """Every index pair ``(i, j)``, ``i < j``, with ``hamming_distance <= max_distance``.

    Exact (the same pairs an all-pairs comparison finds) but without comparing all
    pairs: see "Search without all pairs" in the module docstring. Returns an
    ``(n_pairs, 2)`` int64 array sorted by ``i`` then ``j``. Work grows with the number
    of candidate pairs, near-linear for spread-out hashes; a chunk value shared by a
    large fraction of the hashes (say, thousands of nearly blank images that differ
    only in noise) makes it quadratic within that bucket, in bounded memory.

    ``n_chunks`` (1..64) overrides the chunk count chosen from an estimate of the work;
    any count gives the same pairs, only the time differs.
    """
    values = np.asarray(hashes, dtype=np.uint64).ravel()
    _check_max_distance(max_distance)
    if n_chunks is not None and not 1 <= n_chunks <= HASH_BITS:
        raise ValueError(f"n_chunks must be in 1..{HASH_BITS} or None, got {n_chunks!r}")
    if max_distance < 0 or len(values) < 2:
        return np.empty((0, 2), dtype=np.int64)
    found: list[np.ndarray] = []
    for shift, width, radius in _chunk_plan(len(values), max_distance, n_chunks):
        chunk = ((values >> np.uint64(shift)) & np.uint64((1 << width) - 1)).astype(np.int64)
        found += _pairs_via_chunk(values, chunk, width, radius, max_distance)
    if not found:
        return np.empty((0, 2), dtype=np.int64)
    pairs = np.concatenate(found)
    pairs = np.sort(pairs, axis=1)  # (smaller index, larger index)
    # The same pair can be found through several chunks; keep it once.
    codes = np.unique(pairs[:, 0] * len(values) + pairs[:, 1])
    return np.stack([codes // len(values), codes % len(values)], axis=1)


def _check_max_distance(max_distance: int) -> None:
    if isinstance(max_distance, bool) or not isinstance(max_distance, (int, np.integer)):
        raise TypeError(f"max_distance must be an integer, got {max_distance!r}")
    if max_distance > HASH_BITS // 2:
        raise ValueError(
            f"max_distance={max_distance} is more than half of the {HASH_BITS} hash bits; "
            "unrelated images would match. Use a value in -1..32 (default "
            f"{DEFAULT_MAX_DISTANCE}; -1 = exact duplicates only)"
        )


ChunkPlan = list[tuple[int, int, int]]  # (bit shift, width, search radius) per chunk


def _chunk_plan(n_hashes: int, max_distance: int, n_chunks: int | None = None) -> ChunkPlan:
    """The searched chunks for ``n_chunks`` chunks, or for the cheapest count if None."""
    counts = [n_chunks] if n_chunks else range(1, min(max_distance + 1, HASH_BITS) + 1)
    return min((_plan_for(k, max_distance) for k in counts), key=lambda p: _plan_cost(p, n_hashes))


def _plan_for(n_chunks: int, max_distance: int) -> ChunkPlan:
    """Chunks and radii that cannot miss a pair within ``max_distance``.

    With ``d = k * r + a`` (``0 <= a < k``), a pair within distance ``d`` is within
    ``r`` on one of the first ``a + 1`` chunks or within ``r - 1`` on one of the rest
    (else the chunks would add up to more than ``d``), so the rest search one bit less
    and chunks with radius -1 are not searched at all.
    """
    radius, extra = divmod(max_distance, n_chunks)
    widths = [HASH_BITS // n_chunks + (j < HASH_BITS % n_chunks) for j in range(n_chunks)]
    shifts = [sum(widths[:j]) for j in range(n_chunks)]
    radii = [radius if j <= extra else radius - 1 for j in range(n_chunks)]
    return [(s, w, r) for s, w, r in zip(shifts, widths, radii) if r >= 0]


def _plan_cost(plan: ChunkPlan, n_hashes: int) -> float:
    """Estimated work for uniformly spread hashes: table build, probes, bucket hits."""
    cost = 0.0
    for _, width, radius in plan:
        masks = sum(math.comb(width, i) for i in range(radius + 1))
        table = _uses_table(width, n_hashes)
        cost += (1 << width) if table else n_hashes * math.log2(n_hashes)
        cost += masks * (n_hashes * (1.0 if table else math.log2(n_hashes)) + _COST_PER_FLIP_MASK)
        cost += masks * n_hashes * n_hashes / 2.0 ** (width + 1)  # expected candidates
    return cost


def _uses_table(width: int, n_hashes: int) -> bool:
    """Direct bucket table for this chunk width? Only when it is small next to the data."""
    return width <= _MAX_TABLE_BITS and (1 << width) <= 16 * n_hashes


def _flip_masks(width: int, radius: int) -> Iterator[int]:
    """Every ``width``-bit value with at most ``radius`` bits set, starting with 0."""
    for n_flipped in range(radius + 1):
        for bits in combinations(range(width), n_flipped):
            yield sum(1 << b for b in bits)


def _pairs_via_chunk(
    values: np.ndarray, chunk: np.ndarray, width: int, radius: int, max_distance: int
) -> list[np.ndarray]:
    """Verified pairs whose chunk values differ in at most ``radius`` bits."""
    order = np.argsort(chunk, kind="stable")
    sorted_chunk = chunk[order]
    bucket_bounds = _bucket_lookup(sorted_chunk, width)
    position = np.empty(len(chunk), dtype=np.int64)
    position[order] = np.arange(len(chunk))
    found = []
    for flip in _flip_masks(width, radius):
        probe = chunk ^ flip
        if flip == 0:
            # Same bucket: pair each hash only with those sorted after it.
            queries = np.arange(len(chunk))
            _, end = bucket_bounds(chunk)
            start = position + 1
        else:
            # Buckets `c` and `c ^ flip` see each other; search from the smaller side only.
            queries = np.flatnonzero(chunk < probe)
            start, end = bucket_bounds(probe[queries])
        found += _verified_candidates(values, queries, start, end, order, max_distance)
    return found


def _bucket_lookup(
    sorted_chunk: np.ndarray, width: int
) -> Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Function giving, per chunk value, the ``[start, end)`` range in ``sorted_chunk``."""
    if _uses_table(width, len(sorted_chunk)):
        # Direct table: O(1) per probe, and probes outnumber hashes by the flip masks.
        offsets = np.zeros((1 << width) + 1, dtype=np.int64)
        np.cumsum(np.bincount(sorted_chunk, minlength=1 << width), out=offsets[1:])
        return lambda probes: (offsets[probes], offsets[probes + 1])
    return lambda probes: (
        np.searchsorted(sorted_chunk, probes, side="left"),
        np.searchsorted(sorted_chunk, probes, side="right"),
    )


def _verified_candidates(
    values: np.ndarray,
    queries: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    order: np.ndarray,
    max_distance: int,
) -> list[np.ndarray]:
    """Expand each query's bucket range into candidate pairs, keep those within distance."""
    counts = np.maximum(end - start, 0)
    has_any = counts > 0
    queries, start, counts = queries[has_any], start[has_any], counts[has_any]
    if len(queries) == 0:
        return []
    cumulative = np.cumsum(counts)
    # Cut the queries into batches of about _MAX_CANDIDATES_PER_BATCH candidates.
    cuts = np.searchsorted(
        cumulative, np.arange(_MAX_CANDIDATES_PER_BATCH, cumulative[-1], _MAX_CANDIDATES_PER_BATCH)
    )
    found = []
    for lo, hi in zip([0, *(cuts + 1).tolist()], [*(cuts + 1).tolist(), len(queries)]):
        if lo >= hi:
            continue
        batch_counts = counts[lo:hi]
        first = np.repeat(queries[lo:hi], batch_counts)
        # Position inside each query's bucket range: 0, 1, ... count-1, laid end to end.
        offset_in_range = np.arange(len(first)) - np.repeat(
            np.cumsum(batch_counts) - batch_counts, batch_counts
        )
        second = order[np.repeat(start[lo:hi], batch_counts) + offset_in_range]
        close = hamming_distance(values[first], values[second]) <= max_distance
        found.append(np.stack([first[close], second[close]], axis=1))
    return found


# --------------------------------------------------------------------------- groups


def duplicate_groups(
    keys: Sequence[str],
    sha1: Sequence[str | None],
    phash: Sequence[Any] | np.ndarray | None,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    confirm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """Group id per row: rows that are copies of each other share an id.

    * Rows with the same ``sha1`` (byte-identical files) are always grouped; an empty
      or missing digest groups nothing.
    * Rows whose perceptual hashes are within ``max_distance`` bits are grouped too,
      transitively (``a~b`` and ``b~c`` put ``a``, ``b``, ``c`` in one group, even if
      ``a`` and ``c`` are further apart). A ``None``/NaN hash (unreadable image) takes
      part in exact grouping only; ``phash=None`` or ``max_distance < 0`` means
      exact duplicates only. Hashes may be ints, ``np.uint64``/``int64`` values or
      16-digit hex strings.
    * ``confirm`` (e.g. a :class:`PixelCheck`), given two arrays of row indices, says which
      of those pHash pairs really are near copies; only those join groups. Without it every
      pHash pair does (equal hashes are then linked without expanding their pairs).

    ``keys`` (e.g. relative paths) must be unique. Ids are ``0..n_groups-1`` numbered in
    the order of each group's smallest key, so they depend only on the content, not on
    the row order. Singletons get their own id.
    """
    n_rows = len(keys)
    if len(sha1) != n_rows or (phash is not None and len(phash) != n_rows):
        lengths = f"keys {n_rows}, sha1 {len(sha1)}" + (
            "" if phash is None else f", phash {len(phash)}"
        )
        raise ValueError(
            f"duplicate_groups needs one value per row in every argument; got {lengths}"
        )
    _check_max_distance(max_distance)
    key_series = pd.Series(keys, dtype=object)
    if key_series.duplicated().any():
        repeated = key_series[key_series.duplicated()].head(5).tolist()
        raise ValueError(f"keys must be unique (they name the images); repeated: {repeated}")

    edges = [_exact_copy_edges(sha1)]
    if phash is not None and max_distance >= 0:
        edges.append(_near_copy_edges(phash, max_distance, confirm))
    source, target = np.concatenate([e[0] for e in edges]), np.concatenate([e[1] for e in edges])
    component = _connected_components(n_rows, source, target)
    return _number_by_smallest_key(key_series, component)


def _exact_copy_edges(sha1: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray]:
    """Edges from each row to the first row with the same non-empty digest."""
    digests = pd.Series(sha1, dtype=object).replace("", None)
    codes, uniques = pd.factorize(digests)  # missing -> -1
    rows = np.flatnonzero(codes >= 0)
    first_row = np.full(len(uniques), -1, dtype=np.int64)
    # Reversed assignment leaves the smallest row index per digest in place.
    first_row[codes[rows][::-1]] = rows[::-1]
    return rows, first_row[codes[rows]]


def _near_copy_edges(
    phash: Sequence[Any] | np.ndarray,
    max_distance: int,
    confirm: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Edges joining rows whose hashes are within ``max_distance`` bits (and that ``confirm``
    accepts, when given)."""
    values, present = _as_hash_array(phash)
    rows = np.flatnonzero(present)
    # Equal hashes are one search entry; link every row to its hash's first row.
    distinct, first, inverse = np.unique(values[rows], return_index=True, return_inverse=True)
    pairs = near_pairs(distinct, max_distance)
    if confirm is None:
        representative = rows[first]
        source = np.concatenate([rows, representative[pairs[:, 0]]])
        target = np.concatenate([representative[inverse], representative[pairs[:, 1]]])
        return source, target
    # Every row pair behind the hash pairs (within a hash and across near hashes) is checked.
    counts = np.bincount(inverse, minlength=len(distinct))
    shared = np.flatnonzero(counts > 1)
    hash_pairs = np.concatenate([np.stack([shared, shared], axis=1), pairs]).astype(np.int64)
    sources, targets = [], []
    for a, b in _row_pairs(hash_pairs, rows[np.argsort(inverse, kind="stable")], counts):
        keep = np.asarray(confirm(a, b), dtype=bool)
        sources.append(a[keep])
        targets.append(b[keep])
    empty = np.empty(0, dtype=np.int64)
    return np.concatenate([empty, *sources]), np.concatenate([empty, *targets])


def _row_pairs(
    hash_pairs: np.ndarray, members: np.ndarray, counts: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The row pairs of hash pairs ``(p, q)`` (``p == q``: the pairs within one hash), in
    batches of about ``_MAX_CANDIDATES_PER_BATCH``. ``members`` lists the rows hash by hash."""
    starts = np.cumsum(counts) - counts
    # One unit per row of p: that row against the rows of q (after it, when p == q).
    p, q = hash_pairs[:, 0], hash_pairs[:, 1]
    unit_pair = np.repeat(np.arange(len(hash_pairs)), counts[p])
    position = np.arange(len(unit_pair)) - np.repeat(np.cumsum(counts[p]) - counts[p], counts[p])
    unit_row = members[starts[p[unit_pair]] + position]
    unit_bucket = q[unit_pair]
    unit_from = np.where(p[unit_pair] == unit_bucket, position + 1, 0)
    unit_cost = counts[unit_bucket] - unit_from
    has_any = unit_cost > 0
    unit_row, unit_bucket, unit_from, unit_cost = (
        unit_row[has_any], unit_bucket[has_any], unit_from[has_any], unit_cost[has_any]
    )
    if len(unit_row) == 0:
        return
    cumulative = np.cumsum(unit_cost)
    cuts = np.searchsorted(cumulative, np.arange(_MAX_CANDIDATES_PER_BATCH, cumulative[-1], _MAX_CANDIDATES_PER_BATCH))
    for lo, hi in zip([0, *(cuts + 1).tolist()], [*(cuts + 1).tolist(), len(unit_row)]):
        if lo >= hi:
            continue
        cost = unit_cost[lo:hi]
        offset = np.arange(cost.sum()) - np.repeat(np.cumsum(cost) - cost, cost)
        first = np.repeat(unit_row[lo:hi], cost)
        second = members[np.repeat(starts[unit_bucket[lo:hi]] + unit_from[lo:hi], cost) + offset]
        yield first, second


def _as_hash_array(phash: Sequence[Any] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uint64 values, bool mask of rows that have a hash) from the accepted forms."""
    if isinstance(phash, np.ndarray) and phash.dtype.kind in "iu":
        # int64 storage of a uint64 hash is the same 64 bits; reinterpret, do not convert.
        values = (
            phash.astype(np.int64).view(np.uint64)
            if phash.dtype.kind == "i"
            else phash.astype(np.uint64)
        )
        return values, np.ones(len(phash), dtype=bool)
    series = pd.Series(phash, dtype=object)
    present = ~series.isna().to_numpy()
    values = np.zeros(len(series), dtype=np.uint64)
    try:
        values[present] = [_hash_value(v) for v in series[present]]
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(
            f"perceptual hashes must be 64-bit unsigned integers or 16-digit hex strings: {err}"
        ) from err
    return values, present


def _hash_value(value: Any) -> int:
    if isinstance(value, str):
        return int(value, 16)
    if isinstance(value, (float, np.floating)):
        # A float64 holds 53 bits; a hash that went through one has lost bits.
        raise TypeError(f"got the float {value!r} (a float cannot hold 64 bits)")
    return int(value)


def _connected_components(n_rows: int, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Component label per row of the undirected graph given by the edges."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    # Same result as a union-find over the edges, in compiled code instead of a Python loop.
    graph = coo_matrix(
        (np.ones(len(source), dtype=np.int8), (source, target)), shape=(n_rows, n_rows)
    )
    _, component = connected_components(graph, directed=False)
    return component


def _number_by_smallest_key(keys: pd.Series, component: np.ndarray) -> np.ndarray:
    """Renumber components 0.. in the order of their smallest key."""
    if len(keys) == 0:
        return np.empty(0, dtype=np.int64)
    key_rank = np.empty(len(keys), dtype=np.int64)
    key_rank[np.argsort(keys.to_numpy(dtype=object), kind="stable")] = np.arange(len(keys))
    smallest_rank = pd.Series(key_rank).groupby(component).min()
    group_of_component = pd.Series(
        smallest_rank.rank(method="first").astype(np.int64) - 1, index=smallest_rank.index
    )
    return group_of_component.loc[component].to_numpy(dtype=np.int64)


# --------------------------------------------------------------------------- report


def group_report(
    keys: Sequence[str],
    labels: Sequence[str],
    groups: Sequence[int] | np.ndarray,
    sha1: Sequence[str | None],
) -> pd.DataFrame:
    """One row per group with more than one member, for review and for the logs.

    Columns: ``group``, ``size``, ``members`` (keys, sorted, ``;``-joined),
    ``classes`` (labels present, sorted, ``;``-joined; a multilabel value such as
    ``"cat;dog"`` contributes each label), ``label_conflict`` (members carry different
    label values: the same picture labelled two ways, a labelling error or an
    ambiguous image), and ``kind``: ``exact`` (all members byte-identical), ``near``
    (no two members byte-identical) or ``mixed``. Sorted by ``group``.
    """
    table = pd.DataFrame({"key": keys, "label": labels, "group": groups, "sha1": sha1})
    table["sha1"] = table["sha1"].replace("", None)
    shared = table[table["group"].duplicated(keep=False)].sort_values(
        ["group", "key"], kind="stable"
    )
    columns = ["group", "size", "members", "classes", "label_conflict", "kind"]
    if shared.empty:
        return pd.DataFrame(
            {
                c: pd.Series(dtype=t)
                for c, t in zip(columns, [np.int64, np.int64, object, object, bool, object])
            }
        )
    by_group = shared.groupby("group", sort=True)
    report = by_group.agg(
        size=("key", "size"),
        members=("key", ";".join),
        n_labels=("label", "nunique"),
        n_digests=("sha1", "nunique"),
        n_with_digest=("sha1", "count"),
    )
    single_labels = shared.assign(label=shared["label"].astype(str).str.split(";")).explode("label")
    report["classes"] = single_labels.groupby("group")["label"].agg(
        lambda s: ";".join(sorted(set(s)))
    )
    report["label_conflict"] = report["n_labels"] > 1
    all_identical = (report["n_digests"] == 1) & (report["n_with_digest"] == report["size"])
    none_identical = report["n_digests"] == report["n_with_digest"]
    report["kind"] = np.select([all_identical, none_identical], ["exact", "near"], "mixed")
    return report.reset_index()[columns]


# --------------------------------------------------------------------------- benchmark


def benchmark(
    n_hashes: int = 100_000,
    n_planted: int = 1_000,
    max_distance: int = DEFAULT_MAX_DISTANCE,
    rounds: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Time :func:`duplicate_groups` on random hashes with planted near copies.

    ``n_planted`` hashes are copies of others with 0..max_distance bits flipped; all
    of them must end up grouped with their source. Returns min/median/max seconds
    over ``rounds`` and the planted recall (must be 1.0). Run it with
    ``python -m labelflow.near_duplicates``.
    """
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, np.iinfo(np.uint64).max, size=n_hashes, dtype=np.uint64, endpoint=True)
    sources = rng.choice(n_hashes - n_planted, size=n_planted, replace=False)
    copies = hashes[sources].copy()
    for row, n_flips in enumerate(rng.integers(0, max_distance + 1, size=n_planted)):
        for bit in rng.choice(HASH_BITS, size=n_flips, replace=False):
            copies[row] ^= np.uint64(1) << np.uint64(bit)
    hashes[n_hashes - n_planted :] = copies
    keys = [f"img_{i:07d}" for i in range(n_hashes)]
    digests = [f"sha_{i}" for i in range(n_hashes)]
    seconds = []
    for _ in range(rounds):
        started = time.perf_counter()
        groups = duplicate_groups(keys, digests, hashes, max_distance)
        seconds.append(time.perf_counter() - started)
    recall = float(np.mean(groups[sources] == groups[n_hashes - n_planted :]))
    return {
        "n_hashes": n_hashes,
        "max_distance": max_distance,
        "planted_recall": recall,
        "seconds_min": min(seconds),
        "seconds_median": float(np.median(seconds)),
        "seconds_max": max(seconds),
        "n_groups": int(groups.max()) + 1,
    }


if __name__ == "__main__":
    for distance in (4, 6, DEFAULT_MAX_DISTANCE, 10):
        result = benchmark(max_distance=distance)
        print(
            f"max_distance={distance}: {result['n_hashes']:,} hashes grouped in "
            f"min {result['seconds_min']:.2f} s / median {result['seconds_median']:.2f} s / "
            f"max {result['seconds_max']:.2f} s; planted copies found: "
            f"{result['planted_recall']:.1%}; groups: {result['n_groups']:,}"
        )
