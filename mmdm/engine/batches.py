"""Data order and batches of training: a pure function of ``(seed, epoch)``.

The order never depends on how often a run was interrupted: the epoch's
permutation comes from ``numpy.random.default_rng([seed, epoch])`` and a
resumed run continues at ``step % steps_per_epoch`` (the trainer's resume
contract, :mod:`mmdm.engine.train`).
"""

from __future__ import annotations

import numpy as np
import torch

from mmdm.config import ConfigError


def steps_per_epoch(n_items: int, batch_size: int, world_size: int = 1) -> int:
    """Global batches per epoch (the last incomplete one is dropped)."""
    g = batch_size * world_size
    if n_items < g:
        raise ConfigError(f"the training split has {n_items} windows, fewer than one global batch of {g} "
                          f"(batch_size {batch_size} x {world_size} process(es)); lower batch_size or add data")
    return n_items // g


def epoch_batches(n_items: int, batch_size: int, seed: int, epoch: int, world_size: int = 1,
                  rank: int = 0) -> list[list[int]]:
    """This rank's batches of one epoch: a pure function of ``(seed, epoch)``.

    The epoch's permutation is drawn from ``numpy.random.default_rng([seed, epoch])``
    and truncated to whole global batches; rank ``r`` takes every
    ``world_size``-th index from ``r`` (DistributedSampler semantics), so the
    union of the ranks' i-th batches is the i-th block of ``batch_size x
    world_size`` indices of the permutation -- the batch a single process with
    the combined batch size sees.
    """
    spe = steps_per_epoch(n_items, batch_size, world_size)
    perm = np.random.default_rng([seed, epoch]).permutation(n_items)[: spe * batch_size * world_size]
    mine = perm[rank::world_size]
    return [mine[i * batch_size:(i + 1) * batch_size].tolist() for i in range(spe)]


def collate(items: list[dict]) -> dict:
    """Stack :class:`~mmdm.data.dataset.WindowDataset` items into a batch (sources, target, subject, z0)."""
    return {"sources": {m: torch.stack([it["sources"][m] for it in items]) for m in items[0]["sources"]},
            "target": torch.stack([it["target"] for it in items]),
            "subject": [it["subject"] for it in items], "z0": torch.tensor([it["z0"] for it in items])}


def to_device(batch: dict, device: torch.device) -> dict:
    """The tensors a method needs (sources, target) on ``device``."""
    nb = device.type == "cuda"
    return {"sources": {m: v.to(device, non_blocking=nb) for m, v in batch["sources"].items()},
            "target": batch["target"].to(device, non_blocking=nb)}


__all__ = ["collate", "epoch_batches", "steps_per_epoch", "to_device"]
