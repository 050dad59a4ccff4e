"""mmdm-study: a reproducible study of MMDM (multi-modal Brownian-bridge diffusion
for TOF-MRA synthesis, MICCAI 2025).

Subpackages
-----------
data        phantom cohort, dataset layout, 2.5D window datasets
diffusion   Brownian bridge process (eqs. 1-3) and samplers
nets        Restormer-UNet branches and the cross-modal fusion module (eq. 4)
losses      MIP loss (eqs. 5-6), hybrid loss (eq. 7), NAWS (eqs. 8-11)
methods     MMDM and the comparison methods, behind one registry
"""

__version__ = "0.1.0"
