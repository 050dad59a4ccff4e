"""The Brownian bridge process (eqs. (1)-(3)) and its reverse samplers (eq. (2))."""

from mmdm.diffusion.bridge import (
    OBJECTIVES,
    SCHEDULES,
    SPACINGS,
    BridgeConfig,
    BrownianBridge,
    make_m_schedule,
    variance_schedule,
)
from mmdm.diffusion.samplers import (
    SAMPLING_MODES,
    bridge_step,
    mean_fusion,
    randn_like,
    sample_bridge,
    sample_multibranch,
    skip_timesteps,
    step_coefficients,
)

__all__ = [
    "OBJECTIVES", "SCHEDULES", "SPACINGS", "SAMPLING_MODES", "BridgeConfig", "BrownianBridge",
    "make_m_schedule", "variance_schedule", "bridge_step", "mean_fusion", "randn_like",
    "sample_bridge", "sample_multibranch", "skip_timesteps", "step_coefficients",
]
