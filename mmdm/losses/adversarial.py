"""Adversarial losses of the GAN comparison methods (Pix2Pix, ResViT, UNest).

Two objectives, as in the pix2pix/CycleGAN code base all three descend from;
the discriminator outputs raw scores (no sigmoid):

* ``"vanilla"`` (Goodfellow et al. 2014; pix2pix's default): binary cross
  entropy on the logits, ``-[y log s(x) + (1 - y) log(1 - s(x))]``.
* ``"lsgan"`` (Mao et al. 2017; ResViT's default): least squares,
  ``(x - y)^2``.

``y`` is the real label for real samples and the fake label for fakes (1 and 0,
or softened, e.g. UNest's 0.9 / 0.1). The discriminator's loss is half the sum
of its real and fake terms (pix2pix halves it "to slow down D"); the
generator's adversarial loss asks D to call its fakes real (the non-saturating
form).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

GAN_MODES = ("vanilla", "lsgan")


def check_gan_mode(mode: str) -> str:
    """Return ``mode`` or raise ``ValueError`` listing the supported objectives."""
    if mode not in GAN_MODES:
        raise ValueError(f"unknown GAN objective {mode!r}; use one of {GAN_MODES}")
    return mode


def gan_loss(scores: Tensor, target_is_real: bool, mode: str = "vanilla", real_label: float = 1.0,
             fake_label: float = 0.0) -> Tensor:
    """Mean adversarial loss of discriminator ``scores`` against the real or fake label."""
    check_gan_mode(mode)
    target = torch.full_like(scores, real_label if target_is_real else fake_label)
    if mode == "vanilla":
        return F.binary_cross_entropy_with_logits(scores, target)
    return F.mse_loss(scores, target)


def discriminator_loss(real_scores: Tensor, fake_scores: Tensor, mode: str = "vanilla", real_label: float = 1.0,
                       fake_label: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, real term, fake term)`` with ``loss = (real term + fake term) / 2``.

    Pass the fake scores of *detached* generator outputs: this loss trains D only.
    """
    real = gan_loss(real_scores, True, mode, real_label, fake_label)
    fake = gan_loss(fake_scores, False, mode, real_label, fake_label)
    return 0.5 * (real + fake), real, fake


def generator_adversarial_loss(fake_scores: Tensor, mode: str = "vanilla", real_label: float = 1.0) -> Tensor:
    """The generator's adversarial term: D's scores of the fakes against the real label."""
    return gan_loss(fake_scores, True, mode, real_label)
