"""Losses of MMDM: MIP loss (eqs. (5)-(6)), hybrid loss (eq. (7)), NAWS (eqs. (8)-(11))."""

from mmdm.losses.hybrid import hybrid_loss
from mmdm.losses.mip import cumulative_max, gumbel_cumulative_mip, gumbel_noise, mip_loss
from mmdm.losses.naws import NAWS

__all__ = ["NAWS", "cumulative_max", "gumbel_cumulative_mip", "gumbel_noise", "hybrid_loss", "mip_loss"]
