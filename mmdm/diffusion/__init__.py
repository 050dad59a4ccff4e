"""The diffusion processes and their samplers: the Brownian bridge (eqs. (1)-(3)) and its reverse
samplers (eq. (2)) here; DDPM/DDIM in :mod:`mmdm.diffusion.ddpm`, RDDM in :mod:`mmdm.diffusion.rddm`;
the one reverse loop and :class:`SamplerConfig` in :mod:`mmdm.diffusion.sampling`."""

from mmdm.diffusion.bridge import (
    OBJECTIVES,
    SCHEDULES,
    SPACINGS,
    BridgeConfig,
    BrownianBridge,
    make_m_schedule,
    variance_schedule,
)
from mmdm.diffusion.samplers import (SAMPLING_MODES, bridge_step, mean_fusion, sample_bridge, sample_multibranch,
                                     step_coefficients)
from mmdm.diffusion.sampling import SamplerConfig, randn_like, resolve_sampler, reverse_loop, skip_timesteps

__all__ = [
    "OBJECTIVES", "SCHEDULES", "SPACINGS", "SAMPLING_MODES", "BridgeConfig", "BrownianBridge",
    "make_m_schedule", "variance_schedule", "bridge_step", "mean_fusion", "randn_like",
    "sample_bridge", "sample_multibranch", "skip_timesteps", "step_coefficients", "SamplerConfig", "resolve_sampler",
    "reverse_loop",
]
