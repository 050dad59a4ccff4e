"""Registration of T1/T2/PD to the TOF-MRA with SimpleITK, and resampling onto the MRA grid.

The MRA is the fixed image (as in prior IXI MRA-synthesis work). Each source is
registered in two stages, rigid (Euler3D, 6 parameters) then affine (12,
initialised with the rigid result), each multi-resolution (shrink factors with
Gaussian smoothing), maximising Mattes mutual information. The transform maps a
point of the MRA to the corresponding point of the source, so the registered
source is ``source(T(x))`` sampled on the output grid (linear interpolation).

Coordinates: nibabel affines are RAS (x to the right), ITK's physical space is
LPS; :func:`to_sitk` and :func:`from_sitk` convert between the two, so a voxel
has the same world position in both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from mmdm.config import ConfigError
from mmdm.data.layout import DatasetError

#: RAS <-> LPS (its own inverse).
FLIP = np.diag([-1.0, -1.0, 1.0])


@dataclass
class RegistrationConfig:
    """Settings of the rigid-then-affine mutual-information registration."""

    stages: tuple[str, ...] = ("rigid", "affine")
    initializer: str = "header"  # header (scanner coordinates), geometry (image centres), moments (centres of mass)
    histogram_bins: int = 50
    max_samples: int = 100_000  # random metric samples per level (the percentage is derived per level)
    shrink_factors: tuple[int, ...] = (4, 2, 1)
    smoothing_sigmas: tuple[float, ...] = (2.0, 1.0, 0.0)  # in voxels of each level
    iterations: int = 200  # per level and stage
    learning_rate: float = 2.0  # largest step, ~mm with physical-shift scales
    min_step: float = 1e-3
    relaxation: float = 0.5
    eval_samples: int = 500_000  # samples for the reported (full-resolution) metric
    fixed_mask: bool = True  # sample the metric only in the MRA's head (Otsu threshold, dilated)
    gradient_filter: bool = False  # ITK's smoothed gradient images; off = central differences (more robust here)
    seed: int = 0  # of the metric's random sampling; fixed, so a registration repeats exactly
    threads: int = 0  # ITK threads; 0 = SimpleITK's default

    def __post_init__(self) -> None:
        bad = [s for s in self.stages if s not in ("rigid", "affine")]
        if bad or not self.stages:
            raise ConfigError(f"RegistrationConfig.stages: {list(self.stages)}; use 'rigid', 'affine' or both, "
                              "in that order")
        if self.initializer not in ("header", "geometry", "moments"):
            raise ConfigError(f"RegistrationConfig.initializer: '{self.initializer}'; choose header, geometry "
                              "or moments")
        if self.seed < 0:
            raise ConfigError(f"RegistrationConfig.seed must be >= 0, got {self.seed}")
        if len(self.shrink_factors) != len(self.smoothing_sigmas):
            raise ConfigError(f"RegistrationConfig: {len(self.shrink_factors)} shrink factors but "
                              f"{len(self.smoothing_sigmas)} smoothing sigmas; give one of each per level")


@dataclass
class RegistrationResult:
    """The transform found for one source, and its quality figures."""

    matrix_ras: np.ndarray  # 4x4: MRA-space RAS point (mm) -> source-space RAS point (mm)
    metric_initial: float  # Mattes MI (negative; lower is better) before registration
    metric_final: float  # ... after registration
    stage_metrics: dict[str, float] = field(default_factory=dict)
    stop: dict[str, str] = field(default_factory=dict)
    rotation_deg: float = 0.0  # rotation angle of the linear part's closest rotation
    translation_mm: float = 0.0  # displacement of the fixed image's centre

    def to_json(self) -> dict:
        return {"matrix_ras": np.round(self.matrix_ras, 8).tolist(), "metric_initial": self.metric_initial,
                "metric_final": self.metric_final, "stage_metrics": self.stage_metrics, "stop": self.stop,
                "rotation_deg": self.rotation_deg, "translation_mm": self.translation_mm}


def _orthonormal(direction: np.ndarray, where: str) -> np.ndarray:
    u, _, vt = np.linalg.svd(direction)
    ortho = u @ vt
    if np.abs(ortho - direction).max() > 1e-2:
        raise DatasetError(f"{where}: the affine has a shear ({direction.round(4).tolist()}); ITK images need "
                           "orthogonal axes. Re-export the file from the scanner data without shear.")
    return ortho


def to_sitk(data: np.ndarray, affine: np.ndarray, where: str = "volume"):
    """numpy (X, Y, Z) + RAS affine -> SimpleITK image (LPS physical space, ITK index = numpy index)."""
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(np.ascontiguousarray(np.asarray(data, dtype=np.float32).transpose(2, 1, 0)))
    _set_geometry(img, affine, where)
    return img


def _set_geometry(img, affine: np.ndarray, where: str) -> None:
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    direction = _orthonormal(FLIP @ affine[:3, :3] / spacing, where)
    img.SetSpacing(spacing.tolist())
    img.SetDirection(direction.ravel().tolist())
    img.SetOrigin((FLIP @ affine[:3, 3]).tolist())


def from_sitk(img) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> (numpy (X, Y, Z) float32, RAS affine)."""
    import SimpleITK as sitk

    data = sitk.GetArrayFromImage(img).transpose(2, 1, 0).astype(np.float32)
    affine = np.eye(4)
    direction = np.asarray(img.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine[:3, :3] = FLIP @ direction * np.asarray(img.GetSpacing())
    affine[:3, 3] = FLIP @ np.asarray(img.GetOrigin())
    return data, affine


def transform_to_ras(tx) -> np.ndarray:
    """A SimpleITK matrix-offset transform (LPS) as a 4x4 RAS matrix."""
    a = np.asarray(tx.GetMatrix(), dtype=np.float64).reshape(3, 3)
    c = np.asarray(tx.GetCenter(), dtype=np.float64)
    t = np.asarray(tx.GetTranslation(), dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = FLIP @ a @ FLIP
    m[:3, 3] = FLIP @ (t + c - a @ c)
    return m


def ras_to_transform(matrix_ras: np.ndarray):
    """A 4x4 RAS matrix as a SimpleITK AffineTransform (LPS)."""
    import SimpleITK as sitk

    m = np.asarray(matrix_ras, dtype=np.float64)
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((FLIP @ m[:3, :3] @ FLIP).ravel().tolist())
    tx.SetTranslation((FLIP @ m[:3, 3]).tolist())
    return tx


def _n_voxels(img) -> int:
    return int(np.prod(img.GetSize()))


def _itk_seed(seed: int) -> int:
    """SimpleITK reads a sampling seed of 0 as "seed from the wall clock" (``sitkWallClock``), which
    would make every registration differ; shift the config's seed so that 0 is a fixed seed too."""
    return seed + 1


def _method(cfg: RegistrationConfig, fixed, levels: bool = True):
    import SimpleITK as sitk

    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=cfg.histogram_bins)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetMetricUseFixedImageGradientFilter(cfg.gradient_filter)
    reg.SetMetricUseMovingImageGradientFilter(cfg.gradient_filter)
    n = _n_voxels(fixed)
    if levels:
        pct = [min(1.0, cfg.max_samples * f ** 3 / n) for f in cfg.shrink_factors]
        reg.SetMetricSamplingPercentagePerLevel(pct, _itk_seed(cfg.seed))
        reg.SetShrinkFactorsPerLevel(list(cfg.shrink_factors))
        reg.SetSmoothingSigmasPerLevel(list(cfg.smoothing_sigmas))
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetOptimizerAsRegularStepGradientDescent(
            learningRate=cfg.learning_rate, minStep=cfg.min_step, numberOfIterations=cfg.iterations,
            relaxationFactor=cfg.relaxation, gradientMagnitudeTolerance=1e-8)
        reg.SetOptimizerScalesFromPhysicalShift()
    else:
        reg.SetMetricSamplingPercentage(min(1.0, cfg.eval_samples / n), _itk_seed(cfg.seed))
    return reg


def mattes_mi(fixed, moving, transform, cfg: RegistrationConfig = RegistrationConfig(), mask=None) -> float:
    """Mattes mutual information (SimpleITK's sign: negative, lower = better aligned) at full resolution,
    over ``mask`` (a fixed-image mask) when given."""
    reg = _method(cfg, fixed, levels=False)
    if mask is not None:
        reg.SetMetricFixedMask(mask)
    reg.SetInitialTransform(transform, inPlace=False)
    return float(reg.MetricEvaluate(fixed, moving))


def _initial(cfg: RegistrationConfig, fixed, moving):
    import SimpleITK as sitk

    tx = sitk.Euler3DTransform()
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    tx.SetCenter(centre)
    if cfg.initializer == "header":
        return tx
    mode = (sitk.CenteredTransformInitializerFilter.GEOMETRY if cfg.initializer == "geometry"
            else sitk.CenteredTransformInitializerFilter.MOMENTS)
    return sitk.CenteredTransformInitializer(fixed, moving, tx, mode)


def head_mask(img, radius: int = 2):
    """Foreground of an image: Otsu threshold of the image clipped at its 99th percentile (so that
    the few very bright vessels of a TOF-MRA do not pull the threshold up), dilated by ``radius``
    voxels, holes filled."""
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(img)
    clipped = sitk.Clamp(img, sitk.sitkFloat32, lowerBound=float(arr.min()),
                         upperBound=float(np.percentile(arr, 99)))
    mask = sitk.OtsuThreshold(clipped, 0, 1)
    mask = sitk.BinaryDilate(mask, [radius] * 3)
    return sitk.BinaryFillhole(mask)


def _rotation_angle(a: np.ndarray) -> float:
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    return float(math.degrees(math.acos(np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0))))


def register(fixed, moving, cfg: RegistrationConfig = RegistrationConfig()) -> RegistrationResult:
    """Register ``moving`` (a source) to ``fixed`` (the MRA): rigid, then affine (SimpleITK images)."""
    import SimpleITK as sitk

    previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if cfg.threads:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(cfg.threads)
    try:
        return _register(fixed, moving, cfg)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


def _register(fixed, moving, cfg: RegistrationConfig) -> RegistrationResult:
    import SimpleITK as sitk

    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    tx = _initial(cfg, fixed, moving)
    mask = head_mask(fixed) if cfg.fixed_mask else None
    metric_initial = mattes_mi(fixed, moving, tx, cfg, mask)
    stage_metrics: dict[str, float] = {}
    stop: dict[str, str] = {}
    current = tx
    for stage in cfg.stages:
        if stage == "affine":
            aff = sitk.AffineTransform(3)
            aff.SetCenter(current.GetCenter())
            aff.SetMatrix(current.GetMatrix())
            aff.SetTranslation(current.GetTranslation())
            current = aff
        reg = _method(cfg, fixed)
        if mask is not None:
            reg.SetMetricFixedMask(mask)
        reg.SetInitialTransform(current, inPlace=True)
        try:
            reg.Execute(fixed, moving)
        except RuntimeError as e:
            raise DatasetError(f"{stage} registration failed ({str(e).strip().splitlines()[-1]}). The images may "
                               "not overlap: check their orientation, or try initializer 'geometry'.") from e
        stage_metrics[stage] = float(reg.GetMetricValue())
        stop[stage] = reg.GetOptimizerStopConditionDescription()
    metric_final = mattes_mi(fixed, moving, current, cfg, mask)
    m = transform_to_ras(current)
    centre_lps = np.asarray(current.GetCenter())
    centre_ras = FLIP @ centre_lps
    shift = float(np.linalg.norm(m[:3, :3] @ centre_ras + m[:3, 3] - centre_ras))
    return RegistrationResult(matrix_ras=m, metric_initial=metric_initial, metric_final=metric_final,
                              stage_metrics=stage_metrics, stop=stop, rotation_deg=_rotation_angle(m[:3, :3]),
                              translation_mm=shift)


def resample(moving, reference, matrix_ras: np.ndarray | None = None, interpolator: str = "linear"):
    """``moving`` sampled on the grid of ``reference`` through ``matrix_ras`` (reference RAS -> moving RAS).

    Points that fall outside ``moving`` get 0.
    """
    import SimpleITK as sitk

    tx = ras_to_transform(np.eye(4) if matrix_ras is None else matrix_ras)
    interp = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}[interpolator]
    return sitk.Resample(sitk.Cast(moving, sitk.sitkFloat32), reference, tx, interp, 0.0, sitk.sitkFloat32)


def coverage(moving, reference, matrix_ras: np.ndarray) -> float:
    """Fraction of the reference grid's voxels whose mapped point falls inside ``moving``'s field of view."""
    import SimpleITK as sitk

    ones = sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(moving)
    inside = resample(ones, reference, matrix_ras, interpolator="nearest")
    return float(sitk.GetArrayViewFromImage(inside).mean())


def output_grid(shape: tuple[int, int, int], affine: np.ndarray, spacing: tuple[float, float, float] | None = None,
                in_plane_multiple: int = 16) -> tuple[tuple[int, int, int], np.ndarray]:
    """The output grid: the MRA's own (``spacing`` None), or one with ``spacing`` mm over the same field of view.

    A resampled grid keeps the MRA's axes and centre, covers at least its field of
    view, and its in-plane size (axes 0 and 1) is rounded up to ``in_plane_multiple``
    (the networks downsample by powers of two).
    """
    affine = np.asarray(affine, dtype=np.float64)
    if spacing is None:
        return tuple(int(s) for s in shape), affine.copy()
    spacing_arr = np.broadcast_to(np.asarray(spacing, dtype=np.float64), (3,)).copy()
    if np.any(spacing_arr <= 0):
        raise ConfigError(f"output spacing must be positive mm, got {spacing}")
    old = np.linalg.norm(affine[:3, :3], axis=0)
    fov = np.asarray(shape, dtype=np.float64) * old
    n = np.ceil(fov / spacing_arr - 1e-6).astype(int)
    if in_plane_multiple > 1:
        n[:2] = np.ceil(n[:2] / in_plane_multiple).astype(int) * in_plane_multiple
    dirs = affine[:3, :3] / old
    centre = affine[:3, :3] @ ((np.asarray(shape) - 1) / 2.0) + affine[:3, 3]
    new = np.eye(4)
    new[:3, :3] = dirs * spacing_arr
    new[:3, 3] = centre - new[:3, :3] @ ((n - 1) / 2.0)
    return tuple(int(v) for v in n), new


def reference_image(shape: tuple[int, int, int], affine: np.ndarray):
    """An empty SimpleITK image on a grid (for :func:`resample`)."""
    import SimpleITK as sitk

    img = sitk.Image([int(s) for s in shape], sitk.sitkUInt8)
    _set_geometry(img, affine, "output grid")
    return img
