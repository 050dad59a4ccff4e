"""Whole-volume synthesis with a 2.5D sliding window (the authors' inference).

A volume (X, Y, Z) is cut into windows of K adjacent axial slices starting
at ``z0 = 0, stride, 2 stride, ...`` (plus a last window ending at the last
slice, :func:`mmdm.data.dataset.window_starts`), so every slice is covered.
Each window is synthesised by ``method.sample``; every slice's prediction is
the mean over all windows that contain it (the authors: stride 1, overlaps
averaged). Windows are batched.

Units: sources are normalised exactly as in training (``NormConfig``, per
volume to [-1, 1]); the model's output in [-1, 1] is clamped (``clip``) and
mapped to [0, 1] by ``(x + 1) / 2`` -- TOF intensity as a fraction of the
volume's maximum, the scale on which the metrics compare it with
``target / target.max()``. :func:`synthesize_files` writes that [0, 1] volume
(times ``scale``) with the first source's affine and header, and declares the
scale in the NIfTI description (:func:`mmdm.io.tof_fraction_descrip`), as
run evaluation does for its predictions, so ``mmdm evaluate`` scores such a
file against a raw TOF volume exactly as ``mmdm evaluate-run`` does.

:func:`synthesize_subjects` is the one loop over a dataset's subjects (load
the sources, synthesise) that run evaluation and the study's analyses share.

Precision (``amp``): ``"none"`` samples in fp32; ``"bf16"`` runs every
network forward under bf16 autocast (CUDA, or the CPU) and hands its outputs
back to the sampler in fp32 (:func:`network_autocast`), so the sampler's
arithmetic (bridge/DDIM steps, added noise), the sliding-window mean (float64)
and the returned volume stay as in fp32 sampling.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm  # not tqdm.auto: in a kernel without ipywidgets it warns with a path on import

from mmdm.data.dataset import DataConfig, load_subject_volumes, window_starts
from mmdm.data.layout import Layout
from mmdm.data.volumes import NormConfig, Volume, check_same_grid, load_volume, normalise
from mmdm.engine.checkpoint import CheckpointManager, load_checkpoint
from mmdm.engine.distributed import resolve_device
from mmdm.engine.precision import resolve_amp
from mmdm.engine.rundir import run_paths
from mmdm.engine.spec import TrainConfig, build_method_from_config, is_code_reference, load_run_config, method_factory
from mmdm.io import check_output_path, save_nifti, tof_fraction_descrip
from mmdm.methods.base import SynthesisMethod

#: the precisions of sampling (``amp``): fp32, or bf16 autocast of the networks
AMP_MODES = ("none", "bf16")


def _method_device(method: SynthesisMethod) -> torch.device:
    for p in method.parameters():
        return p.device
    for b in method.buffers():
        return b.device
    return torch.device("cpu")


def _check_modalities(method: SynthesisMethod, sources: dict[str, Any]) -> list[str]:
    needed = list(method.sources or sources)
    missing = [m for m in needed if m not in sources]
    if missing:
        raise ValueError(f"missing source modality(ies) {missing}: this model needs {needed} "
                         f"(given {sorted(sources)}). Pass one volume per required modality.")
    shapes = {m: tuple(np.shape(sources[m])) for m in needed}
    if len(set(shapes.values())) != 1 or len(next(iter(shapes.values()))) != 3:
        raise ValueError(f"source volumes must be 3D (X, Y, Z) and share one shape; got {shapes}. "
                         "Resample all modalities onto one grid first.")
    return needed


def check_amp(amp: str, device: torch.device) -> None:
    """Raise ``ValueError`` unless ``amp`` is one of :data:`AMP_MODES` and ``device`` computes it
    natively (bf16: CUDA with bf16 support, or a CPU with AVX512_BF16/AMX;
    :func:`mmdm.engine.precision.resolve_amp`)."""
    if amp not in AMP_MODES:
        raise ValueError(f"unknown amp {amp!r}; use one of {AMP_MODES}")
    if amp == "bf16":
        resolve_amp(amp, device)  # raises PrecisionError (a ValueError) that says why and what to use


def _to_fp32(out: Any) -> Any:
    """``out`` with every bf16/fp16 tensor (also inside tuples, lists and dicts) cast to fp32."""
    if torch.is_tensor(out):
        return out.float() if out.dtype in (torch.bfloat16, torch.float16) else out
    if isinstance(out, (tuple, list)):
        return type(out)(_to_fp32(o) for o in out)
    if isinstance(out, dict):
        return {k: _to_fp32(v) for k, v in out.items()}
    return out


def method_networks(method: torch.nn.Module) -> list[torch.nn.Module]:
    """The method's networks: its child modules that hold parameters (the members of a
    ``ModuleDict``/``ModuleList`` child one by one). Processes without parameters are left out."""
    nets = []
    for child in method.children():
        members = child.children() if isinstance(child, (torch.nn.ModuleDict, torch.nn.ModuleList)) else [child]
        nets.extend(m for m in members if any(True for _ in m.parameters()))
    return nets


@contextlib.contextmanager
def network_autocast(method: torch.nn.Module, amp: str = "none") -> Iterator[None]:
    """Within the block, every network of ``method`` (:func:`method_networks`) runs its forward under
    bf16 autocast on the method's device and returns fp32 tensors; everything outside the
    networks (the sampler's arithmetic) computes as without autocast. ``amp="none"``: a no-op.

    A network called from inside another (MMDM's shared time embedding) is left to the outer
    one's autocast. Layers that opt out of autocast themselves (``nets.resunet.no_autocast``)
    still do. A method whose ``sample`` calls its networks other than through ``forward`` gets
    no autocast there (no speed-up, same result).
    """
    device = _method_device(method)
    check_amp(amp, device)
    if amp == "none":
        yield
        return
    depth = [0]

    def wrap(forward: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(forward)
        def run(*args: Any, **kwargs: Any) -> Any:
            if depth[0]:
                return forward(*args, **kwargs)
            depth[0] += 1
            try:
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    out = forward(*args, **kwargs)
            finally:
                depth[0] -= 1
            return _to_fp32(out)
        return run

    wrapped: list[tuple[torch.nn.Module, Any]] = []
    try:
        for net in {id(n): n for n in method_networks(method)}.values():  # a module under two names: once
            wrapped.append((net, vars(net).get("forward")))
            net.forward = wrap(net.forward)
        yield
    finally:
        for net, own in reversed(wrapped):
            if own is None:
                del net.forward  # back to the class's forward
            else:
                net.forward = own


@torch.no_grad()
def synthesize_volume(method: SynthesisMethod, sources: dict[str, np.ndarray], window: int = 5, stride: int = 1,
                      batch_size: int = 8, steps: int | None = None, eta: float | None = None,
                      n_samples: int = 1, norm: NormConfig = NormConfig(),
                      generator: torch.Generator | None = None, progress: bool = True, clip: bool = True,
                      pad_value: float = -1.0, desc: str = "synthesis", amp: str = "none") -> dict[str, Any]:
    """Synthesise a whole TOF-MRA volume from raw source volumes (X, Y, Z).

    Returns ``{"mean": (X, Y, Z) float32 in [0, 1], "windows": n, "n_samples": n}``
    plus ``"std"`` (population std over the ``n_samples`` volume draws) when
    ``n_samples > 1``. Height/width that are not multiples of
    ``method.spatial_multiple`` are padded with ``pad_value`` (the normalised
    background, -1) and cropped back. ``generator`` defaults to one seeded with
    0 on the method's device, so a call is reproducible. ``amp="bf16"``: the networks' forward
    passes under bf16 autocast (:func:`network_autocast`); the result is fp32 as without it.
    """
    if stride < 1 or window < 1 or batch_size < 1 or n_samples < 1:
        raise ValueError(f"window, stride, batch_size and n_samples must be >= 1 (got {window}, {stride}, "
                         f"{batch_size}, {n_samples})")
    mods = _check_modalities(method, sources)
    device = _method_device(method)
    check_amp(amp, device)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(0)
    vols = {m: torch.from_numpy(normalise(np.asarray(sources[m], dtype=np.float32), norm)[0]) for m in mods}
    x, y, depth = next(iter(vols.values())).shape
    f = int(method.spatial_multiple or 1)
    px, py = (-x) % f, (-y) % f
    starts = window_starts(depth, window, stride)
    was_training = method.training
    method.eval()
    draws = []
    bar = None
    if progress:
        bar = tqdm(total=len(starts) * n_samples, desc=desc, unit="win", leave=False, dynamic_ncols=True)
    try:
        for _ in range(n_samples):
            acc = torch.zeros(x, y, depth, dtype=torch.float64)
            count = torch.zeros(depth, dtype=torch.float64)
            for i in range(0, len(starts), batch_size):
                chunk = starts[i:i + batch_size]
                wins = {}
                for m, v in vols.items():
                    w = torch.stack([v[:, :, s:s + window].permute(2, 0, 1) for s in chunk]).to(device)
                    if px or py:
                        w = F.pad(w, (0, py, 0, px), value=pad_value)
                    wins[m] = w
                with network_autocast(method, amp):
                    pred = method.sample(wins, steps=steps, eta=eta, generator=generator)
                pred = pred[:, :, :x, :y].float()
                if clip:
                    pred = pred.clamp(-1.0, 1.0)
                pred = pred.to("cpu", torch.float64)
                for j, s in enumerate(chunk):
                    acc[:, :, s:s + window] += pred[j].permute(1, 2, 0)
                    count[s:s + window] += 1
                if bar is not None:
                    bar.update(len(chunk))
            draws.append(((acc / count + 1.0) / 2.0).numpy())
    finally:
        if bar is not None:
            bar.close()
        method.train(was_training)
    stack = np.stack(draws)
    out: dict[str, Any] = {"mean": stack.mean(0).astype(np.float32), "windows": len(starts), "n_samples": n_samples}
    if n_samples > 1:
        out["std"] = stack.std(0).astype(np.float32)
    return out


# ----------------------------------------------------------------------------
# trained runs


def load_run_method(run_dir: str | Path, checkpoint: str = "latest", device: str | torch.device = "cpu",
                    use_ema: bool = True, allow_code: bool = False
                    ) -> tuple[SynthesisMethod, TrainConfig, dict[str, Any]]:
    """Rebuild a run's method from ``config.yaml`` and load a checkpoint.

    ``checkpoint``: ``"latest"`` (the newest readable one in ``checkpoints/``; an unreadable
    newest one is skipped with a warning), a step number, or a path. EMA weights are used when
    the run kept them and ``use_ema``. A config naming a ``"module:callable"`` method is refused
    unless ``allow_code`` (it would import and run that code). Returns ``(method in eval mode,
    TrainConfig, info dict)``.
    """
    p = run_paths(run_dir)
    if not p.config.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml); train one with `mmdm train`")
    cfg = load_run_config(p.config)
    if is_code_reference(cfg.method) and not allow_code:
        method_factory(cfg.method, allow_code=False)  # raises the refusal, before anything is imported
    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    mgr = CheckpointManager(p.checkpoints)
    if str(checkpoint) == "latest":
        found = mgr.load_newest(map_location="cpu")
        if found is None:
            mgr.resolve("latest")  # raises: no checkpoint, with what to do
        path, state = found
    else:
        path = mgr.resolve(checkpoint)
        state = load_checkpoint(path, map_location="cpu")
    method = build_method_from_config(cfg, allow_code=allow_code)
    weights = state["model"]
    ema_used = bool(use_ema and state.get("ema"))
    if ema_used:
        weights = {**weights, **state["ema"]}
    method.load_state_dict(weights)
    method.to(device).eval()
    return method, cfg, {"file": str(path), "step": int(state["step"]), "ema_used": ema_used}


def std_path(out_path: str | Path) -> Path:
    """``tof.nii.gz`` -> ``tof_std.nii.gz``."""
    out_path = Path(out_path)
    name = out_path.name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return out_path.with_name(name[: -len(ext)] + "_std" + ext)
    return out_path.with_name(name + "_std")


def synthesize_files(run_dir: str | Path, inputs: dict[str, str | Path], out_path: str | Path,
                     steps: int | None = None, eta: float | None = None, n_samples: int = 1, batch_size: int = 8,
                     scale: float = 1.0, save_std: bool = True, device: str = "auto", checkpoint: str = "latest",
                     use_ema: bool = True, seed: int = 0, stride: int | None = None,
                     progress: bool = True, amp: str = "none", allow_code: bool = False) -> dict[str, Any]:
    """Synthesise a TOF-MRA NIfTI from source NIfTI files with a trained run.

    ``inputs`` maps modality -> file (the run's ``data.sources``; extra ones are
    ignored). The output has the first required source's affine and header;
    its values are the [0, 1] synthesis times ``scale`` (default 1: a fraction
    of the TOF maximum; there is no absolute TOF intensity to recover). With
    ``n_samples > 1`` and ``save_std``, ``<out>_std.nii.gz`` holds the
    per-voxel standard deviation over the samples (same scale). ``amp``: ``"none"`` or
    ``"bf16"`` (autocast of the networks, see :func:`synthesize_volume`).

    Before any synthesis the arguments and the output are checked: ``scale`` positive and
    finite; the output (and std) path a ``.nii``/``.nii.gz`` file that is none of the inputs
    (also not through a link) and the run's files, in a writable folder with room for it.
    ``allow_code``: see :func:`load_run_method`.
    """
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number (got {scale}); it multiplies the [0, 1] output")
    for name, v in (("steps", steps), ("n_samples", n_samples), ("batch_size", batch_size), ("stride", stride)):
        if v is not None and v < 1:
            raise ValueError(f"{name} must be >= 1 (got {v})")
    if eta is not None and not (math.isfinite(eta) and eta >= 0):
        raise ValueError(f"eta must be a finite number >= 0 (got {eta})")
    outs = [Path(out_path)] + ([std_path(out_path)] if n_samples > 1 and save_std else [])
    protected = [Path(v) for v in inputs.values()] + [p for p in Path(run_dir).rglob("*") if p.is_file()]
    for o in outs:
        check_output_path(o, protected)
    dev = resolve_device(device)
    check_amp(amp, dev)
    method, cfg, info = load_run_method(run_dir, checkpoint=checkpoint, device=dev, use_ema=use_ema,
                                        allow_code=allow_code)
    needed = list(method.sources or cfg.data.sources)
    missing = [m for m in needed if m not in inputs]
    if missing:
        flags = ", ".join(f"--{m.lower()} PATH" for m in needed)
        raise ValueError(f"missing input modality(ies) {missing}: run {run_dir} was trained on {needed}; "
                         f"give all of them ({flags}, or --source NAME=PATH)")
    vols = {m: load_volume(inputs[m]) for m in needed}
    check_same_grid(vols, "input")
    nbytes = next(iter(vols.values())).data.size * 4 * len(outs) + 2**20  # float32, uncompressed: an upper bound
    for o in outs:
        check_output_path(o, protected, nbytes=nbytes)
    ref_img = nib.load(str(inputs[needed[0]]))
    gen = torch.Generator(device=dev).manual_seed(seed)
    res = synthesize_volume(method, {m: v.data for m, v in vols.items()}, window=cfg.data.window,
                            stride=stride or cfg.data.eval_stride, batch_size=batch_size, steps=steps, eta=eta,
                            n_samples=n_samples, norm=cfg.data.norm, generator=gen, progress=progress, amp=amp)
    header = ref_img.header.copy()
    descrip = tof_fraction_descrip(scale)
    out = {"mean": save_nifti(out_path, res["mean"] * scale, ref_img.affine, header, descrip=descrip),
           "checkpoint": info}
    if "std" in res and save_std:
        out["std"] = save_nifti(std_path(out_path), res["std"] * scale, ref_img.affine, header.copy(),
                                descrip=descrip)
    return out


# ----------------------------------------------------------------------------
# the subjects of a dataset


@dataclass
class SubjectSynthesis:
    """One subject's synthesis: raw ``sources``, the ``target`` volume (if loaded) and the
    :func:`synthesize_volume` result (``mean`` in [0, 1], ``std`` for several samples)."""

    subject: str
    sources: dict[str, np.ndarray]
    target: Volume | None
    result: dict[str, Any] | None


def subject_sources(data: DataConfig, subjects: Sequence[str], root: str | Path | None = None,
                    with_target: bool = False) -> Iterator[SubjectSynthesis]:
    """Load each subject's source volumes (``data.sources``; and ``data.target`` if ``with_target``)
    from the dataset at ``root`` (default ``data.root``); ``result`` is None."""
    layout = Layout(root if root is not None else data.root)
    modalities = list(data.sources) + ([data.target] if with_target else [])
    for s in subjects:
        vols = load_subject_volumes(layout, s, modalities)
        target = vols.pop(data.target) if with_target else None
        yield SubjectSynthesis(s, {m: v.data for m, v in vols.items()}, target, None)


def synthesize_subjects(method: SynthesisMethod, data: DataConfig, subjects: Sequence[str],
                        generator_for: Callable[[int, str], torch.Generator], *, root: str | Path | None = None,
                        with_target: bool = False, stride: int | None = None, steps: int | None = None,
                        eta: float | None = None, n_samples: int = 1, batch_size: int = 8, progress: bool = True,
                        desc: Callable[[str], str] = str, amp: str = "none") -> Iterator[SubjectSynthesis]:
    """Synthesise every subject in turn with the run's data settings (window, ``stride`` or
    ``data.eval_stride``, normalisation); ``generator_for(i, subject)`` gives the sampling RNG
    of the i-th subject (one shared generator, or one seeded per subject); ``amp`` as in
    :func:`synthesize_volume`."""
    check_amp(amp, _method_device(method))
    for i, item in enumerate(subject_sources(data, subjects, root, with_target)):
        item.result = synthesize_volume(method, item.sources, window=data.window, stride=stride or data.eval_stride,
                                        batch_size=batch_size, steps=steps, eta=eta, n_samples=n_samples,
                                        norm=data.norm, generator=generator_for(i, item.subject), progress=progress,
                                        desc=desc(item.subject), amp=amp)
        yield item
