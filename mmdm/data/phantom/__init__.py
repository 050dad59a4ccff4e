"""The digital phantom cohort: simulated subjects on real anatomy (MNI152 2009a).

SIMULATED data, not patient data. See ``data_cards/phantom.md``.

    from mmdm.data.phantom import PhantomConfig, PROFILES, generate_subject, build_cohort, vessel_visibility
"""

from mmdm.data.phantom.cohort import (  # noqa: F401
    DSEG_LABELS,
    GENERATOR_VERSION,
    MODALITIES,
    PROFILES,
    PhantomConfig,
    Subject,
    build_cohort,
    ensure_cohort,
    generate_subject,
    resolve_config,
    write_subject,
)
from mmdm.data.phantom.physics import SequenceParams, Tissue, default_tissues  # noqa: F401
from mmdm.data.phantom.visibility import vessel_visibility  # noqa: F401
from mmdm.data.phantom.groundtruth import has_ground_truth, load_ground_truth, subject_visibility  # noqa: F401
