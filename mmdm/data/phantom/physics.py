"""MR physics of the phantom: tissue parameters at 3 T, signal equations, noise, bias.

All signals are relative to a fully relaxed magnetisation ``M0 = PD`` (arbitrary
units). Times are in milliseconds, angles in degrees, velocities in cm/s, lengths
in mm. The sources of every number are listed in ``data_cards/phantom.md``.

Signal equations (standard textbook forms, e.g. Haacke et al., *Magnetic Resonance
Imaging: Physical Principles and Sequence Design*, 1999):

* spoiled gradient echo, steady state (T1W and the static tissue of TOF-MRA)::

      S = PD sin(a) (1 - E1) / (1 - cos(a) E1) exp(-TE/T2*),   E1 = exp(-TR/T1)

* spin echo / turbo spin echo with effective TR and TE (T2W)::

      S = PD (1 - exp(-TR/T1)) exp(-TE/T2)

* inversion recovery spin echo, magnitude (FLAIR)::

      S = PD |1 - 2 exp(-TI/T1) + exp(-TR/T1)| exp(-TE/T2)

  whose null for a tissue of relaxation time T1 is at ``TI = T1 ln(2 / (1 + exp(-TR/T1)))``.

* time-of-flight inflow (3D spoiled GRE): blood enters the slab fully relaxed and
  after ``n`` RF pulses its longitudinal magnetisation is::

      Mz(n) = Mss + (PD - Mss) (cos(a) E1)^n,   Mss = PD (1 - E1) / (1 - cos(a) E1)

  with ``n = (time spent inside the slab) / TR``; the signal is ``sin(a) Mz(n) exp(-TE/T2*)``.

* flow void of a spin echo: blood that leaves the excited slice between the
  90 degree and 180 degree pulses gives no echo, so the fraction of the blood
  signal kept is ``max(0, 1 - v (TE/2) / thickness)`` (wash-out).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

# --------------------------------------------------------------------------- tissues


@dataclass
class Tissue:
    """Relaxation times (ms) and proton density (relative to pure water) at 3 T."""

    t1: float
    t2: float
    pd: float


def default_tissues() -> dict[str, Tissue]:
    """Literature values at 3 T (see the data card for sources).

    GM/WM T1 and T2: Wansapura et al. 1999; CSF: T1 from Rooney et al. 2007 (~4.3 s),
    T2 ~ 2 s (order of magnitude, several studies); arterial blood T1: Lu et al. 2004
    (1.66 s at Hct 0.42, as in the ASL consensus, Alsop et al. 2015), arterial T2:
    Zhao et al. 2007 (~150-170 ms at Y ~ 0.98); muscle (extracerebral shell):
    Stanisz et al. 2005; PD: water content (Tofts 2003; Herscovitch & Raichle 1985
    for blood). White-matter hyperintensities: an assumption within reported ranges
    (longer T1 and T2 than normal white matter).
    """
    return {
        "GM": Tissue(t1=1331.0, t2=110.0, pd=0.80),
        "WM": Tissue(t1=832.0, t2=80.0, pd=0.70),
        "CSF": Tissue(t1=4300.0, t2=2000.0, pd=1.00),
        "blood": Tissue(t1=1664.0, t2=165.0, pd=0.87),
        "lesion": Tissue(t1=1450.0, t2=180.0, pd=0.80),
        "extracerebral": Tissue(t1=1412.0, t2=50.0, pd=0.75),
    }


# --------------------------------------------------------------------------- sequences


@dataclass
class SequenceParams:
    """Acquisition parameters of the four simulated sequences (3 T, typical clinical)."""

    # T1W: 3D spoiled gradient echo (FLASH / SPGR)
    t1w_tr: float = 11.0
    t1w_te: float = 4.6
    t1w_flip: float = 15.0
    # T2W: 2D turbo spin echo
    t2w_tr: float = 5000.0
    t2w_te: float = 100.0
    t2w_slice_mm: float = 4.0
    # FLAIR: 2D inversion recovery TSE; TI = None -> nulls CSF (eq. in module doc)
    flair_tr: float = 9000.0
    flair_te: float = 120.0
    flair_ti: float | None = None
    flair_slice_mm: float = 4.0
    # TOF-MRA: 3D multi-slab spoiled GRE
    tof_tr: float = 22.0
    tof_te: float = 3.5
    tof_flip: float = 18.0
    tof_slab_mm: float = 40.0


def spgr_signal(pd, t1, t2, tr: float, te: float, flip_deg: float):
    """Steady-state spoiled gradient echo signal (T2 stands in for T2*)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr / np.asarray(t1, dtype=np.float64))
    return pd * np.sin(a) * (1 - e1) / (1 - np.cos(a) * e1) * np.exp(-te / np.asarray(t2, dtype=np.float64))


def tse_signal(pd, t1, t2, tr: float, te: float):
    """Spin echo / TSE signal with effective TR and TE."""
    return pd * (1 - np.exp(-tr / np.asarray(t1, dtype=np.float64))) * np.exp(-te / np.asarray(t2, dtype=np.float64))


def ir_signal(pd, t1, t2, tr: float, te: float, ti: float):
    """Magnitude inversion-recovery spin echo signal (FLAIR)."""
    t1 = np.asarray(t1, dtype=np.float64)
    mz = 1 - 2 * np.exp(-ti / t1) + np.exp(-tr / t1)
    return pd * np.abs(mz) * np.exp(-te / np.asarray(t2, dtype=np.float64))


def null_ti(t1: float, tr: float) -> float:
    """Inversion time that nulls a tissue of longitudinal relaxation ``t1``."""
    return float(t1 * np.log(2.0 / (1.0 + np.exp(-tr / t1))))


def flair_ti(seq: SequenceParams, tissues: dict[str, Tissue]) -> float:
    """The FLAIR inversion time: ``seq.flair_ti`` or the CSF null."""
    return seq.flair_ti if seq.flair_ti is not None else null_ti(tissues["CSF"].t1, seq.flair_tr)


def inflow_mz(n_pulses, pd, t1: float, tr: float, flip_deg: float):
    """Longitudinal magnetisation of blood after ``n_pulses`` RF pulses (fresh at n=0)."""
    a = np.deg2rad(flip_deg)
    e1 = np.exp(-tr / t1)
    q = np.cos(a) * e1
    mss = pd * (1 - e1) / (1 - q)
    return mss + (pd - mss) * q ** np.asarray(n_pulses, dtype=np.float64)


def tof_blood_signal(n_pulses, blood: Tissue, seq: SequenceParams):
    """TOF signal of arterial blood that has experienced ``n_pulses`` slab excitations."""
    a = np.deg2rad(seq.tof_flip)
    return np.sin(a) * inflow_mz(n_pulses, blood.pd, blood.t1, seq.tof_tr, seq.tof_flip) * np.exp(
        -seq.tof_te / blood.t2)


def washout(velocity_cm_s, te: float, thickness_mm: float):
    """Fraction of spin-echo blood signal kept: ``max(0, 1 - v (TE/2) / thickness)``."""
    dist_mm = np.asarray(velocity_cm_s, dtype=np.float64) * 10.0 * (te / 2.0) / 1000.0
    return np.clip(1.0 - dist_mm / thickness_mm, 0.0, 1.0)


def tissue_signals(tissues: dict[str, Tissue], seq: SequenceParams) -> dict[str, dict[str, float]]:
    """Signal of every *static* tissue in every modality: ``{modality: {tissue: S}}``."""
    ti = flair_ti(seq, tissues)
    out: dict[str, dict[str, float]] = {"T1w": {}, "T2w": {}, "FLAIR": {}, "angio": {}}
    for name, t in tissues.items():
        out["T1w"][name] = float(spgr_signal(t.pd, t.t1, t.t2, seq.t1w_tr, seq.t1w_te, seq.t1w_flip))
        out["T2w"][name] = float(tse_signal(t.pd, t.t1, t.t2, seq.t2w_tr, seq.t2w_te))
        out["FLAIR"][name] = float(ir_signal(t.pd, t.t1, t.t2, seq.flair_tr, seq.flair_te, ti))
        out["angio"][name] = float(spgr_signal(t.pd, t.t1, t.t2, seq.tof_tr, seq.tof_te, seq.tof_flip))
    return out


# --------------------------------------------------------------------------- corruption


def rician(signal: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Magnitude of the signal plus complex Gaussian noise of std ``sigma`` per channel."""
    re = rng.standard_normal(signal.shape, dtype=np.float32)
    re *= np.float32(sigma)
    re += signal
    im = rng.standard_normal(signal.shape, dtype=np.float32)
    im *= np.float32(sigma)
    return np.hypot(re, im)


def smooth_field(shape: tuple[int, ...], spacing_mm: float, rng: np.random.Generator,
                 correlation_mm: float = 60.0) -> np.ndarray:
    """A smooth zero-mean, unit-std random field (white noise on a coarse grid, smoothed, upsampled)."""
    coarse_step = max(correlation_mm / 4.0, spacing_mm)
    cshape = tuple(max(2, int(np.ceil(n * spacing_mm / coarse_step)) + 1) for n in shape)
    g = ndimage.gaussian_filter(rng.standard_normal(cshape), sigma=correlation_mm / (2 * coarse_step), mode="reflect")
    f = upsample_separable(g, [np.linspace(0, c - 1, n) for n, c in zip(shape, cshape)])
    f -= f.mean()
    std = f.std()
    return f / std if std > 0 else f


def interp_matrix(positions: np.ndarray, n_coarse: int) -> np.ndarray:
    """Linear-interpolation weights (len(positions) x n_coarse) at fractional coarse ``positions``."""
    pos = np.clip(np.asarray(positions, dtype=np.float64), 0, n_coarse - 1 - 1e-9)
    i0 = np.floor(pos).astype(int)
    w = pos - i0
    m = np.zeros((len(pos), n_coarse), dtype=np.float32)
    m[np.arange(len(pos)), i0] = 1 - w
    m[np.arange(len(pos)), i0 + 1] += w
    return m


def upsample_separable(coarse: np.ndarray, positions: list[np.ndarray]) -> np.ndarray:
    """Trilinear interpolation of a coarse 3D array on a tensor grid of fractional ``positions`` (fast matmuls)."""
    mx, my, mz = (interp_matrix(p, n) for p, n in zip(positions, coarse.shape))
    cx, cy, cz = coarse.shape
    nx, ny, nz = len(mx), len(my), len(mz)
    a = (mx @ coarse.astype(np.float32).reshape(cx, cy * cz)).reshape(nx, cy, cz)
    a = (my @ a.transpose(1, 0, 2).reshape(cy, nx * cz)).reshape(ny, nx, cz).transpose(1, 0, 2)
    a = np.ascontiguousarray(a).reshape(nx * ny, cz) @ mz.T
    return a.reshape(nx, ny, nz)


def bias_field(shape: tuple[int, ...], spacing_mm: float, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Multiplicative receive bias ``exp(strength * g)`` with ``g`` a smooth unit-std field."""
    return np.exp(strength * smooth_field(shape, spacing_mm, rng, correlation_mm=80.0)).astype(np.float32)
