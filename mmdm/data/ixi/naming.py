"""IXI file names and pairing of the four modalities of one subject.

IXI distributes one tarball per modality; every NIfTI inside is named
``IXI<id>-<site>-<series>-<MOD>.nii.gz``, e.g. ``IXI002-Guys-0828-T1.nii.gz``.
A subject is kept only when it has all of T1, T2, PD and MRA.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import PurePath
from typing import Iterable

#: IXI modality tag -> modality suffix in the study's layout. PD stands in for FLAIR.
IXI_MODALITIES: dict[str, str] = {"T1": "T1w", "T2": "T2w", "PD": "PDw", "MRA": "angio"}
#: The tarball that holds each IXI modality.
IXI_ARCHIVES: dict[str, str] = {"T1": "IXI-T1.tar", "T2": "IXI-T2.tar", "PD": "IXI-PD.tar", "MRA": "IXI-MRA.tar"}
#: Acquisition sites (from the file name) -> (institution, scanner, field strength in tesla).
IXI_SITES: dict[str, tuple[str, str, float]] = {
    "Guys": ("Guy's Hospital, London", "Philips", 1.5),
    "HH": ("Hammersmith Hospital, London", "Philips", 3.0),
    "IOP": ("Institute of Psychiatry, London", "GE", 1.5),
}

NAME_RE = re.compile(r"^IXI(?P<number>\d+)-(?P<site>[A-Za-z]+)-(?P<series>\d+)-(?P<mod>[A-Za-z0-9]+)\.nii(?:\.gz)?$")


@dataclass(frozen=True)
class IXIScan:
    """One IXI file, parsed from its name."""

    ixi_id: str  # "IXI002"
    site: str  # "Guys", "HH" or "IOP"
    series: str  # "0828"
    modality: str  # IXI tag: "T1", "T2", "PD", "MRA"
    path: str  # archive member name or file path


@dataclass
class IXISubject:
    """A subject with all four modalities: IXI tag -> file path (or member name)."""

    ixi_id: str
    site: str
    files: dict[str, str] = field(default_factory=dict)

    @property
    def participant_id(self) -> str:
        return participant_id(self.ixi_id)


@dataclass
class Dropped:
    """A subject left out of the dataset, and why."""

    ixi_id: str
    reason: str
    details: str = ""


def participant_id(ixi_id: str) -> str:
    """``IXI002`` -> ``sub-IXI002`` (the IXI id is kept so rows join with the IXI sheet)."""
    return f"sub-{ixi_id}"


def parse_name(path: str | PurePath) -> IXIScan | None:
    """Parse an IXI file name (directories are ignored); ``None`` when it is not one."""
    name = PurePath(str(path)).name
    m = NAME_RE.match(name)
    if not m:
        return None
    return IXIScan(ixi_id=f"IXI{m['number']}", site=m["site"], series=m["series"], modality=m["mod"],
                   path=str(path))


def pair_scans(paths: Iterable[str | PurePath],
               modalities: Iterable[str] = tuple(IXI_MODALITIES)) -> tuple[list[IXISubject], list[Dropped], list[str]]:
    """Group files by subject id and keep subjects with every one of ``modalities``.

    Returns (subjects sorted by id, dropped subjects with the reason, file names
    that are not IXI images of a wanted modality). A subject is dropped when a
    modality is missing, when one modality has two files, or when its files name
    different sites.
    """
    wanted = tuple(modalities)
    scans: dict[str, list[IXIScan]] = {}
    ignored: list[str] = []
    for p in paths:
        scan = parse_name(p)
        if scan is None or scan.modality not in wanted:
            ignored.append(str(p))
            continue
        scans.setdefault(scan.ixi_id, []).append(scan)
    subjects: list[IXISubject] = []
    dropped: list[Dropped] = []
    for ixi_id in sorted(scans):
        group = scans[ixi_id]
        by_mod: dict[str, list[IXIScan]] = {}
        for s in group:
            by_mod.setdefault(s.modality, []).append(s)
        missing = [m for m in wanted if m not in by_mod]
        dup = {m: [PurePath(s.path).name for s in v] for m, v in by_mod.items() if len(v) > 1}
        sites = sorted({s.site for s in group})
        if missing:
            have = ", ".join(f"{m}: {PurePath(by_mod[m][0].path).name}" for m in wanted if m in by_mod)
            dropped.append(Dropped(ixi_id, f"missing modality {'/'.join(missing)}", f"has {have}"))
        elif dup:
            dropped.append(Dropped(ixi_id, "more than one file for a modality", str(dup)))
        elif len(sites) > 1:
            dropped.append(Dropped(ixi_id, "files name different sites", ", ".join(sites)))
        else:
            subjects.append(IXISubject(ixi_id, sites[0], {m: by_mod[m][0].path for m in wanted}))
    return subjects, dropped, ignored
