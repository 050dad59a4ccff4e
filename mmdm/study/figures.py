"""How the book draws its figures: a size and type that a reader can read at 1280 px, and the
views of the paper's Fig. 3 (which region of the axial MIP is zoomed, and the colour limits).

The book's text column is about 750 px wide at a 1280 px screen; a figure drawn
:data:`BOOK_WIDTH_IN` inches wide is shown at about its natural size there, so its fonts
(:data:`BOOK_RC`) appear at their nominal size (11 pt is about 14 px).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

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
