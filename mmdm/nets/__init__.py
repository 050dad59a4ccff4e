"""Networks of MMDM: the authors' ResUnet branches and the original Restormer-UNet
(Sec. 2.1), the time-conditioned residual UNet, and the cross-modal dynamic fusion
module (eq. 4)."""

from torch import nn

from mmdm.nets.embeddings import TimeEmbedding, broadcast_timesteps, timestep_embedding
from mmdm.nets.fusion import CrossModalFusion, FusionConfig, RestormerMixer
from mmdm.nets.restormer import (
    GDFN,
    MDTA,
    LayerNorm2d,
    RestormerUNet,
    RestormerUNetConfig,
    TransformerBlock,
    channel_attention,
    check_spatial_size,
)
from mmdm.nets.resunet import (
    DenseGDFN,
    DenseMDTA,
    DenseRestormerBlock,
    ResUNet,
    ResUNetConfig,
    TimeResBlock,
    global_channel_attention,
)
from mmdm.nets.unet import ResBlock, SelfAttention, TimeUNet, UNetConfig

__all__ = [
    "CrossModalFusion", "DenseGDFN", "DenseMDTA", "DenseRestormerBlock", "FusionConfig", "GDFN", "ResUNet",
    "ResUNetConfig", "TimeResBlock", "global_channel_attention", "LayerNorm2d", "MDTA", "ResBlock", "RestormerMixer",
    "RestormerUNet", "RestormerUNetConfig", "SelfAttention", "TimeEmbedding", "TimeUNet", "TransformerBlock",
    "UNetConfig", "broadcast_timesteps", "channel_attention", "check_spatial_size", "count_parameters",
    "timestep_embedding",
]


def count_parameters(modules: nn.Module | list[nn.Module]) -> int:
    """Trainable parameters of a module (or of several), each counted once even where
    modules share it (e.g. MMDM's one time embedding)."""
    modules = modules if isinstance(modules, list) else [modules]
    unique = {id(p): p for m in modules for p in m.parameters() if p.requires_grad}
    return sum(p.numel() for p in unique.values())
