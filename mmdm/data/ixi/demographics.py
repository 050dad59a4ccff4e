"""The IXI demographics sheet (IXI.xls): age and sex per IXI id.

The sheet has one row per IXI id with (among others) ``IXI_ID``, ``SEX_ID``
(1 = male, 2 = female) and ``AGE`` (years, with decimals; empty for some
subjects). pandas reads ``.xls`` only with the optional ``xlrd`` package; a
CSV or TSV export of the same sheet is read without it.
"""

from __future__ import annotations

import math
from pathlib import Path

from mmdm.data.layout import DatasetError

SEX_CODES = {1: "M", 2: "F"}
#: Names under which the importer looks for the sheet next to the archives, in this order.
SHEET_NAMES = ("IXI.csv", "IXI.tsv", "IXI.xlsx", "IXI.xls")


def find_sheet(folder: str | Path) -> Path | None:
    """The demographics sheet in ``folder`` (a CSV/TSV export is preferred over the .xls)."""
    for name in SHEET_NAMES:
        p = Path(folder) / name
        if p.is_file():
            return p
    return None


def _number(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(f) else f


def read_demographics(path: str | Path) -> dict[str, dict]:
    """IXI id (``IXI002``) -> ``{"age": float | None, "sex": "M" | "F" | None}``.

    When an id appears on several rows, the first row with an age is used.
    """
    import pandas as pd

    path = Path(path)
    suffix = path.suffix.lower()
    try:
        if suffix in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(path, sep=None, engine="python")
        elif suffix in (".xls", ".xlsx"):
            df = pd.read_excel(path, engine="xlrd" if suffix == ".xls" else "openpyxl")
        else:
            raise DatasetError(f"{path}: unknown sheet format '{suffix}'; give IXI.xls or a CSV/TSV export of it")
    except ImportError as e:
        raise DatasetError(
            f"{path}: reading {suffix} files needs the optional package "
            f"'{'xlrd' if suffix == '.xls' else 'openpyxl'}' ({e}). Install it (pip install xlrd), or save the "
            "sheet as CSV (e.g. with LibreOffice: soffice --headless --convert-to csv IXI.xls) and pass "
            "--demographics IXI.csv.") from e
    except (OSError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read the demographics sheet ({e}).") from e
    cols = {str(c).strip().upper(): c for c in df.columns}
    missing = [c for c in ("IXI_ID", "SEX_ID", "AGE") if c not in cols]
    if missing:
        raise DatasetError(f"{path}: the sheet lacks column(s) {missing} (has {list(df.columns)}); "
                           "give the IXI demographics sheet (IXI.xls) or an export with its header row")
    out: dict[str, dict] = {}
    for _, row in df.iterrows():
        num = _number(row[cols["IXI_ID"]])
        if num is None:
            continue
        ixi_id = f"IXI{int(num):03d}"
        sex_code = _number(row[cols["SEX_ID"]])
        rec = {"age": _number(row[cols["AGE"]]),
               "sex": SEX_CODES.get(int(sex_code)) if sex_code is not None else None}
        if ixi_id not in out or (out[ixi_id]["age"] is None and rec["age"] is not None):
            out[ixi_id] = rec
    return out
