"""`mmdm data check DIR`: validate a dataset and summarise it."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from mmdm.data.layout import KNOWN_MODALITIES, SPLIT_NAMES, TARGET_MODALITY, DatasetError, Layout
from mmdm.data.volumes import check_same_grid, load_volume


@dataclass
class CheckReport:
    root: Path
    rows: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    split_sizes: dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors

    def table(self) -> str:
        """A fixed-width summary table, one row per subject."""
        if not self.rows:
            return "(no readable subjects)"
        mods = sorted({m for r in self.rows for m in r["ranges"]}, key=_mod_order)
        head = ["subject", "split", "shape", "spacing (mm)"] + [f"{m} [min, max]" for m in mods]
        lines = [head]
        for r in self.rows:
            lines.append([r["subject"], r["split"], "x".join(map(str, r["shape"])),
                          "x".join(f"{s:.3g}" for s in r["spacing"])]
                         + [("{:.3g}, {:.3g}".format(*r["ranges"][m]) if m in r["ranges"] else "-") for m in mods])
        widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
        fmt = lambda line: "  ".join(str(c).ljust(w) for c, w in zip(line, widths))  # noqa: E731
        return "\n".join([fmt(lines[0]), fmt(["-" * w for w in widths])] + [fmt(line) for line in lines[1:]])

    def summary(self) -> str:
        out = [f"dataset: {self.root}", f"subjects: {len(self.rows)}",
               "splits: " + ", ".join(f"{k} {v}" for k, v in self.split_sizes.items()), "", self.table()]
        if self.warnings:
            out += ["", "warnings:"] + [f"  - {w}" for w in self.warnings]
        if self.errors:
            out += ["", f"ERRORS ({len(self.errors)}):"] + [f"  - {e}" for e in self.errors]
        else:
            out += ["", "OK: every subject has readable, finite, non-empty volumes on one grid per subject."]
        return "\n".join(out)


def _mod_order(m: str) -> tuple[int, str]:
    return (KNOWN_MODALITIES.index(m) if m in KNOWN_MODALITIES else len(KNOWN_MODALITIES), m)


def check_dataset(root: str | Path, modalities: Sequence[str] | None = None,
                  target: str = TARGET_MODALITY) -> CheckReport:
    """Validate every subject of a dataset; collect all problems instead of stopping at the first.

    ``modalities``: the modalities every subject must have (default: every
    modality that any subject has, plus ``target``).
    """
    layout = Layout(root)
    report = CheckReport(root=layout.root)
    subjects = layout.subjects()
    if not subjects:
        report.errors.append(f"{layout.root}: no subject folders (sub-*/anat) found")
        return report
    if modalities is None:
        modalities = sorted({m for s in subjects for m in layout.modalities(s)})
    modalities = sorted(set(modalities) | {target}, key=_mod_order)
    split_of: dict[str, str] = {}
    try:
        splits = layout.splits()
        report.split_sizes = {k: len(splits[k]) for k in SPLIT_NAMES}
        split_of = {s: k for k in SPLIT_NAMES for s in splits[k]}
        unassigned = [s for s in subjects if s not in split_of]
        if unassigned:
            report.warnings.append(f"{len(unassigned)} subject(s) are in no split: {unassigned[:5]}")
    except DatasetError as e:
        report.errors.append(str(e))
    for s in subjects:
        try:
            present = layout.modalities(s)
            missing = [m for m in modalities if m not in present]
            if missing:
                raise DatasetError(f"subject {s}: missing modality {missing} (has {present})")
            vols = {m: load_volume(layout.image(s, m)) for m in modalities}
            check_same_grid(vols, s)
        except DatasetError as e:
            report.errors.append(str(e))
            continue
        ref = vols[target]
        axial = np.abs(ref.affine[:3, 2]) / max(np.linalg.norm(ref.affine[:3, 2]), 1e-12)
        if axial.argmax() != 2:
            report.warnings.append(f"subject {s}: the last array axis is not the superior-inferior axis "
                                   "(the study cuts axial windows along it); reorient to RAS first")
        report.rows.append({"subject": s, "split": split_of.get(s, "-"), "shape": ref.data.shape,
                            "spacing": ref.spacing,
                            "ranges": {m: (float(v.data.min()), float(v.data.max())) for m, v in vols.items()}})
    return report
