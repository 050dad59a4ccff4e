"""Scroll through whole volumes in the book: the ground truth and every Table 1 method side by side.

The paper's Fig. 3 shows one slice per view. The viewer built here shows every
axial slice of one test subject: a slider moves through the stack, a toggle
switches to the axial MIP over a slab centred on the slider's slice (its
thickness set by a second slider), and every panel (the ground truth and each
Table 1 method) follows, on **one intensity scale**: 0 to the ground truth's
maximum, as Fig. 3 and the run records' panels (everything above it is white).

The record (``results/<profile>/analysis/viewer/``: ``<subject>.npz`` with one
8-bit volume per panel, cropped to the subject's head (the ground truth above
:data:`mmdm.vessel_contrast.HEAD_THRESHOLD` of its maximum after a Gaussian
smoothing of :data:`HEAD_SMOOTH` voxels, plus :data:`MARGIN` voxels), then ``summary.json``) is small enough to commit (a few
hundred KB per method at 2 mm: the phantom's noise does not compress). :func:`viewer_html` turns it into one
self-contained block of HTML and JavaScript: the volumes are embedded
zlib-compressed and base64-encoded and decoded in the page by the browser's own
``DecompressionStream``; no kernel, no network, no library.
"""

from __future__ import annotations

import base64
import html
import io
import json
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from scipy import ndimage

from mmdm.data.layout import TARGET_MODALITY, Layout
from mmdm.data.volumes import load_volume
from mmdm.engine.rundir import RecordWriter
from mmdm.io import atomic_path
from mmdm.paths import project_path, repo_root
from mmdm.study.api import analysis_dir, retire_if_stale, runs_dir
from mmdm.study.stale import stamps
from mmdm.study.profiles import get_profile
from mmdm.study.records import portable
from mmdm.study.runs import REFERENCE_RUN, baselines, method_label
from mmdm.vessel_contrast import HEAD_THRESHOLD

#: Voxels kept around the head's bounding box.
MARGIN = 2
#: Standard deviation (voxels) of the Gaussian the ground truth is smoothed with to find the head.
HEAD_SMOOTH = 2.0
#: Default half-thickness (slices) of the sliding-slab MIP.
SLAB_HALF = 4
#: Test subjects shown per profile (the first evaluated ones; Fig. 3 shows the first).
SUBJECTS = {"smoke": 1, "quick": 1, "standard": 1, "paper": 1}
TRUTH = "ground truth"


def viewer_runs() -> list[str]:
    """The Table 1 runs, in the paper's order: MMDM full, then the baselines."""
    return [REFERENCE_RUN, *baselines()]


def run_label(run: str) -> str:
    return "MMDM full" if run == REFERENCE_RUN else method_label(run)


def head_box(target: np.ndarray, threshold: float = HEAD_THRESHOLD, margin: int = MARGIN,
             smooth: float = HEAD_SMOOTH) -> tuple[slice, ...]:
    """The bounding box of the head: ``target`` smoothed with a Gaussian of ``smooth`` voxels above
    ``threshold`` of the target's maximum (unsmoothed, single noisy air voxels would stretch it to the whole
    grid), grown by ``margin`` voxels and clipped to the grid."""
    t = np.asarray(target, np.float64)
    idx = np.argwhere(ndimage.gaussian_filter(t, smooth) > threshold * t.max())
    if idx.size == 0:
        raise ValueError("the ground truth has no voxel above the head threshold: nothing to show")
    lo = np.maximum(idx.min(0) - margin, 0)
    hi = np.minimum(idx.max(0) + 1 + margin, t.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def to_uint8(volume: np.ndarray, vmax: float) -> np.ndarray:
    """``volume / vmax`` clipped to [0, 1] and rounded to 0..255."""
    if not vmax > 0:
        raise ValueError(f"the intensity scale's maximum must be positive, got {vmax}")
    return np.rint(np.clip(np.asarray(volume, np.float64) / vmax, 0.0, 1.0) * 255.0).astype(np.uint8)


def axial_stack(volume: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> (Z, Y, X) with row 0 the largest Y: each axial slice as Fig. 3 draws it (anterior up)."""
    return np.ascontiguousarray(np.asarray(volume).transpose(2, 1, 0)[:, ::-1, :])


def subject_volumes(target: np.ndarray, predictions: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """8-bit head crops on one scale (0 to the target's maximum), as axial stacks: the ground truth first.

    ``target`` in any units; ``predictions`` scaled by the target's maximum (the runs' convention)."""
    t = np.asarray(target, np.float64)
    t = t / t.max()
    box = head_box(t)
    out = {TRUTH: axial_stack(to_uint8(t[box], 1.0))}
    for name, p in predictions.items():
        if np.shape(p) != t.shape:
            raise ValueError(f"prediction '{name}' has shape {np.shape(p)}, the ground truth {t.shape}")
        out[name] = axial_stack(to_uint8(np.asarray(p)[box], 1.0))
    return out


def write_subject(path: str | Path, volumes: Mapping[str, np.ndarray]) -> Path:
    """One subject's panels as ``.npz`` (atomic); names in order under ``names``."""
    buf = io.BytesIO()
    names = list(volumes)
    np.savez_compressed(buf, names=np.array(names), **{f"v{i}": volumes[n] for i, n in enumerate(names)})
    with atomic_path(Path(path)) as tmp:
        tmp.write_bytes(buf.getvalue())
    return Path(path)


def read_subject(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {str(n): z[f"v{i}"] for i, n in enumerate(z["names"])}


def _encode(volume: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(np.ascontiguousarray(volume, np.uint8).tobytes(), 9)).decode("ascii")


def viewer_html(volumes: Mapping[str, np.ndarray], uid: str, title: str = "", slab_half: int = SLAB_HALF) -> str:
    """A self-contained viewer of axial stacks (Z, H, W) uint8, all of one shape: a slice slider, a toggle to
    the MIP over a sliding slab and the slab's half-thickness, every panel synchronised."""
    shapes = {v.shape for v in volumes.values()}
    if len(shapes) != 1 or len(next(iter(shapes))) != 3:
        raise ValueError(f"the viewer needs (Z, H, W) volumes of one shape, got {sorted(shapes)}")
    if any(v.dtype != np.uint8 for v in volumes.values()):
        raise ValueError("the viewer shows 8-bit volumes; convert with to_uint8 first")
    uid = "".join(c if c.isalnum() else "-" for c in uid)
    z, h, w = next(iter(shapes))
    panels = "".join(
        f'<figure class="mmdm-viewer-fig"><canvas class="mmdm-viewer-panel" width="{w}" height="{h}" '
        f'data-index="{i}"></canvas><figcaption>{html.escape(name)}</figcaption></figure>'
        for i, name in enumerate(volumes))
    data = json.dumps([_encode(v) for v in volumes.values()])
    return f"""<div class="mmdm-viewer" id="mmdm-viewer-{uid}" data-mmdm-viewer="{uid}" data-ready="0">
<style>
#mmdm-viewer-{uid} .mmdm-viewer-controls {{display:flex; flex-wrap:wrap; gap:0.4em 1.2em; align-items:center;
  margin:0.3em 0; font-size:0.9em}}
#mmdm-viewer-{uid} .mmdm-viewer-grid {{display:grid; grid-template-columns:repeat(auto-fill, minmax(140px, 1fr));
  gap:6px; max-width:100%}}
#mmdm-viewer-{uid} figure {{margin:0; text-align:center}}
#mmdm-viewer-{uid} canvas {{width:100%; height:auto; image-rendering:pixelated; background:#000}}
#mmdm-viewer-{uid} figcaption {{font-size:0.8em}}
</style>
<div class="mmdm-viewer-controls">
<label>axial slice <input type="range" class="mmdm-viewer-slice" min="0" max="{z - 1}" value="{z // 2}"
 aria-label="axial slice"></label> <span class="mmdm-viewer-pos">{z // 2 + 1} / {z}</span>
<label><input type="checkbox" class="mmdm-viewer-mip"> MIP over a slab of</label>
<label><input type="range" class="mmdm-viewer-slab" min="0" max="{max(z // 2, 1)}" value="{min(slab_half, z // 2)}"
 aria-label="slab half-thickness"> <span class="mmdm-viewer-slabtxt"></span></label>
</div>
<div class="mmdm-viewer-grid">{panels}</div>
<script>
(function () {{
  const root = document.getElementById("mmdm-viewer-{uid}");
  const Z = {z}, H = {h}, W = {w};
  const encoded = {data};
  const slice = root.querySelector(".mmdm-viewer-slice"), mip = root.querySelector(".mmdm-viewer-mip");
  const slab = root.querySelector(".mmdm-viewer-slab"), pos = root.querySelector(".mmdm-viewer-pos");
  const slabtxt = root.querySelector(".mmdm-viewer-slabtxt");
  const canvases = [...root.querySelectorAll("canvas.mmdm-viewer-panel")];
  async function inflate(b64) {{
    const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
    return new Uint8Array(await new Response(stream).arrayBuffer());
  }}
  function draw(vols) {{
    const k = +slice.value, s = mip.checked ? +slab.value : 0;
    const lo = Math.max(0, k - s), hi = Math.min(Z - 1, k + s), n = H * W;
    pos.textContent = (k + 1) + " / " + Z;
    slabtxt.textContent = (2 * +slab.value + 1) + " slices";
    vols.forEach((v, i) => {{
      const ctx = canvases[i].getContext("2d"), img = ctx.createImageData(W, H), px = img.data;
      for (let p = 0; p < n; p++) {{
        let m = 0;
        for (let q = lo; q <= hi; q++) {{ const x = v[q * n + p]; if (x > m) m = x; }}
        px[4 * p] = px[4 * p + 1] = px[4 * p + 2] = m; px[4 * p + 3] = 255;
      }}
      ctx.putImageData(img, 0, 0);
      canvases[i].dataset.drawn = lo + ":" + hi;  // the slab this panel shows (a test reads it)
    }});
  }}
  Promise.all(encoded.map(inflate)).then(vols => {{
    const redraw = () => draw(vols);
    for (const el of [slice, mip, slab]) el.addEventListener("input", redraw);
    mip.addEventListener("change", redraw);
    redraw();
    root.dataset.ready = "1";
  }});
}})();
</script>
<p class="mmdm-viewer-title">{html.escape(title)}</p>
</div>"""


def load_viewer(out_dir: str | Path) -> dict[str, Any] | None:
    """``{"subjects": {subject: {panel: (Z, H, W) uint8}}, "summary"}``, or None while missing or unfinished."""
    out_dir = Path(out_dir)
    if not (out_dir / "summary.json").is_file():
        return None
    summary = json.loads((out_dir / "summary.json").read_text())
    return {"subjects": {s: read_subject(out_dir / f"{s}.npz") for s in summary["subjects"]}, "summary": summary}


def make_viewer(data_root: str | Path, runs: Mapping[str, Path], out_dir: str | Path, subjects: Sequence[str],
                profile: str | None = None) -> Path:
    """Write each subject's 8-bit head crops of the ground truth and every run's prediction; ``summary.json`` last."""
    record = RecordWriter(out_dir)
    out = record.root
    layout = Layout(data_root)
    record.start_clock()
    sizes = {}
    for s in subjects:  # every subject cut anew: a file left by an interrupted cut may hold older predictions
        target = load_volume(layout.image(s, TARGET_MODALITY)).data
        preds = {run_label(n): load_volume(d / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz").data
                 for n, d in runs.items() if (d / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz").is_file()}
        vols = subject_volumes(target, preds)
        write_subject(out / f"{s}.npz", vols)
        sizes[s] = {n: len(zlib.compress(v.tobytes(), 9)) for n, v in vols.items()}
    record.finish(portable({
        "analysis": "viewer", "profile": profile, "subjects": list(subjects), "runs": list(runs),
        "predictions": stamps(runs, "predictions"),
        "scale": "0 to the ground truth's maximum (8 bit)", "head_threshold": HEAD_THRESHOLD, "margin": MARGIN,
        "compressed_bytes": sizes, **record.session("cpu", git_root=repo_root())}))
    return out


def ensure_viewer(profile, device: str | None = None, log: Callable[[str], None] = print,
                  progress: bool = True) -> Path | None:
    """The profile's viewer record from the Table 1 runs' written predictions, unless complete (a panel of
    every Table 1 run with predictions here). Returns
    None (and says why) when no prediction is here."""
    profile = get_profile(profile)
    out = analysis_dir(profile) / "viewer"
    runs = {n: runs_dir(profile) / n for n in viewer_runs()}
    runs = {n: d for n, d in runs.items() if (d / "predictions").is_dir()}
    retire_if_stale(profile, "viewer", runs.values(), log, kind="predictions")
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        new = [n for n in runs if n not in summary["runs"]]
        if not new:
            log(f"[skip] viewer: record complete ({out})")
            return out
        log(f"[viewer] the record has no panel of {', '.join(new)}, whose predictions are here now")
        for s in summary["subjects"]:  # cut again with every panel
            (out / f"{s}.npz").unlink(missing_ok=True)
    if not runs:
        log(f"[skip] viewer: no Table 1 run under {runs_dir(profile)} has written predictions")
        return None
    root = project_path(profile.data_dir)
    have = [s for s in Layout(root).split("test")
            if any((d / "predictions" / f"{s}_{TARGET_MODALITY}.nii.gz").is_file() for d in runs.values())]
    subjects = have[: SUBJECTS.get(profile.name, 1)]
    log(f"[analysis] viewer: {len(runs)} run(s), {len(subjects)} test subject(s)")
    return make_viewer(root, runs, out, subjects, profile=profile.name)
