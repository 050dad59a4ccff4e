"""IXI importer (real-data track): T1w, T2w and PDw registered to each subject's TOF-MRA.

IXI has no FLAIR; PD (``PDw``) stands in for it. See ``data_cards/ixi.md``.

    from mmdm.data.ixi import import_ixi, IXIConfig, fetch_ixi, add_ixi_parser
"""

from mmdm.data.ixi.archive import UnsafeArchiveError, check_member, extract_members, scan_archive  # noqa: F401
from mmdm.data.ixi.cli import add_ixi_parser  # noqa: F401
from mmdm.data.ixi.demographics import read_demographics  # noqa: F401
from mmdm.data.ixi.download import (IXI_BASE_URL, IXI_FILES, DownloadError, SizeMismatchError,  # noqa: F401
                                    download_file, fetch_ixi)
from mmdm.data.ixi.importer import (PIPELINE, IXIConfig, ImportReport, flag_outliers, import_ixi,  # noqa: F401
                                    import_subjects, prepare_archives, process_subject)
from mmdm.data.ixi.naming import IXI_MODALITIES, IXI_SITES, Dropped, IXISubject, pair_scans, parse_name  # noqa: F401
from mmdm.data.ixi.registration import (RegistrationConfig, RegistrationResult, from_sitk, output_grid,  # noqa: F401
                                        register, resample, to_sitk)
