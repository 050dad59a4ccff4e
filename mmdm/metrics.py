"""Image-quality metrics of the paper's Tables 1-3: PSNR, SSIM and RMSE(%) on the
synthesised TOF-MRA volume and on its axial maximum intensity projection (MIP).

Convention (the authors' evaluation, made explicit)
---------------------------------------------------
* **Scaling.** Both volumes are divided by the *ground truth's* maximum,
  ``pred / gt.max()`` and ``gt / gt.max()``, so the ground truth's maximum is 1
  and the data range is 1 (MR magnitudes are non-negative, so gt lies in [0, 1]). The prediction is **not** clipped by default (values above
  1 or below 0 count as errors); ``clip=True`` clamps it to [0, 1].
* **PSNR** = 10 log10(1 / MSE) over all voxels (background included), data
  range 1. Identical inputs give ``inf`` (no cap).
* **SSIM** is computed exactly as scikit-image's
  ``structural_similarity(pred, gt, data_range=1)`` with its defaults: a
  7-voxel uniform window (7x7x7 on volumes, 7x7 on images), K1 = 0.01,
  K2 = 0.03 and the sample covariance (N / (N - 1) normalisation). The SSIM map
  is averaged over the *valid* region only: scikit-image crops (win - 1) // 2
  voxels from every border before averaging, so its boundary mode never matters
  and this module filters with valid correlations. ``gaussian=True`` gives the
  variant of Wang et al. (2004): an 11-tap Gaussian window, sigma = 1.5,
  truncated at 3.5 sigma, population covariance (``use_sample_covariance=False``);
  its window is fixed by sigma, so ``win_size`` must then be left at None.
* **RMSE(%)** = 100 x sqrt(MSE) on the same [0, 1] scale, i.e. in percent of
  the ground truth's maximum. (PSNR = -20 log10(RMSE% / 100).)
* **Axial MIP** = maximum over the whole axial stack, the last array axis
  (volumes are (X, Y, Z), Z axial). It is taken on the raw volumes and the pair
  of MIPs is then scaled by the ground-truth MIP's maximum, which equals the
  ground-truth volume's maximum (a max of maxima), so the MIP metrics live on
  the same scale as the volume metrics. PSNR/SSIM (2D)/RMSE(%) as above.
* **Files** (:func:`evaluate_files`, ``mmdm evaluate``): a prediction this
  package wrote declares its scale (values = scale x TOF / TOF max) in its
  NIfTI description; it is divided by that scale and compared with
  ``target / target.max()``, the same numbers as ``mmdm evaluate-run``.

The public code computes PSNR and 3D SSIM this way; RMSE and the MIP metrics are
not in it, and are defined here as stated above.

Options
-------
* ``mask`` (a brain mask): :func:`evaluate_volumes` zeroes both volumes outside
  the mask (skull-stripping) and scales by the ground-truth maximum *inside*
  the mask; PSNR and RMSE average over mask voxels only; SSIM is the mean of the
  SSIM map over the mask voxels that lie in the valid (cropped) region. The MIP
  metrics use the MIPs of the stripped volumes and the mask's axial footprint
  (``mask.any(axis=-1)``). Hence nothing outside the mask affects any of the
  six numbers. The low-level :func:`psnr`, :func:`rmse_percent` and
  :func:`ssim` only restrict the averaging to the mask.
* ``per_slice_ssim=True``: the volume SSIM is the mean over axial slices of the
  2D SSIM of each slice (the MIP SSIM is 2D anyway); with a mask, slices without
  a mask voxel in their valid region are left out of that mean.

Implementation
--------------
Everything is computed in torch float64, on the device of a tensor input (numpy
inputs on the CPU, or ``device=``). Separable filtering is a valid 1D
correlation per axis written as shifted weighted sums, which on the CPU is
several times faster than float64 ``torch.nn.functional.conv3d`` and runs
unchanged on a GPU. On the CPU, volumes are streamed plane by plane along the
first axis (cache-sized pieces, no volume-sized temporaries); on a GPU they are
done in one piece. :func:`evaluate_volumes` does not materialise the scaled
volumes: it computes in raw units with data range = gt max, which equals the
scaled computation up to rounding (PSNR and RMSE are ratios to the data range,
and SSIM is invariant to a common scale of both images and the data range).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from mmdm.io import declared_tof_scale

ArrayLike = np.ndarray | torch.Tensor
F = TypeVar("F", bound=Callable[..., Any])

#: SSIM constants (Wang et al. 2004; scikit-image defaults).
K1 = 0.01
K2 = 0.03
#: Gaussian window of the Wang et al. variant.
GAUSSIAN_SIGMA = 1.5
GAUSSIAN_TRUNCATE = 3.5
#: Uniform window of scikit-image's default SSIM.
DEFAULT_WIN_SIZE = 7
#: Keys of :func:`evaluate_volumes`, in the order of the paper's tables.
METRIC_KEYS = ("psnr", "ssim", "rmse", "mip_psnr", "mip_ssim", "mip_rmse")
#: Affines of two files agree when every entry differs by at most this (mm).
AFFINE_ATOL = 1e-3
#: torch CPU threads while a metric runs (restored afterwards); None keeps torch's setting.
#: The work is many small memory-bound ops: extra threads gain little, and on a busy
#: 2-core machine their spin-waiting made evaluate_volumes 5-30x slower.
CPU_THREADS: int | None = 1


@contextlib.contextmanager
def _cpu_threads() -> Iterator[None]:
    old = torch.get_num_threads()
    if CPU_THREADS is None or CPU_THREADS == old:
        yield
        return
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _with_cpu_threads(fn: F) -> F:
    """Run ``fn`` with :data:`CPU_THREADS` torch threads."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _cpu_threads():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


@dataclass
class MetricsConfig:
    """Options of :func:`evaluate_volumes`; ``evaluate_volumes(p, t, **to_dict(cfg))``."""

    clip: bool = False
    gaussian: bool = False
    win_size: int | None = None
    per_slice_ssim: bool = False


# ----------------------------------------------------------------------------
# input handling


def _pick_device(*arrays: Any, device: str | torch.device | None = None) -> torch.device:
    if device is not None:
        return torch.device(device)
    for a in arrays:
        if isinstance(a, torch.Tensor):
            return a.device
    return torch.device("cpu")


def _as_float64(x: ArrayLike, name: str, device: torch.device) -> torch.Tensor:
    """``x`` as a float64 tensor on ``device``; NaN / inf raise ValueError."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device=device, dtype=torch.float64)
    else:
        arr = np.asarray(x)
        if arr.dtype == object:
            raise TypeError(f"{name}: expected a numeric numpy array or torch tensor, got {type(x).__name__}")
        arr = arr.astype(np.float64, copy=False)
        if any(st < 0 for st in arr.strides) or not arr.flags.writeable:  # torch cannot wrap these
            arr = arr.copy()
        t = torch.as_tensor(arr, device=device)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(t.shape)}); pass a non-empty image.")
    if bool(torch.isfinite(t.sum())):  # one cheap pass; a NaN / inf makes the sum non-finite
        return t
    bad = ~torch.isfinite(t)
    if bool(bad.any()):
        n_nan = int(torch.isnan(t).sum())
        raise ValueError(f"{name} contains {n_nan} NaN and {int(bad.sum()) - n_nan} infinite value(s) "
                         f"out of {t.numel()}; metrics are undefined. Fix the image (e.g. replace NaN by 0 "
                         f"where the scanner had no signal) before evaluating.")
    return t


def _as_mask(mask: ArrayLike | None, shape: tuple[int, ...], device: torch.device,
             name: str = "mask") -> torch.Tensor | None:
    """Boolean mask (non-zero = inside) of ``shape`` or None."""
    if mask is None:
        return None
    if isinstance(mask, torch.Tensor):
        m = mask.detach().to(device)
    else:
        m = torch.as_tensor(np.asarray(mask), device=device)
    if tuple(m.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(m.shape)} but the images have shape {tuple(shape)}; "
                         f"pass a mask on the same voxel grid as the images.")
    m = m != 0
    if not bool(m.any()):
        raise ValueError(f"{name} is empty (no non-zero voxel); pass a mask that covers the region to evaluate "
                         f"or mask=None for the whole image.")
    return m


def _pair(pred: ArrayLike, target: ArrayLike, device: str | torch.device | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    pred_shape = tuple(pred.shape)
    target_shape = tuple(target.shape)
    if pred_shape != target_shape:
        raise ValueError(f"pred has shape {pred_shape} but target has shape {target_shape}; "
                         f"both must be on the same voxel grid (resample the prediction onto the target).")
    dev = _pick_device(pred, target, device=device)
    return _as_float64(pred, "pred", dev), _as_float64(target, "target", dev)


def _check_range(data_range: float) -> float:
    data_range = float(data_range)
    if not data_range > 0 or not math.isfinite(data_range):
        raise ValueError(f"data_range must be a positive finite number, got {data_range}; pass the intensity "
                         f"range of the images (1.0 after scale_pair).")
    return data_range


# ----------------------------------------------------------------------------
# scaling and projection


def _peak(t: torch.Tensor, mask: torch.Tensor | None) -> float:
    """The ground truth's maximum (inside ``mask``); it must be positive to scale by it."""
    peak = float(t[mask].max() if mask is not None else t.max())
    if not peak > 0:
        where = " inside the mask" if mask is not None else ""
        raise ValueError(f"the target's maximum{where} is {peak} (<= 0): cannot scale by the ground-truth "
                         f"maximum. The ground truth is empty or all zero; check that the right file was "
                         f"passed and that it contains an image.")
    return peak


def scale_pair(pred: ArrayLike, target: ArrayLike, clip: bool = False, mask: ArrayLike | None = None,
               device: str | torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Divide both images by the target's maximum (inside ``mask`` if given).

    Returns float64 tensors ``(pred / m, target / m)``; ``clip=True`` clamps the
    scaled prediction to [0, 1]. Raises ValueError when the maximum is not
    positive (an empty / all-zero ground truth cannot be scaled).
    """
    p, t = _pair(pred, target, device)
    peak = _peak(t, _as_mask(mask, tuple(t.shape), t.device))
    p = p / peak
    return (p.clamp_(0.0, 1.0) if clip else p), t / peak


def axial_mip(volume: ArrayLike) -> ArrayLike:
    """Axial maximum intensity projection: max over the last axis (Z) of an (X, Y, Z) volume.

    Returns the same kind of object as the input (numpy array or torch tensor).
    """
    if volume.ndim != 3:
        raise ValueError(f"axial_mip expects an (X, Y, Z) volume, got shape {tuple(volume.shape)}")
    if isinstance(volume, torch.Tensor):
        return volume.amax(dim=-1)
    return np.max(np.asarray(volume), axis=-1)


# ----------------------------------------------------------------------------
# PSNR / RMSE


def _slab_step(x: torch.Tensor) -> int:
    """Planes per slab along axis 0 for streamed reductions (whole tensor on a GPU)."""
    budget = CHUNK_VOXELS.get(x.device.type, CHUNK_VOXELS["cuda"])
    return max(1, budget // max(1, math.prod(x.shape[1:])))


def _mse(p: torch.Tensor, t: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Mean squared difference over all (or mask) voxels, in slabs (no volume-sized temporary)."""
    sse = torch.zeros((), dtype=torch.float64, device=p.device)
    step = _slab_step(p)
    for a in range(0, p.shape[0], step):
        d = p[a:a + step] - t[a:a + step]
        if mask is not None:
            d = d[mask[a:a + step]]
        sse = sse + d.mul_(d).sum()
    n = int(mask.sum()) if mask is not None else p.numel()
    return float(sse) / n


def _psnr_from_mse(mse: float, data_range: float) -> float:
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range * data_range / mse)


@_with_cpu_threads
def psnr(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0, mask: ArrayLike | None = None) -> float:
    """PSNR = 10 log10(data_range^2 / MSE) in dB over all (or mask) voxels; ``inf`` when MSE = 0."""
    data_range = _check_range(data_range)
    p, t = _pair(pred, target)
    return _psnr_from_mse(_mse(p, t, _as_mask(mask, tuple(t.shape), t.device)), data_range)


@_with_cpu_threads
def rmse_percent(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0,
                 mask: ArrayLike | None = None) -> float:
    """RMSE(%) = 100 sqrt(MSE) / data_range over all (or mask) voxels."""
    data_range = _check_range(data_range)
    p, t = _pair(pred, target)
    mse = _mse(p, t, _as_mask(mask, tuple(t.shape), t.device))
    return 100.0 * math.sqrt(mse) / data_range


# ----------------------------------------------------------------------------
# SSIM


def _window(win_size: int | None, gaussian: bool, sigma: float = GAUSSIAN_SIGMA) -> torch.Tensor:
    """1D window weights (sum 1), float64, as scipy's uniform / gaussian filters use them."""
    if gaussian:
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        radius = int(GAUSSIAN_TRUNCATE * sigma + 0.5)
        if win_size is not None and win_size != 2 * radius + 1:
            raise ValueError(f"with gaussian=True the window is fixed by sigma ({2 * radius + 1} taps for "
                             f"sigma={sigma}); got win_size={win_size}. Leave win_size=None.")
        x = torch.arange(-radius, radius + 1, dtype=torch.float64)
        w = torch.exp(-0.5 * (x / sigma) ** 2)
        return w / w.sum()
    win = DEFAULT_WIN_SIZE if win_size is None else int(win_size)
    if win < 3 or win % 2 == 0:
        raise ValueError(f"win_size must be an odd integer >= 3, got {win_size}")
    return torch.full((win,), 1.0 / win, dtype=torch.float64)


def _filter_valid(x: torch.Tensor, w: list[float], dims: tuple[int, ...]) -> torch.Tensor:
    """Separable valid correlation of ``x`` with 1D weights ``w`` along ``dims``.

    Along each axis the output has length L - k + 1 and equals sum_i w_i x[.., j + i, ..]:
    k shifted in-place additions, which beat float64 ``conv3d`` on the CPU and run on a GPU.
    """
    k = len(w)
    for d in sorted(dims, reverse=True):  # last (contiguous) axis first: measured fastest
        n = x.shape[d] - k + 1
        out = x.narrow(d, 0, n) * w[0]
        for i in range(1, k):
            out.add_(x.narrow(d, i, n), alpha=w[i])
        x = out
    return x


#: SSIM working-set size in voxels: larger inputs are streamed plane by plane along axis 0
#: on the CPU (cache-sized pieces, no huge temporaries); on a GPU the whole volume at once.
CHUNK_VOXELS = {"cpu": 2 ** 16, "cuda": 2 ** 27}
#: Planes smaller than this are never streamed (per-plane Python overhead would dominate).
MIN_STREAM_PLANE = 4096


def _ssim_from_moments(f: torch.Tensor, cov_norm: float, c1: float, c2: float) -> torch.Tensor:
    """SSIM (Wang et al. 2004, eq. 13) from the stacked local moments (ux, uy, uxx, uyy, uxy); in place."""
    ux, uy, uxx, uyy, uxy = f.unbind(0)
    vx = uxx.sub_(ux * ux).mul_(cov_norm)
    vy = uyy.sub_(uy * uy).mul_(cov_norm)
    vxy = uxy.sub_(ux * uy).mul_(cov_norm)
    a1 = (ux * uy).mul_(2.0).add_(c1)
    a2 = vxy.mul_(2.0).add_(c2)
    b1 = ux.mul_(ux).add_(uy.mul_(uy)).add_(c1)
    b2 = vx.add_(vy).add_(c2)
    return a1.mul_(a2).div_(b1.mul_(b2))


def _ssim_chunks(p: torch.Tensor, t: torch.Tensor, w: list[float], dims: tuple[int, ...], data_range: float,
                 sample_cov: bool, k1: float, k2: float) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield ``(start, S)``: consecutive slabs (along axis 0) of the valid SSIM map.

    ``dims`` are the filtered axes and must include 0. Small inputs are done in one
    piece. Large ones are streamed: groups of input planes are filtered along the
    other axes once, kept in a queue of the last k filtered planes, and each output
    plane is the weighted sum of k queued planes (the filter along axis 0), so no
    voxel is filtered twice and no large temporary is made.
    """
    k = len(w)
    n_win = k ** len(dims)
    cov_norm = n_win / (n_win - 1.0) if sample_cov else 1.0
    c1 = (k1 * data_range) ** 2
    c2 = (k2 * data_range) ** 2
    other = tuple(d + 1 for d in dims if d != 0)  # axes of the stacked (5, ...) tensor
    budget = CHUNK_VOXELS.get(p.device.type, CHUNK_VOXELS["cuda"])
    plane = math.prod(p.shape[1:])
    if p.numel() <= budget or plane < MIN_STREAM_PLANE:
        q = torch.stack((p, t, p * p, t * t, p * t))
        yield 0, _ssim_from_moments(_filter_valid(q, w, (1, *other)), cov_norm, c1, c2)
        return
    step = max(1, budget // plane)
    queue: collections.deque[torch.Tensor] = collections.deque()
    start = 0
    for a in range(0, p.shape[0], step):
        xs, ys = p[a:a + step], t[a:a + step]
        q = _filter_valid(torch.stack((xs, ys, xs * xs, ys * ys, xs * ys)), w, other)
        queue.extend(q.unbind(1))
        while len(queue) >= k:
            f = queue[0] * w[0]
            for i in range(1, k):
                f.add_(queue[i], alpha=w[i])
            queue.popleft()
            yield start, _ssim_from_moments(f, cov_norm, c1, c2).unsqueeze(0)
            start += 1


def _ssim_setup(p: torch.Tensor, win_size: int | None, gaussian: bool, dims: tuple[int, ...]) -> list[float]:
    w = [float(v) for v in _window(win_size, gaussian)]
    for d in dims:
        if p.shape[d] < len(w):
            raise ValueError(f"image shape {tuple(p.shape)} is smaller than the {len(w)}-voxel SSIM window along "
                             f"axis {d}; use a smaller odd win_size (>= 3) or evaluate a larger image.")
    return w


def _crop(x: torch.Tensor, k: int, dims: tuple[int, ...]) -> torch.Tensor:
    pad = (k - 1) // 2
    for d in dims:
        x = x.narrow(d, pad, x.shape[d] - 2 * pad)
    return x


def _ssim_mean(p: torch.Tensor, t: torch.Tensor, data_range: float, win_size: int | None, gaussian: bool,
               mask: torch.Tensor | None, per_slice: bool, k1: float = K1, k2: float = K2) -> float:
    """Mean SSIM over the valid region (and the mask); per axial slice first if ``per_slice``."""
    dims = (0, 1) if per_slice else tuple(range(p.ndim))
    w = _ssim_setup(p, win_size, gaussian, dims)
    m = None if mask is None else _crop(mask, len(w), dims)
    if m is not None and not bool(m.any()):
        raise ValueError(f"no mask voxel lies at least {(len(w) - 1) // 2} voxels from the image border, where "
                         f"the SSIM map is defined; use a larger mask or mask=None.")
    red = (0, 1) if per_slice else tuple(range(p.ndim))
    total = torch.zeros((), dtype=torch.float64, device=p.device)
    count = torch.zeros((), dtype=torch.float64, device=p.device)
    for start, s in _ssim_chunks(p, t, w, dims, data_range, not gaussian, k1, k2):
        if m is None:
            total = total + s.sum(dim=red)
            count = count + math.prod(s.shape[d] for d in red)
        else:
            mc = m[start:start + s.shape[0]].to(s.dtype)
            total = total + (s * mc).sum(dim=red)
            count = count + mc.sum(dim=red)
    if not per_slice:
        return float(total / count)
    keep = count > 0  # slices without (valid) mask voxels are left out
    return float((total[keep] / count[keep]).mean())


@_with_cpu_threads
def ssim_map(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0, win_size: int | None = None,
             gaussian: bool = False, per_slice: bool = False, k1: float = K1, k2: float = K2) -> torch.Tensor:
    """SSIM map (Wang et al. 2004, eq. 13) on the valid region, as a float64 tensor.

    Every filtered axis is cropped by (win - 1) // 2 at both ends, as scikit-image
    crops before averaging; with ``per_slice`` only the in-plane axes (0, 1) are
    filtered (2D SSIM of each axial slice) and the axial axis is kept whole.
    """
    data_range = _check_range(data_range)
    p, t = _pair(pred, target)
    dims = (0, 1) if per_slice else tuple(range(p.ndim))
    w = _ssim_setup(p, win_size, gaussian, dims)
    return torch.cat([s for _, s in _ssim_chunks(p, t, w, dims, data_range, not gaussian, k1, k2)], dim=0)


@_with_cpu_threads
def ssim(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0, win_size: int | None = None,
         gaussian: bool = False, mask: ArrayLike | None = None) -> float:
    """Mean SSIM of a 2D image or 3D volume (dispatch on ndim), as scikit-image computes it.

    ``win_size`` defaults to 7 (uniform window, sample covariance); ``gaussian=True``
    uses the 11-tap sigma = 1.5 Gaussian window with population covariance.
    With ``mask``: mean of the SSIM map over mask voxels inside the valid region.
    """
    if pred.ndim not in (2, 3):
        raise ValueError(f"ssim expects a 2D image or a 3D volume, got shape {tuple(pred.shape)}")
    data_range = _check_range(data_range)
    p, t = _pair(pred, target)
    return _ssim_mean(p, t, data_range, win_size, gaussian, _as_mask(mask, tuple(p.shape), p.device), False)


@_with_cpu_threads
def ssim_per_slice(pred: ArrayLike, target: ArrayLike, data_range: float = 1.0, win_size: int | None = None,
                   gaussian: bool = False, mask: ArrayLike | None = None) -> float:
    """Mean over axial slices (last axis) of the 2D SSIM of each slice of an (X, Y, Z) volume.

    With ``mask``: per slice, the mean of the 2D SSIM map over mask voxels in the
    valid region; slices without such voxels are left out of the average.
    """
    if pred.ndim != 3:
        raise ValueError(f"ssim_per_slice expects an (X, Y, Z) volume, got shape {tuple(pred.shape)}")
    data_range = _check_range(data_range)
    p, t = _pair(pred, target)
    return _ssim_mean(p, t, data_range, win_size, gaussian, _as_mask(mask, tuple(p.shape), p.device), True)


# ----------------------------------------------------------------------------
# the six numbers of the paper's tables


@_with_cpu_threads
def evaluate_volumes(pred: ArrayLike, target: ArrayLike, mask: ArrayLike | None = None,
                     per_slice_ssim: bool = False, *, clip: bool = False, gaussian: bool = False,
                     win_size: int | None = None, device: str | torch.device | None = None) -> dict[str, float]:
    """PSNR, SSIM, RMSE(%) of the volume and of its axial MIP (Tables 1-3).

    Returns ``{psnr, ssim, rmse, mip_psnr, mip_ssim, mip_rmse}`` as floats; see the
    module docstring for the convention (gt-max scaling, data range 1, mask rules).
    """
    if pred.ndim != 3 or target.ndim != 3:
        raise ValueError(f"evaluate_volumes expects two (X, Y, Z) volumes, got shapes {tuple(pred.shape)} "
                         f"and {tuple(target.shape)}")
    p, t = _pair(pred, target, device)
    m = _as_mask(mask, tuple(t.shape), t.device)
    if m is not None:  # skull-strip, so that nothing outside the mask can influence any metric
        p = p * m
        t = t * m
    # Scaling by the gt max and using data range 1 is done implicitly: the metrics are
    # computed in raw units with data range = gt max, which is the same up to rounding
    # (SSIM is invariant to a common scale of images and data range) and saves two passes.
    peak = _peak(t, m)
    if clip:
        p = p.clamp(0.0, peak)
    mse = _mse(p, t, m) / peak ** 2
    vol_ssim = _ssim_mean(p, t, peak, win_size, gaussian, m, per_slice_ssim)

    mip_m = m.any(dim=-1) if m is not None else None
    mp, mt = p.amax(dim=-1), t.amax(dim=-1)  # clipping commutes with the max
    mip_peak = _peak(mt, mip_m)  # equals peak: a max of maxima
    mip_mse = _mse(mp, mt, mip_m) / mip_peak ** 2
    return {
        "psnr": _psnr_from_mse(mse, 1.0),
        "ssim": vol_ssim,
        "rmse": 100.0 * math.sqrt(mse),
        "mip_psnr": _psnr_from_mse(mip_mse, 1.0),
        "mip_ssim": _ssim_mean(mp, mt, mip_peak, win_size, gaussian, mip_m, False),
        "mip_rmse": 100.0 * math.sqrt(mip_mse),
    }


def _load_nifti(path: str | Path, role: str) -> tuple[np.ndarray, np.ndarray]:
    import nibabel as nib

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{role} file {path} does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float64)
    except (EOFError, OSError, zlib.error, ValueError, nib.filebasedimages.ImageFileError) as e:
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{role} file {path} is not a readable NIfTI volume (truncated, damaged or another format: "
                         f"{type(e).__name__}: {first}); write it again or pass a .nii/.nii.gz file") from e
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{role} file {path} has shape {data.shape}; expected a 3D (X, Y, Z) volume.")
    n_nan = int(np.isnan(data).sum())
    n_inf = int(np.isinf(data).sum())
    if n_nan or n_inf:  # counted in the file itself, before any scaling spreads a NaN to every voxel
        raise ValueError(f"{role} file {path} contains {n_nan} NaN and {n_inf} infinite voxel(s) out of {data.size}; "
                         "metrics are undefined. Fix the image (e.g. replace NaN by 0 where the scanner had no "
                         "signal) before evaluating.")
    return data, np.asarray(img.affine, dtype=np.float64)


def _check_same_grid(a_path: str | Path, a: tuple[np.ndarray, np.ndarray], a_role: str,
                     b_path: str | Path, b: tuple[np.ndarray, np.ndarray], b_role: str) -> None:
    (a_data, a_aff), (b_data, b_aff) = a, b
    if a_data.shape != b_data.shape:
        raise ValueError(f"shape mismatch: {a_role} {a_path} has shape {a_data.shape} but {b_role} {b_path} has "
                         f"shape {b_data.shape}. Resample the {a_role} onto the {b_role}'s grid (same shape and "
                         f"affine) or pass the matching pair of files.")
    if not np.allclose(a_aff, b_aff, rtol=0.0, atol=AFFINE_ATOL):
        fmt = lambda m: np.array2string(m, precision=4, suppress_small=True).replace("\n", "")  # noqa: E731
        raise ValueError(f"affine mismatch (tolerance {AFFINE_ATOL} mm): {a_role} {a_path} has affine {fmt(a_aff)} "
                         f"but {b_role} {b_path} has affine {fmt(b_aff)}. The images are not on the same voxel "
                         f"grid: resample the {a_role} onto the {b_role} (or save it with the {b_role}'s affine "
                         f"if only the header is wrong).")


def evaluate_files(pred_path: str | Path, target_path: str | Path, mask_path: str | Path | None = None,
                   **options: Any) -> dict[str, float]:
    """:func:`evaluate_volumes` on NIfTI files; shapes and affines must agree.

    Intensity convention: a prediction written by this package (``mmdm synthesize``,
    ``mmdm evaluate-run``) declares in its NIfTI description that its values are
    ``scale x TOF / TOF max`` (:func:`mmdm.io.declared_tof_scale`); it is divided by
    ``scale`` and compared with ``target / target.max()``, exactly as run evaluation
    scores it. Any other prediction is taken to be in the target's units (both are
    scaled by the target's maximum, the module's convention).
    ``options`` are the keyword options of :func:`evaluate_volumes` (see :class:`MetricsConfig`).
    """
    import nibabel as nib

    pred = _load_nifti(pred_path, "prediction")
    target = _load_nifti(target_path, "target")
    _check_same_grid(pred_path, pred, "prediction", target_path, target, "target")
    scale = declared_tof_scale(nib.load(str(pred_path)).header["descrip"].item())
    if scale is not None:
        if scale <= 0 or not np.isfinite(scale):
            raise ValueError(f"prediction {pred_path} declares a non-positive intensity scale {scale}")
        peak = float(target[0].max())
        if peak <= 0:
            raise ValueError(f"target {target_path} has no positive voxel: cannot scale it by its maximum")
        pred, target = (pred[0] / scale, pred[1]), (target[0] / peak, target[1])
    mask = None
    if mask_path is not None:
        mask_img = _load_nifti(mask_path, "mask")
        _check_same_grid(mask_path, mask_img, "mask", target_path, target, "target")
        mask = mask_img[0]
    return evaluate_volumes(pred[0], target[0], mask, **options)
