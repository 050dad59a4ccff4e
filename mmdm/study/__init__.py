"""The study: profiles, the 13 runs of Tables 1-3, run records, the runner behind `mmdm study`."""

from mmdm.study.profiles import PROFILES, StudyProfile, get_profile  # noqa: F401
from mmdm.study.runs import REFERENCE_RUN, RunSpec, find_run, run_name, study_runs  # noqa: F401
