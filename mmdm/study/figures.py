"""How the book draws its figures: a size and type that a reader can read at 1280 px, and the
views of the paper's Fig. 3 (which region of the axial MIP is zoomed, and the colour limits).

The book's text column is about 750 px wide at a 1280 px screen; a figure drawn
:data:`BOOK_WIDTH_IN` inches wide is shown at about its natural size there, so its fonts
(:data:`BOOK_RC`) appear at their nominal size (11 pt is about 14 px).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import pandas as pd

#: width (inches) of a figure that fills the book's text column
BOOK_WIDTH_IN = 8.0
#: matplotlib settings for the book's figures (``matplotlib.rcParams.update``)
BOOK_RC = {"figure.dpi": 100, "savefig.dpi": 150, "font.size": 11, "axes.titlesize": 11, "axes.labelsize": 11,
           "xtick.labelsize": 10, "ytick.labelsize": 10, "legend.fontsize": 9, "figure.titlesize": 12}


def use_book_style() -> None:
    """Apply :data:`BOOK_RC` to matplotlib."""
    import matplotlib

    matplotlib.rcParams.update(BOOK_RC)


def zoom_box(image: np.ndarray, frac: float = 0.4, quantile: float = 0.98) -> tuple[int, int, int, int]:
    """``(x0, x1, y0, y1)``: the window of ``frac`` of each side of the 2D ``image`` that holds the
    most of its brightest pixels (those at or above its ``quantile``), weighted by intensity.

    Applied to the ground truth's axial MIP it finds where the vessels are densest, so the zoomed
    region is chosen on the target alone and is the same for every method. Among equal windows the
    one with the smallest ``(x0, y0)`` is taken (deterministic)."""
    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 1:
        raise ValueError(f"zoom_box needs a 2D image, got shape {img.shape}")
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    if not np.isfinite(img).all():
        raise ValueError("zoom_box: the image has non-finite values")
    wx, wy = (max(1, int(round(frac * n))) for n in img.shape)
    bright = np.where(img >= np.quantile(img, quantile), img, 0.0)
    s = np.pad(bright.cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    sums = s[wx:, wy:] - s[:-wx, wy:] - s[wx:, :-wy] + s[:-wx, :-wy]
    x0, y0 = np.unravel_index(int(np.argmax(sums)), sums.shape)
    return int(x0), int(x0) + wx, int(y0), int(y0) + wy


def fig3_view(panels: Mapping[str, np.ndarray], who: str, view: str,
              box: tuple[int, int, int, int] | None = None) -> tuple[np.ndarray, tuple[float, float]]:
    """One panel of Fig. 3 and its colour limits.

    ``panels``: a record's ``panels.npz`` (:func:`mmdm.study.records.figure_panels`: intensities in
    fractions of the ground truth's maximum); ``who``: ``"target"`` or ``"pred"``; ``view``: ``"axial"``,
    ``"sagittal"``, ``"axial_mip"``, ``"coronal_mip"`` or ``"zoom"``, the axial MIP cut to ``box`` (:func:`zoom_box`).
    Returns the image (x, y) and its limits ``(min, max)``: every image is shown min-max normalised,
    as in the paper, black at its own minimum and white at its own maximum."""
    if view == "zoom":
        if box is None:
            raise ValueError("the zoomed view needs a box (zoom_box of the target's axial MIP)")
        x0, x1, y0, y1 = box
        img = np.asarray(panels[f"{who}_axial_mip"], dtype=np.float32)[x0:x1, y0:y1]
    else:
        img = np.asarray(panels[f"{who}_{view}"], dtype=np.float32)
    return img, (float(img.min()), float(img.max()))


#: Views of the error figure of the Fig. 3 page: view -> the panels.npz slices to subtract, best first
#: (a record written before the coronal slice was kept falls back to its coronal MIPs, labelled so).
ERROR_VIEWS = {"sagittal": (("sagittal", "mid-sagittal slice"),),
               "coronal": (("coronal", "mid-coronal slice"),
                           ("coronal_mip", "coronal MIP of the prediction − that of the target"))}


def error_view(panels: Mapping[str, np.ndarray], view: str) -> tuple[np.ndarray | None, str]:
    """Prediction minus target on one stored view (``"sagittal"`` or ``"coronal"``), in fractions of the
    target's maximum, and what it is computed on; ``(None, reason)`` when the record has neither panel."""
    if view not in ERROR_VIEWS:
        raise ValueError(f"unknown error view {view!r}; choose one of {', '.join(ERROR_VIEWS)}")
    for key, what in ERROR_VIEWS[view]:
        if f"pred_{key}" in panels and f"target_{key}" in panels:
            p = np.asarray(panels[f"pred_{key}"], dtype=np.float32)
            return p - np.asarray(panels[f"target_{key}"], dtype=np.float32), what
    return None, f"no {view} panel in this record"


def shared_error_limit(errors: list[np.ndarray | None], quantile: float = 0.99) -> float:
    """One symmetric colour limit for every error image: the median over the images of each one's
    ``quantile`` of |error|, so that neither one failing method (whose errors then saturate) nor a few
    extreme voxels set the scale for the others; 1e-3 when every error is zero."""
    per = [float(np.quantile(np.abs(e), quantile)) for e in errors if e is not None and e.size]
    lim = float(np.median(per)) if per else 0.0
    return lim if lim > 0 else 1e-3


def draw_error_views(columns: Mapping[str, Mapping[str, np.ndarray]], view: str, ncol: int = 4,
                     limit: float | None = None):
    """Prediction minus target of every run (``columns``: title -> its panels.npz) on one ``view``
    (:data:`ERROR_VIEWS`), red where the prediction is too bright and blue where too dark, on one
    symmetric colour scale shared by all (``limit``, default :func:`shared_error_limit` of this view; pass
    one limit to give several views the same scale). A panel computed on a fallback view (e.g. the
    coronal MIPs of a record without the coronal slice) says so under it.
    Returns ``(figure, limit)``."""
    import matplotlib.pyplot as plt

    errs = {title: error_view(p, view) for title, p in columns.items()}
    shown = [e for e, _ in errs.values() if e is not None]
    if not shown:
        raise ValueError(f"no record has a {view} panel")
    lim = limit if limit is not None else shared_error_limit(shown)
    h, w = shown[0].T.shape
    nrow = -(-len(errs) // ncol)
    panel_w = BOOK_WIDTH_IN / ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(BOOK_WIDTH_IN, nrow * (panel_w * h / w + 0.6) + 0.8),
                             squeeze=False, layout="constrained")
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes.flat[len(errs):]:
        ax.axis("off")
    default = ERROR_VIEWS[view][0][1]
    im = None
    for ax, (title, (e, what)) in zip(axes.flat, errs.items()):
        ax.set_title(title)
        if e is None:
            ax.text(0.5, 0.5, what, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes)
            continue
        im = ax.imshow(e.T, cmap="RdBu_r", origin="lower", vmin=-lim, vmax=lim, interpolation="nearest")
        if what != default:
            ax.set_xlabel(what.replace(" of the prediction − that of the target", " difference"), fontsize=8)
    fig.colorbar(im, ax=axes, orientation="horizontal", fraction=0.05, aspect=40,
                 label=f"prediction − target, {default} (fractions of the target's maximum)")
    return fig, lim


def slice_profile_curves(slice_errors: pd.DataFrame, bins: int = 20) -> pd.DataFrame:
    """The per-slice error profile of every run, on a common axis: positions in the axial stack
    (``(z + 0.5) / Z``) cut into ``bins`` equal bins, the MSE averaged over the slices and subjects in
    each bin, and its PSNR (dB, data range 1). Columns ``run, source, position`` (the bin centre),
    ``mse, psnr, n_subjects``; input: :func:`mmdm.study.records.load_slice_errors`."""
    cols = ["run", "source", "position", "mse", "psnr", "n_subjects"]
    if not len(slice_errors):
        return pd.DataFrame(columns=cols)
    df = slice_errors.copy()
    df["bin"] = np.minimum((df.position * bins).astype(int), bins - 1)
    g = df.groupby(["run", "source", "bin"], sort=True)
    out = g.agg(mse=("mse", "mean"), n_subjects=("subject", "nunique")).reset_index()
    out["position"] = (out["bin"] + 0.5) / bins
    out["psnr"] = 10 * np.log10(1.0 / out["mse"].clip(lower=1e-12))
    return out[cols]


def draw_slice_profiles(curves: pd.DataFrame, labels: Mapping[str, str], ncol: int = 4,
                        reference: str | None = None):
    """One small panel per run (in ``labels``' order, titled with its label): PSNR of each position
    bin of the axial stack, the outer quarters shaded, every panel on one y scale; ``reference``'s
    curve drawn dashed in grey in every other panel for comparison. Returns the figure."""
    import matplotlib.pyplot as plt

    runs = [r for r in labels if r in set(curves.run)]
    if not runs:
        raise ValueError("no run of the figure has a slice error profile")
    nrow = -(-len(runs) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(BOOK_WIDTH_IN, 2.1 * nrow + 0.4), sharex=True, sharey=True,
                             squeeze=False)
    ref = curves[curves.run == reference] if reference else None
    for ax in axes.flat[len(runs):]:
        ax.axis("off")
    for ax, run in zip(axes.flat, runs):
        c = curves[curves.run == run]
        for lo, hi in ((0, 0.25), (0.75, 1)):
            ax.axvspan(lo, hi, color="#f1f3f5", lw=0)
        if ref is not None and len(ref) and run != reference:
            ax.plot(ref.position, ref.psnr, "--", color="#868e96", lw=1, label=labels.get(reference, reference))
        ax.plot(c.position, c.psnr, "-", color="#1c7ed6", lw=1.6)
        estimate = (c.source != "whole volume").any()
        ax.set_title(labels[run] + (" *" if estimate else ""), fontsize=10)
        ax.set_xlim(0, 1)
        ax.grid(alpha=0.3)
    for ax in axes[-1]:
        ax.set_xlabel("position in stack")
    for ax in axes[:, 0]:
        ax.set_ylabel("PSNR (dB)")
    fig.tight_layout()
    return fig
