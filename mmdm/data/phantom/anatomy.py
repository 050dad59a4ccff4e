"""Anatomy of the phantom: the MNI152 2009a template, the output grid, random
smooth deformations and white-matter lesions.

The template (T1, grey- and white-matter probability maps, brain mask; symmetric
ICBM 2009a, 1 mm, Fonov et al. 2011) ships inside the ``nilearn`` wheel, so it
loads without network access. The template T1 is already brain-extracted, so the
phantom adds a thin *extracerebral shell* (brain mask dilated by ``shell_mm``) as a
stand-in for the tissue around the skull base in which the carotid and vertebral
arteries run.

Coordinates: world millimetres in RAS (MNI space before deformation). A subject
is the template pulled back through ``y = c + M (x - c) + u(x)``: ``x`` is a point
of the subject's grid, ``y`` the template point it shows, ``M`` a small random
scaling/rotation about the brain centre ``c`` and ``u`` a smooth random displacement.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from mmdm.data.phantom.physics import upsample_separable

#: Brain bounding box of the MNI152 2009a 1 mm brain mask (mm, RAS).
BRAIN_BOX_MM = (np.array([-72.0, -107.0, -72.0]), np.array([72.0, 73.0, 82.0]))
BRAIN_CENTRE_MM = (BRAIN_BOX_MM[0] + BRAIN_BOX_MM[1]) / 2.0
_PAD = 12  # 2 mm voxels of padding around the head lattice so the shell fits below the brain


@dataclass(frozen=True)
class Template:
    """Template maps on the 1 mm grid (``affine`` maps voxel -> world mm); ``head`` on its own 2 mm grid."""

    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    head: np.ndarray  # brain plus extracerebral shell, soft, on a padded 2 mm lattice
    head_affine: np.ndarray
    affine: np.ndarray
    periventricular: np.ndarray  # (K, 3) candidate lesion centres, world mm
    deep_wm: np.ndarray  # (K, 3) candidate lesion centres, world mm


_FILES = {"gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
          "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
          "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"}


def _read_mni152() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """GM, WM, T1 arrays (float32) and affine of the 1 mm MNI152 2009a files inside the nilearn wheel.

    Reads the files with nibabel (importing ``nilearn`` itself costs seconds); the
    result equals ``nilearn.datasets.load_mni152_{gm,wm,}_template(resolution=1)``
    up to their rescaling to [0, 1], and the brain mask is nilearn's: ``T1 / max > 0.2``.
    """
    import importlib.util

    import nibabel as nib

    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the phantom needs nilearn (pip install 'nilearn>=0.10.3'): its wheel ships the "
                          "MNI152 2009a template used as anatomy")
    folder = Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"
    missing = [f for f in _FILES.values() if not (folder / f).exists()]
    if missing:
        raise FileNotFoundError(f"{folder}: MNI152 template file(s) {missing} not found; reinstall nilearn "
                                "(>= 0.10.3 ships them inside the wheel)")
    imgs = {k: nib.load(str(folder / f)) for k, f in _FILES.items()}
    arrs = [np.asarray(imgs[k].get_fdata(dtype=np.float32)) for k in ("gm", "wm", "t1")]
    return arrs[0], arrs[1], arrs[2], np.array(imgs["gm"].affine, dtype=np.float64)


@functools.lru_cache(maxsize=4)
def load_template(shell_mm: float = 14.0) -> Template:
    """Load the nilearn MNI152 2009a maps at 1 mm (no network) and derive the shell and lesion sites."""
    gm_raw, wm_raw, t1_raw, affine = _read_mni152()
    gm, wm = gm_raw / gm_raw.max(), wm_raw / wm_raw.max()
    brain = (t1_raw / t1_raw.max() > 0.2).astype(np.float32)
    total = gm + wm
    scale = np.where(total > brain, brain / np.maximum(total, 1e-6), 1.0).astype(np.float32)
    gm, wm = gm * scale, wm * scale
    # the head (brain + extracerebral shell) on a padded 2 mm lattice: it extends below the template
    b2 = np.pad(brain[::2, ::2, ::2] > 0.5, _PAD)
    head_affine = affine.copy()
    head_affine[:3, :3] *= 2.0
    head_affine[:3, 3] -= _PAD * np.diag(head_affine)[:3]
    outside2 = ndimage.distance_transform_edt(~b2) * 2.0
    head = ndimage.gaussian_filter((outside2 <= shell_mm).astype(np.float32), 0.5)
    # lesion candidate sites: periventricular and deep white matter (2 mm lattice)
    inside2 = ndimage.distance_transform_edt(b2) * 2.0
    crop = (slice(_PAD, -_PAD),) * 3
    inside2 = inside2[crop]
    wm2, csf2 = wm[::2, ::2, ::2], (brain - gm - wm)[::2, ::2, ::2]
    ventricles = (csf2 > 0.5) & (inside2 > 20)
    d_vent = ndimage.distance_transform_edt(~ventricles) * 2.0
    peri = np.argwhere((wm2 > 0.8) & (d_vent <= 6) & (d_vent > 1)) * 2
    deep = np.argwhere((wm2 > 0.9) & (inside2 > 15) & (d_vent > 8)) * 2
    to_world = lambda ijk: (ijk @ affine[:3, :3].T + affine[:3, 3]).astype(np.float32)  # noqa: E731
    return Template(gm=gm, wm=wm, brain=brain, head=head, head_affine=head_affine, affine=affine,
                    periventricular=to_world(peri), deep_wm=to_world(deep))


@functools.lru_cache(maxsize=8)
def smoothed_template(resolution: float, shell_mm: float = 14.0) -> dict[str, np.ndarray]:
    """Template maps blurred to the partial-volume scale of a ``resolution`` mm voxel.

    The blur is Gaussian with ``sigma = 0.5 * sqrt(h^2 - 1)`` mm, i.e. a voxel
    point-spread function of FWHM ~ 1.2 voxels on top of the template's own 1 mm.
    """
    t = load_template(shell_mm)
    s = 0.5 * float(np.sqrt(max(resolution**2 - 1.0, 0.0)))
    blur = (lambda a: ndimage.gaussian_filter(a, s, mode="constant")) if s > 0.05 else (lambda a: a)  # noqa: E731
    return {"gm": blur(t.gm), "wm": blur(t.wm), "brain": blur(t.brain)}


# --------------------------------------------------------------------------- grid


@dataclass(frozen=True)
class Grid:
    """A voxel grid: ``shape`` and a RAS ``affine`` (voxel index -> world mm)."""

    shape: tuple[int, int, int]
    affine: np.ndarray

    @property
    def spacing(self) -> float:
        return float(self.affine[0, 0])

    @property
    def origin(self) -> np.ndarray:
        return self.affine[:3, 3].copy()

    def axes(self) -> list[np.ndarray]:
        """World coordinate (mm) of the voxel centres along each axis."""
        return [self.origin[i] + self.spacing * np.arange(n) for i, n in enumerate(self.shape)]

    def to_voxel(self, pts: np.ndarray) -> np.ndarray:
        return (np.asarray(pts, dtype=np.float64) - self.origin) / self.spacing


def make_grid(resolution: float, margin_mm: float = 14.0, multiple: int = 16) -> Grid:
    """Isotropic RAS grid around the brain box plus ``margin_mm``; in-plane sizes are multiples of ``multiple``.

    The grid is centred on the MNI brain box, so the world position of the brain
    is the same at every resolution. The axial axis is the last array axis.
    """
    if resolution <= 0:
        raise ValueError(f"resolution must be positive (mm), got {resolution}")
    extent = BRAIN_BOX_MM[1] - BRAIN_BOX_MM[0] + 2 * margin_mm
    n = np.ceil(extent / resolution).astype(int)
    n[:2] = np.ceil(n[:2] / multiple).astype(int) * multiple
    origin = BRAIN_CENTRE_MM - (n - 1) / 2.0 * resolution
    affine = np.diag([resolution, resolution, resolution, 1.0])
    affine[:3, 3] = origin
    return Grid(shape=tuple(int(v) for v in n), affine=affine)


# --------------------------------------------------------------------------- deformation


@dataclass
class Deformation:
    """``y = c + M (x - c) + u(x)``: subject grid point ``x`` -> template point ``y`` (mm)."""

    matrix: np.ndarray  # 3x3
    centre: np.ndarray  # 3
    lattice: list[np.ndarray]  # world coordinates of the displacement lattice along each axis
    field: np.ndarray  # (3, lx, ly, lz) displacement on the lattice, mm

    @property
    def max_displacement(self) -> float:
        return float(np.sqrt((self.field**2).sum(0)).max())

    def on_grid(self, grid: Grid) -> list[np.ndarray]:
        """Template coordinates of every voxel of ``grid`` (three float32 arrays)."""
        ax = grid.axes()
        pos = [(f - c[0]) / (c[1] - c[0]) for c, f in zip(self.lattice, ax)]
        xs = np.meshgrid(*[(a - c).astype(np.float32) for a, c in zip(ax, self.centre)], indexing="ij", sparse=True)
        out = []
        for k in range(3):
            u = upsample_separable(self.field[k], pos)
            u += np.float32(self.centre[k])
            for j in range(3):
                u += np.float32(self.matrix[k, j]) * xs[j]
            out.append(u)
        return out

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        """Template point of subject points ``pts`` (N, 3)."""
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        idx = [(pts[:, i] - self.lattice[i][0]) / (self.lattice[i][1] - self.lattice[i][0]) for i in range(3)]
        u = np.stack([ndimage.map_coordinates(self.field[k], idx, order=1, mode="nearest") for k in range(3)], 1)
        return self.centre + (pts - self.centre) @ self.matrix.T + u

    def inverse(self, pts: np.ndarray, iterations: int = 8) -> np.ndarray:
        """Subject points whose template points are ``pts`` (fixed-point iteration)."""
        pts = np.atleast_2d(np.asarray(pts, dtype=np.float64))
        minv = np.linalg.inv(self.matrix)
        x = self.centre + (pts - self.centre) @ minv.T
        for _ in range(iterations):
            x = x + (pts - self(x)) @ minv.T
        return x


def random_deformation(rng: np.random.Generator, magnitude_mm: float, scale: np.ndarray,
                       rotation_deg: np.ndarray, spacing_mm: float = 8.0, smooth_mm: float = 24.0,
                       margin_mm: float = 40.0) -> Deformation:
    """A smooth random displacement (max norm ``magnitude_mm``) plus scaling and rotation.

    ``scale`` (3,) is the subject's head size relative to the template; the
    returned matrix maps subject to template, so it is the inverse of
    ``R diag(scale)``.
    """
    lo, hi = BRAIN_BOX_MM[0] - margin_mm, BRAIN_BOX_MM[1] + margin_mm
    lattice = [np.arange(a, b + spacing_mm, spacing_mm) for a, b in zip(lo, hi)]
    shape = tuple(len(v) for v in lattice)
    field = np.stack([ndimage.gaussian_filter(rng.standard_normal(shape), smooth_mm / spacing_mm, mode="reflect")
                      for _ in range(3)])
    norm = np.sqrt((field**2).sum(0)).max()
    field *= magnitude_mm / max(norm, 1e-12)
    ax, ay, az = np.deg2rad(rotation_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    ry = np.array([[np.cos(ay), 0, np.sin(ay)], [0, 1, 0], [-np.sin(ay), 0, np.cos(ay)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    forward = rz @ ry @ rx @ np.diag(scale)
    return Deformation(matrix=np.linalg.inv(forward), centre=BRAIN_CENTRE_MM.copy(), lattice=lattice, field=field)


def sample(volume: np.ndarray | list[np.ndarray], affine: np.ndarray, coords: list[np.ndarray]):
    """Trilinear sample of ``volume`` (voxel->world ``affine``, axis-aligned) at world ``coords``; 0 outside.

    A list of volumes on the same grid is sampled in one pass (torch ``grid_sample``),
    and a list of arrays is returned.
    """
    import torch

    vols = volume if isinstance(volume, list) else [volume]
    shape = vols[0].shape
    idx = [(np.asarray(c, np.float32) - np.float32(affine[i, 3])) / np.float32(affine[i, i])
           for i, c in enumerate(coords)]
    # grid_sample wants (x, y, z) = (last, middle, first) axis, normalised to [-1, 1] (align_corners=True)
    g = np.stack([idx[2] * np.float32(2.0 / (shape[2] - 1)) - 1, idx[1] * np.float32(2.0 / (shape[1] - 1)) - 1,
                  idx[0] * np.float32(2.0 / (shape[0] - 1)) - 1], -1).reshape(1, 1, 1, -1, 3)
    inp = torch.from_numpy(np.stack([np.asarray(v, np.float32) for v in vols])[None])
    with torch.no_grad():
        out = torch.nn.functional.grid_sample(inp, torch.from_numpy(g), mode="bilinear", padding_mode="zeros",
                                              align_corners=True)
    res = [o.reshape(np.shape(coords[0])) for o in out[0, :, 0, 0].numpy()]
    return res if isinstance(volume, list) else res[0]


# --------------------------------------------------------------------------- lesions


@dataclass
class Lesion:
    centre: list[float]  # template mm
    radii: list[float]  # mm, ellipsoid semi-axes
    periventricular: bool


def random_lesions(rng: np.random.Generator, count: int, template: Template,
                   median_radius_mm: float = 3.0) -> list[Lesion]:
    """``count`` white-matter hyperintensities: 60 % periventricular, sizes log-normal."""
    out = []
    for _ in range(count):
        peri = bool(rng.random() < 0.6)
        pool = template.periventricular if peri else template.deep_wm
        c = pool[rng.integers(len(pool))].astype(np.float64) + rng.normal(0, 1.0, 3)
        r = median_radius_mm * np.exp(rng.normal(0, 0.45))
        radii = np.clip(r * np.exp(rng.normal(0, 0.3, 3)), 1.0, 12.0)
        out.append(Lesion(centre=[float(v) for v in c], radii=[float(v) for v in radii], periventricular=peri))
    return out


def lesion_map(lesions: list[Lesion], template: Template, resolution: float,
               rng: np.random.Generator) -> np.ndarray:
    """Soft lesion occupancy on the template grid (irregular ellipsoids, blurred like the template)."""
    out = np.zeros(template.gm.shape, dtype=np.float32)
    s = 0.5 * float(np.sqrt(max(resolution**2 - 1.0, 0.0))) + 0.5
    inv = np.linalg.inv(template.affine)
    for les in lesions:
        c = inv[:3, :3] @ np.asarray(les.centre) + inv[:3, 3]
        half = np.asarray(les.radii) * 1.6 + 8.0  # independent of resolution: same shape at every h
        lo = np.maximum(np.floor(c - half).astype(int), 0)
        hi = np.minimum(np.ceil(c + half).astype(int) + 1, out.shape)
        if np.any(hi <= lo):
            continue
        g = np.meshgrid(*[np.arange(a, b) - cc for a, b, cc in zip(lo, hi, c)], indexing="ij")
        rho = np.sqrt(sum((gi / ri) ** 2 for gi, ri in zip(g, les.radii)))
        # irregular boundary: radius modulated by smooth noise
        wobble = ndimage.gaussian_filter(rng.standard_normal(rho.shape), 2.0)
        wobble /= max(np.abs(wobble).max(), 1e-6)
        blob = (rho < 1.0 + 0.35 * wobble).astype(np.float32)
        blob = ndimage.gaussian_filter(blob, s)
        sl = tuple(slice(a, b) for a, b in zip(lo, hi))
        out[sl] = np.maximum(out[sl], blob)
    return out
