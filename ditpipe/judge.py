"""A pixel-only judge for ``builtin:shapes`` prompts: does an image show what its caption says?

Models trained on ``builtin:shapes`` are scored by asking of each generated image whether it shows the colours,
shapes, spatial relation and number of objects its prompt names. The judge reads only the pixels and the prompt
(never ground-truth metadata, never a model), so real and generated images are measured the same way.

How an image is read (numpy only; images over 32 px are box-filtered to 32 first, which keeps pixels linear mixes):

1. Background: the per-channel median of the border.
2. Coverage: each pixel is unmixed against the background, ``pixel ~ a * colour + (1 - a) * background``, for the
   palette colour that explains it best (errors pooled over similar-looking neighbours, so noise or a colour cast
   does not speckle an orange object with yellow). A pixel two nearby objects' colours mix to far better is split
   between them: the anti-aliased seam between red and yellow is nearly orange.
3. Objects: 4-connected pixels of one colour with coverage >= 0.4, pieces joined across other colours (an object
   drawn over the middle of another splits it). Dropped: regions under 0.6% of the image, seams (a colour that is
   the mix of two neighbours', lying along both) and fringes (a thin, coreless rim of a look-alike colour along a
   larger region, as a colour cast makes of a yellow object's soft edge).
4. Shape: circle, square and triangle are each fitted to an object's soft coverage by pattern search over centre,
   side and edge width (so blur is fitted, not penalised); a template predicts min(template, 1 - other colours'
   coverage), so a partly hidden object is judged by what shows. The lowest squared error names the shape, and the
   fit's centre is the object's position.

Attributes: ``color``, every named colour is an object; ``shape``, each named colour's largest object has the named
shape; ``relation``, both are present and their centres satisfy the relation by a margin of 1% of the side;
``count``, the number of objects equals the number named.

Accuracy on real images from ``shapes.generate`` (thresholds tuned on seed 0, confirmed on seed 12345; 2,000 scenes
per row; relation over the ~61% two-object scenes; "degraded" is Gaussian blur of radius 0.6 px at 32 px, scaled
with the side, plus per-pixel noise of sd 4 and a per-image colour cast of sd 6):

    seed 12345        color    shape    relation  count
    16 px            0.9940   0.9920   0.9902    0.9940
    16 px degraded   0.9940   0.9915   0.9902    0.9940
    32 px            0.9960   0.9955   0.9935    0.9960
    32 px degraded   0.9945   0.9935   0.9910    0.9945
    64 px            0.9960   0.9960   0.9935    0.9960
    64 px degraded   0.9945   0.9945   0.9910    0.9945

Seed 0 is within 0.003 of these. Nearly every miss is a scene where the second object hides most of the first
(the generator lets them overlap; 1.4% of scenes have an object under half visible, some wholly hidden): on scenes
whose objects all show at least half, every attribute is right on >= 99.8% at every size, degraded or not.

Wrong prompts (seed 12345, 2,000 scenes, 16-64 px, clean or degraded) are rejected: another colour named 100%;
another shape named >= 99.85%; relation reversed 100%; an extra object named 100%; an object left out >= 99.0% (the
misses are hidden objects); another scene's caption 99.6% (the rest describe the image truly but for size, which is
not judged). Harder degradations at 32 px: blur of radius 1.0 keeps every attribute >= 0.985, radius 1.4 drops shape to
0.92; a 25% desaturation stays >= 0.985, but 40% (orange drifting to yellow) drops colour to 0.90; channel gains of
+-20% give 0.96-0.97. Speed: about 250-280 images/s on one CPU core at any size.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ditpipe.data.shapes import COLORS, RELATIONS, SHAPES, SIZES

ATTRIBUTES = ("color", "shape", "relation", "count")

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], dtype=np.float64)
_PAIR_I, _PAIR_J = np.triu_indices(len(_NAMES), 1)
_PHRASE = rf"an? ({'|'.join(SIZES)}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_PROMPT = re.compile(rf"{_PHRASE}(?: ({'|'.join(map(re.escape, RELATIONS))}) {_PHRASE})?")

# Thresholds, tuned on seed 0 (see above). Squared errors are in RGB units squared, lengths in working pixels.
_WORK_SIDE = 32  # larger images are box-filtered down to this side
# colour unmixing
_MIN_DIFF = 12.0**2  # a pixel this close to the background is background
_SINGLE_RESID = 30.0**2  # error one colour may always leave ...
_MAX_REL_RESID = 0.3  # ... plus this share of |pixel - background|^2; a pixel explained worse is no palette colour's
_POOL_SIGMA = 30.0  # RGB distance at which a neighbour's vote on a pixel's colour falls to exp(-1/2)
_SOLID = 0.7  # coverage of a pixel well inside an object
_PAIR_GAIN = 0.25  # a two-colour mix must cut the error of the best single colour to this fraction
# regions
_MASK_ALPHA = 0.4  # coverage at which a pixel belongs to a colour region
_MIN_AREA_FRAC = 0.006  # share of the image an object must cover (a small triangle covers 0.024)
_MIX_MAX_ERR = 0.1  # relative squared error under which a colour reads as a mix of two others ...
_MIX_MAX_SUM = 2.5  # ... with mix weights summing to at most this (so the seam reads at coverage >= 0.4)
_SEAM_SHARE = 0.7  # share of a region's mass within two pixels of both mixed colours that makes it their seam
_ALIKE_COS = 0.85  # colours this close in direction from the background bleed into each other's edges ...
_FRINGE_MEAN = 0.7  # ... so a thin region (mean coverage under this), with no solid core, ...
_FRINGE_SHARE = 0.7  # ... with this share of its mass beside a larger look-alike region, is that one's fringe
_MARGIN_FRAC = 0.01  # relation margin between centres, as a share of the image side
# shape fitting: a pattern search over (centre x, centre y, side, edge width)
_OFFSETS = np.zeros((27, 4), np.float32)  # moves of (cx, cy, side) on a 3x3x3 grid, edge width kept
_OFFSETS[:, :3] = np.stack(np.meshgrid(*[[-1.0, 0.0, 1.0]] * 3, indexing="ij"), -1).reshape(-1, 3)
_WIDTH_FACTORS = np.ones((3, 4), np.float32)  # edge-width moves: narrower, same, wider
_WIDTH_FACTORS[:, 3] = (0.6, 1.0, 1.7)
_RAMP = 1.0  # starting edge width: a box-filtered or LANCZOS-downsampled edge spans about one pixel
_RAMP_RANGE = (0.6, 4.0)  # blurrier images fit wider edges
_STEPS = (1.5, 0.75, 0.4, 0.2)  # reaches +-2.85 px from the start (enough for partial occlusion), ends at 0.2 px
_PRUNE_AFTER = 0  # after this round, drop shapes ...
_PRUNE_RATIO = 3.0  # ... whose error is this many times the best one's
_INV_SQRT5 = np.float32(1 / np.sqrt(5.0))


@dataclass(frozen=True)
class Expected:
    """What a prompt asks for."""

    objects: tuple[tuple[str, str, str], ...]  # (size, color, shape) per object, in prompt order
    relation: str | None  # relation of objects[0] to objects[1], or None


@dataclass(frozen=True)
class _Region:
    color: int  # index into _NAMES
    area: float  # soft area in pixels
    cx: float  # object centre from the best shape fit
    cy: float
    shape: str  # best-fitting shape


def parse_prompt(prompt: str) -> Expected | None:
    """The scene a builtin:shapes caption describes, or None if the prompt is not one.

    Case, surrounding space and a final full stop are forgiven. Two objects of one colour are not a shapes caption
    (the generator never draws them, and the judge could not tell them apart), so they parse to None.
    """
    m = _PROMPT.fullmatch(prompt.strip().rstrip(".").strip().lower())
    if m is None:
        return None
    g = m.groups()
    if g[3] is None:
        return Expected(((g[0], g[1], g[2]),), None)
    if g[1] == g[5]:
        return None
    return Expected(((g[0], g[1], g[2]), (g[4], g[5], g[6])), g[3])


def applicable(prompts) -> bool:
    """True when every prompt parses (the judge applies to this data); False for no prompts at all."""
    prompts = list(prompts)
    return bool(prompts) and all(parse_prompt(p) is not None for p in prompts)


# ------------------------------------------------------------------------------------------ colour unmixing


def _as_array(image) -> np.ndarray:
    """The image as float RGB, box-filtered down to at most _WORK_SIDE pixels a side.

    Box filtering keeps every pixel a linear mix of the colours under it, so unmixing still holds; the shapes are
    told apart as well at 32 pixels as at 64, in a quarter of the time.
    """
    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if img.width != img.height or img.width < 16:
        raise ValueError(f"expected a square RGB image of side >= 16, got {img.width}x{img.height}")
    if img.width > _WORK_SIDE:
        img = img.resize((_WORK_SIDE, _WORK_SIDE), Image.Resampling.BOX)
    return np.asarray(img, dtype=np.float64)


def _background(arr: np.ndarray) -> np.ndarray:
    """The per-channel median of the border: objects never cover most of it."""
    border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
    return np.median(border, axis=0)


def _coverage(arr: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Per palette colour, the share of each pixel it covers: (n_colours, H, W).

    Each pixel is explained as the background mixed with one palette colour, or with two where both colours cover
    nearby pixels solidly and the mix fits much better: the anti-aliased seam between a red and a yellow object is
    nearly orange, and must not read as a phantom orange object.
    """
    h, w, _ = arr.shape
    d = (arr - bg).reshape(-1, 3)
    fg = np.flatnonzero((d * d).sum(1) > _MIN_DIFF)  # most pixels are background: skip them
    v = _PALETTE - bg
    cov = np.zeros((h * w, len(_NAMES)))
    r_single = _unmix_one(cov, arr, d, fg, v)
    _unmix_two(cov, d, fg, v, r_single, (h, w))
    return cov.T.reshape(len(_NAMES), h, w)


def _unmix_one(cov: np.ndarray, arr: np.ndarray, d: np.ndarray, fg: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Fill ``cov`` (H*W, C) with each foreground pixel's one-colour explanation; return its squared error."""
    d = d[fg]
    dd = (d * d).sum(1)
    vv = (v * v).sum(1)
    proj = d @ v.T  # (N, C)
    alpha = np.clip(proj / vv, 0.0, 1.0)
    err = dd[:, None] - 2 * alpha * proj + alpha * alpha * vv
    # choose the colour on the error pooled over similar-looking neighbours: noise or a colour cast that puts single
    # pixels of an orange object nearer yellow must not break it into a speckle of two colours
    rel = np.zeros((arr.shape[0] * arr.shape[1], len(_NAMES)))
    rel[fg] = err / dd[:, None]  # relative errors, in [0, 1]
    best = _pool_similar(arr, rel.reshape(*arr.shape[:2], -1), fg).argmin(1)
    rows = np.arange(len(fg))
    r_single = err[rows, best]
    ok = r_single <= _MAX_REL_RESID * dd + _SINGLE_RESID  # else no palette colour explains it
    cov[fg[ok], best[ok]] = alpha[rows[ok], best[ok]]
    return r_single


def _unmix_two(cov: np.ndarray, d: np.ndarray, fg: np.ndarray, v: np.ndarray, r_single: np.ndarray,
               hw: tuple[int, int]) -> None:
    """Re-explain, in place, the pixels that two nearby colours mix to far better than one colour does."""
    n_col = len(_NAMES)
    # colours with solid pixels within two pixels: the only ones a mixed pixel may be made of
    near = _dilate((cov >= _SOLID).T.reshape(n_col, *hw), 2).reshape(n_col, -1)[:, fg]
    mixable = np.flatnonzero(near.sum(0) >= 2)
    if len(mixable) == 0:
        return
    i, j = _PAIR_I, _PAIR_J
    dm = d[fg[mixable]]
    vv = (v * v).sum(1)
    vij = (v[i] * v[j]).sum(1)
    det = vv[i] * vv[j] - vij * vij
    pi, pj = dm @ v[i].T, dm @ v[j].T  # (M, P)
    ai = (vv[j] * pi - vij * pj) / det  # least squares on each pair's 2x2 Gram system
    aj = (vv[i] * pj - vij * pi) / det
    err = (dm * dm).sum(1)[:, None] - ai * pi - aj * pj
    ok = (ai > -0.05) & (aj > -0.05) & (ai + aj < 1.2) & near[i][:, mixable].T & near[j][:, mixable].T
    err = np.where(ok, err, np.inf)
    k = err.argmin(1)
    rows = np.arange(len(mixable))
    use = err[rows, k] < _PAIR_GAIN * r_single[mixable]
    px, k, rows = fg[mixable[use]], k[use], rows[use]
    cov[px] = 0.0
    cov[px, i[k]] = np.clip(ai[rows, k], 0.0, 1.0)
    cov[px, j[k]] = np.clip(aj[rows, k], 0.0, 1.0)


# ------------------------------------------------------------------------------------------ regions


def _label(mask: np.ndarray) -> np.ndarray:
    """4-connected component labels of a boolean (..., H, W) stack; -1 off the mask, else the smallest flat index.

    Min-propagation with pointer jumping converges in a few passes on the compact blobs this data has.
    """
    n = mask.size
    lab = np.where(mask, np.arange(n).reshape(mask.shape), n)
    while True:
        new = lab.copy()
        np.minimum(new[..., 1:, :], lab[..., :-1, :], out=new[..., 1:, :])
        np.minimum(new[..., :-1, :], lab[..., 1:, :], out=new[..., :-1, :])
        np.minimum(new[..., :, 1:], lab[..., :, :-1], out=new[..., :, 1:])
        np.minimum(new[..., :, :-1], lab[..., :, 1:], out=new[..., :, :-1])
        new = np.where(mask, new, n)
        flat = np.append(new.ravel(), n)
        new = flat[flat[new]]
        if np.array_equal(new, lab):
            return np.where(mask, lab, -1)
        lab = new


def _regions(cov: np.ndarray, bg: np.ndarray) -> list[_Region]:
    """Every object: a colour region of meaningful area, with its best-fitting shape and centre.

    Pieces of one colour that another colour's region joins count as one object: an object drawn over the middle of
    another splits it, and those pieces must not count twice.
    """
    side = cov.shape[-1]
    mask = cov >= _MASK_ALPHA
    present = np.flatnonzero(mask.any((1, 2)))
    total = np.clip(cov.sum(0), 0.0, 1.0)
    other = total - cov[present]
    labels = _label(mask[present] | (other >= _MASK_ALPHA))
    labels = np.where(mask[present], labels, -1)
    ids, inverse = np.unique(labels, return_inverse=True)
    areas = np.bincount(inverse.ravel(), weights=cov[present].ravel())
    keep = (ids >= 0) & (areas >= _MIN_AREA_FRAC * side * side)
    found = [(int(present[lid // (side * side)]), labels[lid // (side * side)] == lid, float(area))
             for lid, area in zip(ids[keep], areas[keep])]
    found = [f for f in found if not _is_seam(f, found, cov, bg) and not _is_fringe(f, found, cov, bg)]
    return [_fit(cov[c], member, total - cov[c], c, area) for c, member, area in found]


def _is_seam(region: tuple, regions: list[tuple], cov: np.ndarray, bg: np.ndarray) -> bool:
    """Whether a region is the anti-aliased seam between two others rather than an object.

    It is when its colour is a mix of theirs (red and yellow make orange) and it lies mostly within two pixels of
    solid pixels of both.
    """
    c, member, area = region
    others = {r[0] for r in regions if r[0] != c}
    if len(others) < 2:
        return False
    mixes = [(i, j) for i, j in _mixes(tuple(np.round(bg).astype(int).tolist()))[c] if i in others and j in others]
    if not mixes:
        return False
    near = {}
    for i in {x for pair in mixes for x in pair}:
        solid = np.zeros_like(member)
        for r in regions:
            if r[0] == i:
                solid |= r[1] & (cov[i] >= _SOLID)
        near[i] = _dilate(solid, 2)
    own = np.where(member, cov[c], 0.0)
    return any((own * (near[i] & near[j])).sum() > _SEAM_SHARE * area for i, j in mixes)


def _is_fringe(region: tuple, regions: list[tuple], cov: np.ndarray, bg: np.ndarray) -> bool:
    """Whether a region is a coreless rim along a larger region of a look-alike colour rather than an object.

    A colour cast can tip the soft edge of a yellow object towards orange; such a rim has no pixel that is solid and
    surrounded by its own colour, and hugs the larger region.
    """
    c, member, area = region
    alike = _alike(tuple(np.round(bg).astype(int).tolist()))[c]
    if area > _FRINGE_MEAN * member.sum() or not any(r[0] in alike and r[2] > area for r in regions):
        return False
    solid = member & (cov[c] >= _SOLID)
    core = solid.copy()
    core[1:] &= member[:-1]
    core[:-1] &= member[1:]
    core[:, 1:] &= member[:, :-1]
    core[:, :-1] &= member[:, 1:]
    core[0] = core[-1] = core[:, 0] = core[:, -1] = False
    if core.any():
        return False
    own = np.where(member, cov[c], 0.0)
    for c2, member2, area2 in regions:
        if c2 in alike and area2 > area:
            hug = _dilate(member2 & (cov[c2] >= _SOLID), 1)
            if (own * hug).sum() > _FRINGE_SHARE * area:
                return True
    return False


@functools.lru_cache(maxsize=256)
def _alike(bg: tuple[int, int, int]) -> list[set[int]]:
    """Per palette colour, the other colours that point nearly the same way from this background (orange, yellow)."""
    v = _PALETTE - np.array(bg, dtype=np.float64)
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = u @ u.T
    return [{j for j in range(len(_NAMES)) if j != c and cos[c, j] > _ALIKE_COS} for c in range(len(_NAMES))]


@functools.lru_cache(maxsize=256)
def _mixes(bg: tuple[int, int, int]) -> list[list[tuple[int, int]]]:
    """Per palette colour, the pairs of other colours whose mix over this background looks like it."""
    v = _PALETTE - np.array(bg, dtype=np.float64)
    out = []
    for c in range(len(_NAMES)):
        pairs = []
        for i, j in zip(_PAIR_I, _PAIR_J):
            if c in (i, j):
                continue
            basis = np.stack([v[i], v[j]], 1)
            x = np.linalg.lstsq(basis, v[c], rcond=None)[0]
            err = ((basis @ x - v[c]) ** 2).sum() / (v[c] ** 2).sum()
            if (x > 0).all() and x.sum() < _MIX_MAX_SUM and err < _MIX_MAX_ERR:
                pairs.append((int(i), int(j)))
        out.append(pairs)
    return out


# ------------------------------------------------------------------------------------------ shape fitting


def _edge(u: np.ndarray, inv_w: np.float32) -> np.ndarray:
    """Coverage of a pixel whose centre lies ``u`` inside a straight edge blurred over ``1 / inv_w`` pixels."""
    v = u * inv_w
    v += np.float32(0.5)
    return np.minimum(np.maximum(v, np.float32(0.0), out=v), np.float32(1.0), out=v)


def _template(shape: str, dx: np.ndarray, dy: np.ndarray, half: np.ndarray, inv_w: np.float32) -> np.ndarray:
    """Soft coverage of a shape of half-side ``half`` at pixel offsets (dx, dy) from its centre.

    Polygons are products of their edges' profiles: exact for a box filter or Gaussian blur of an axis-aligned square
    (separable), and it rounds corners the way blur does.
    """
    if shape == "circle":
        return _edge(half - np.sqrt(dx * dx + dy * dy), inv_w)
    if shape == "square":
        return _edge(half - np.abs(dx), inv_w) * _edge(half - np.abs(dy), inv_w)
    # triangle pointing up: apex (0, -half), base corners (+-half, +half); sides have normals (+-2, 1)/sqrt(5)
    slope = (dy - half) * _INV_SQRT5
    left = _edge(2 * _INV_SQRT5 * (half + dx) + slope, inv_w)
    right = _edge(2 * _INV_SQRT5 * (half - dx) + slope, inv_w)
    return _edge(half - dy, inv_w) * left * right


def _errors(shapes: list[str], grid: np.ndarray, px: np.ndarray, py: np.ndarray, target: np.ndarray,
            room: np.ndarray) -> np.ndarray:
    """Squared error of every candidate grid[s, k] = (cx, cy, side, edge width) of shapes[s]: (S, K)."""
    dx = px - grid[..., :1]
    dy = py - grid[..., 1:2]
    half = grid[..., 2:3] / 2
    inv_w = 1 / grid[..., 3:]
    pred = np.stack([_template(name, dx[s], dy[s], half[s], inv_w[s]) for s, name in enumerate(shapes)])
    return ((np.minimum(pred, room) - target) ** 2).sum(-1)


def _fit(a: np.ndarray, member: np.ndarray, other: np.ndarray, color: int, area: float) -> _Region:
    """Fit each shape to one region's coverage; the best fit names its shape and centre.

    A candidate predicts min(template, 1 - other colours' coverage), so an object hidden in part by another one
    (or hiding it) is not penalised for what it cannot show.
    """
    side = a.shape[0]
    ys, xs = np.nonzero(member)
    y0, y1 = max(ys.min() - 2, 0), min(ys.max() + 3, side)
    x0, x1 = max(xs.min() - 2, 0), min(xs.max() + 3, side)
    # keep this region and its soft edge, not other regions of the same colour
    target = np.clip(np.where(_dilate(member[y0:y1, x0:x1], 2), a[y0:y1, x0:x1], 0.0), 0.0, 1.0)
    room = 1.0 - np.clip(other[y0:y1, x0:x1], 0.0, 1.0)
    # start from the soft bounding box: its larger side survives partial occlusion
    colx, rowy = target.max(0), target.max(1)
    cx0 = x0 + 0.5 + (colx * np.arange(x1 - x0)).sum() / max(colx.sum(), 1e-6)
    cy0 = y0 + 0.5 + (rowy * np.arange(y1 - y0)).sum() / max(rowy.sum(), 1e-6)
    start = np.array([cx0, cy0, max(colx.sum(), rowy.sum(), 1.0), _RAMP], np.float32)
    gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + np.float32(0.5)
    pixels = (gx.ravel(), gy.ravel(), target.ravel().astype(np.float32), room.ravel().astype(np.float32))
    shape, params = _search(start, *pixels)
    return _Region(color, area, float(params[0]), float(params[1]), shape)


def _search(start: np.ndarray, px: np.ndarray, py: np.ndarray, target: np.ndarray,
            room: np.ndarray) -> tuple[str, np.ndarray]:
    """Pattern search from ``start`` for every shape; the best shape and its (cx, cy, side, edge width).

    Shapes far behind the best after the first round are dropped, which saves most of the work on clear-cut regions.
    """
    names = list(SHAPES)
    params = np.tile(start, (len(names), 1))
    errs = np.full(len(names), np.inf)
    for r, step in enumerate(_STEPS):
        rows = np.arange(len(names))
        # position and size on a 3x3x3 grid, then the edge width (blur) on its own
        for move in (np.float32(step) * _OFFSETS, None):
            grid = params[:, None, :] + move if move is not None else params[:, None, :] * _WIDTH_FACTORS
            grid[..., 2] = np.maximum(grid[..., 2], 1.0)
            grid[..., 3] = np.clip(grid[..., 3], *_RAMP_RANGE)
            e = _errors(names, grid, px, py, target, room)
            k = e.argmin(1)
            params, errs = grid[rows, k], e[rows, k]
        if r == _PRUNE_AFTER:
            keep = errs <= _PRUNE_RATIO * errs.min() + 0.5
            names, params, errs = [n for n, kept in zip(names, keep) if kept], params[keep], errs[keep]
    b = int(errs.argmin())
    return names[b], params[b]


def _pool_similar(arr: np.ndarray, x: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """For the flat pixel indices ``idx``, the sum of ``x`` (H, W, C) over their 3x3 neighbours, weighted by how alike
    the neighbours' colours are: (len(idx), C).

    Bilateral weights keep a thin sliver of one object from being outvoted by the object beside it.
    """
    h, w, _ = arr.shape
    rgb = np.pad(arr, [(1, 1), (1, 1), (0, 0)], mode="edge").reshape(-1, 3)
    val = np.pad(x, [(1, 1), (1, 1), (0, 0)]).reshape(-1, x.shape[-1])
    y, col = np.divmod(idx, w)
    offsets = (np.arange(-1, 2)[:, None] * (w + 2) + np.arange(-1, 2)).ravel()  # 3x3 in the padded image
    neighbours = ((y + 1) * (w + 2) + col + 1)[:, None] + offsets
    diff = rgb[neighbours] - arr.reshape(-1, 3)[idx, None]
    weight = np.exp((diff * diff).sum(-1) * (-0.5 / _POOL_SIGMA**2))  # (N, 9)
    return (weight[..., None] * val[neighbours]).sum(1)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """Grow a boolean (..., H, W) mask by ``steps`` pixels (3x3 neighbourhood per step)."""
    out = mask.copy()
    for _ in range(steps):
        out[..., 1:, :] |= out[..., :-1, :].copy()
        out[..., :-1, :] |= out[..., 1:, :].copy()
        out[..., :, 1:] |= out[..., :, :-1].copy()
        out[..., :, :-1] |= out[..., :, 1:].copy()
    return out


# ------------------------------------------------------------------------------------------ judging


def _satisfies(relation: str, a: _Region, b: _Region, margin: float) -> bool:
    if relation == "to the left of":
        return a.cx < b.cx - margin
    if relation == "to the right of":
        return a.cx > b.cx + margin
    if relation == "above":
        return a.cy < b.cy - margin
    return a.cy > b.cy + margin


def judge_image(image, prompt: str) -> dict[str, bool | None]:
    """Judge one image against its prompt.

    image: PIL.Image or uint8 numpy array (H, W, 3), any square size >= 16.
    Returns {"color": bool, "shape": bool, "relation": bool | None (None for one-object prompts), "count": bool}.
    Raises ValueError naming the prompt if parse_prompt returns None.
    """
    expected = parse_prompt(prompt)
    if expected is None:
        raise ValueError(f"not a builtin:shapes prompt: {prompt!r}")
    arr = _as_array(image)
    bg = _background(arr)
    regions = _regions(_coverage(arr, bg), bg)
    found = []
    for _, color, _ in expected.objects:
        mine = [r for r in regions if _NAMES[r.color] == color]
        found.append(max(mine, key=lambda r: r.area) if mine else None)
    color_ok = all(r is not None for r in found)
    shape_ok = color_ok and all(r.shape == o[2] for r, o in zip(found, expected.objects))
    relation = None
    if expected.relation is not None:
        relation = color_ok and _satisfies(expected.relation, found[0], found[1], _MARGIN_FRAC * arr.shape[0])
    return {"color": color_ok, "shape": shape_ok, "relation": relation,
            "count": len(regions) == len(expected.objects)}


def score(images, prompts) -> dict:
    """Judge every (image, prompt) pair and aggregate.

    Returns {"n": N, "color": frac, "shape": frac, "relation": frac over the two-object prompts (None if there are
    none), "count": frac, "n_relation": number of two-object prompts, "all": fraction with every applicable attribute
    right, "shape_one" / "shape_two": shape over the one-object / two-object prompts (None if there are none)}.
    Fractions are in [0, 1]; with no pairs at all every fraction is None.
    """
    results = [judge_image(img, p) for img, p in zip(images, prompts, strict=True)]
    n = len(results)

    def frac(values: list) -> float | None:
        return sum(bool(v) for v in values) / len(values) if values else None

    rel = [r["relation"] for r in results if r["relation"] is not None]
    return {
        "n": n,
        "color": frac([r["color"] for r in results]),
        "shape": frac([r["shape"] for r in results]),
        "relation": frac(rel),
        "count": frac([r["count"] for r in results]),
        "n_relation": len(rel),
        "all": frac([all(v for v in r.values() if v is not None) for r in results]),
        # both shapes of a pair must be right and bound to the right colours: the hard case, apart
        "shape_one": frac([r["shape"] for r in results if r["relation"] is None]),
        "shape_two": frac([r["shape"] for r in results if r["relation"] is not None]),
    }
