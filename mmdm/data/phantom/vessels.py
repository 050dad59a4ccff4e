"""The phantom's cerebral arterial tree: hand-placed trunks, recursive growth,
partial-volume rendering and the centreline graph.

* Trunks (internal carotid, vertebral and basilar arteries, the Circle of Willis,
  MCA/ACA/PCA, SCA and PICA) follow hand-placed landmarks in MNI millimetres
  (approximate anatomy), jittered per subject and mapped into the subject's
  (deformed) space.
* From the ends of the distal trunks, branches grow recursively. At every
  branching point the radii obey Murray's law with exponent ``gamma``
  ``r_parent^gamma = sum_i r_child^gamma`` (Murray 1926; gamma = 3 by default);
  the branching angles are the minimum-work angles of Zamir (1976) for gamma = 3
  (``cos t1 = (r0^4 + r1^4 - r2^4) / (2 r0^2 r1^2)``), jittered. Tortuosity is a smooth
  sinusoidal perturbation, zero at both ends of a segment. Branches stay inside
  the subject's brain mask.
* Mean flow velocity of a segment: ``v = v_ICA (r / r_ICA)^beta`` (with Murray's
  law and ``beta = 1`` this is flow conservation; the default ``beta`` is smaller).
* The graph is a tree: one virtual root (the aortic arch, outside the field of
  view) feeds the four inlets. The communicating arteries of the Circle of Willis
  and the right vertebral artery end in *dead-end nodes* that touch another node
  (listed in ``anastomoses``) instead of closing cycles.
* Rendering: the fraction of a voxel occupied by lumen is the indicator of the
  cylinder of radius ``r`` blurred by a Gaussian voxel PSF of ``sigma = 0.5``
  voxel (FWHM ~ 1.2 voxels). Across a vessel this is the non-central chi-square
  CDF with 2 degrees of freedom: ``f(d) = P(chi2_2(nc=(d/sigma)^2) <= (r/sigma)^2)``
  for a voxel centre at distance ``d`` from the axis; its integral over a slice is
  the lumen's cross-section ``pi r^2`` (up to a sub-percent aliasing error).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from scipy import ndimage, special
from scipy.interpolate import CubicSpline

from mmdm.data.phantom.anatomy import Deformation, Grid

# --------------------------------------------------------------------------- landmarks

#: (name, parent, flow weight at the parent's end, landmarks in MNI mm for the right side (x > 0),
#: joins) -- the left side mirrors x. The first trunk of a chain without parent is an inlet and
#: its first landmark is its start. ``joins``: the name of the trunk whose end node this trunk's
#: end touches (an anastomosis). Flow weights of the children of one node sum to 1.
_SIDED_TRUNKS: list[tuple] = [
    ("ICA", None, None, [(22, 2, -80), (20, 0, -62), (18, -2, -48), (17, 4, -38), (16, 8, -30), (17, 3, -22),
                          (18, 1, -13)], None),
    ("VA1", None, None, [(11, -42, -80), (10, -40, -70), (8, -38, -60)], None),
    ("PICA", "VA1", 0.15, [(12, -46, -58), (16, -56, -50), (20, -66, -42)], None),
    ("VA2", "VA1", 0.85, [(6, -35, -52), (3, -30, -46), (1.5, -27, -42)], None),
    ("M1", "ICA", 0.60, [(28, 3, -12), (37, 4, -8), (43, 3, -3)], None),
    ("A1", "ICA", 0.34, [(10, 8, -10), (3, 14, -8)], None),
    ("PCom", "ICA", 0.06, [(16, -6, -14), (13, -14, -14), (12, -18.5, -13)], "P1"),
    ("M2s", "M1", 0.5, [(40, 10, 6), (44, 8, 18), (50, 2, 32)], None),
    ("M2i", "M1", 0.5, [(45, -6, 2), (48, -20, 8), (52, -36, 14)], None),
    ("SCA", "BA", 0.12, [(6, -21, -19), (12, -30, -21), (16, -42, -22), (18, -52, -20)], None),
    ("P1", "BA", 0.38, [(6, -18, -15), (12, -19, -13)], None),
    ("P2", "P1", 1.0, [(18, -26, -10), (23, -40, -6), (22, -58, 0)], None),
    ("P3a", "P2", 0.55, [(16, -72, 4), (9, -88, 6)], None),
    ("P3b", "P2", 0.45, [(14, -70, 18), (10, -72, 32)], None),
]
_A2 = [(3, 22, -2), (4, 30, 12), (4, 26, 28), (4, 8, 38), (4, -15, 44)]
#: Midline / asymmetric trunks: the left vertebral artery feeds the basilar artery; the right one
#: ends touching the basilar origin. The anterior communicating artery leaves the left A1.
_MIDLINE_TRUNKS: list[tuple] = [
    ("BA", "L_VA2", 1.0, [(0, -25, -36), (0, -22, -28), (0, -19, -21), (0, -17, -16)], None),
    ("L_A2", "L_A1", 0.9, [(-x, y, z) for x, y, z in _A2], None),
    ("L_AComm", "L_A1", 0.1, [(0, 14, -8), (3, 14, -8)], "R_A1"),
    ("R_A2", "R_A1", 1.0, _A2, None),
]
#: Trunks whose ends seed recursive growth.
_GROWTH_SEEDS = ("M2s", "M2i", "A2", "P3a", "P3b", "SCA", "PICA")
#: Inlet radii relative to the ICA radius (vertebral arteries: left dominant).
_INLET_RADIUS = {"R_ICA": 1.0, "L_ICA": 1.0, "L_VA1": 0.85, "R_VA1": 0.72}


def trunk_specs() -> list[tuple]:
    """All trunks in creation order (parents first): (name, parent, weight, landmarks, joins)."""

    def sided(names: set[str]) -> list[tuple]:
        out = []
        for side, sx in (("R", 1.0), ("L", -1.0)):
            for name, parent, w, pts, joins in _SIDED_TRUNKS:
                if name not in names:
                    continue
                par = parent if parent in (None, "BA") else f"{side}_{parent}"
                out.append((f"{side}_{name}", par, w, [(sx * x, y, z) for x, y, z in pts],
                            f"{side}_{joins}" if joins else None))
        return out

    specs = (sided({"ICA", "VA1", "PICA", "VA2", "M1", "A1", "PCom", "M2s", "M2i"}) + list(_MIDLINE_TRUNKS)
             + sided({"SCA", "P1", "P2", "P3a", "P3b"}))
    # the right vertebral artery touches the basilar origin instead of feeding it
    return [(n, p, w, pts, ("L_VA2" if n == "R_VA2" else j)) for n, p, w, pts, j in specs]


# --------------------------------------------------------------------------- tree


@dataclass
class Segment:
    """One vessel segment between two graph nodes (label ``id`` in the label map)."""

    id: int
    parent: int  # parent segment id, 0 = none
    start: int  # node ids
    end: int
    radius: float  # mm
    velocity: float  # cm/s
    generation: int
    name: str
    kind: str  # "virtual" | "trunk" | "grown"
    points: np.ndarray  # (P, 3) subject mm, first = start node, last = end node
    children: list[int] = field(default_factory=list)
    time_in_slab_ms: np.ndarray | None = None  # per point, for TOF inflow

    @property
    def length(self) -> float:
        return float(np.linalg.norm(np.diff(self.points, axis=0), axis=1).sum())


@dataclass
class VesselTree:
    nodes: list[np.ndarray] = field(default_factory=list)
    node_radius: list[float] = field(default_factory=list)
    segments: list[Segment] = field(default_factory=list)
    anastomoses: list[tuple[int, int]] = field(default_factory=list)

    def add_node(self, pos, radius: float) -> int:
        self.nodes.append(np.asarray(pos, dtype=np.float64))
        self.node_radius.append(float(radius))
        return len(self.nodes) - 1

    def add_segment(self, parent: int, start: int, points: np.ndarray, radius: float, velocity: float,
                    name: str, kind: str) -> Segment:
        end = self.add_node(points[-1], radius)
        gen = 0 if parent == 0 else self.segments[parent - 1].generation + 1
        seg = Segment(id=len(self.segments) + 1, parent=parent, start=start, end=end, radius=float(radius),
                      velocity=float(velocity), generation=gen, name=name, kind=kind,
                      points=np.asarray(points, dtype=np.float64))
        self.segments.append(seg)
        if parent:
            self.segments[parent - 1].children.append(seg.id)
        return seg

    def rendered(self) -> list[Segment]:
        return [s for s in self.segments if s.kind != "virtual"]

    def to_json(self, gamma: float) -> dict:
        """JSON-serialisable centreline graph (world mm, RAS)."""
        return {
            "units": {"position": "mm (world, RAS)", "radius": "mm", "velocity": "cm/s", "length": "mm"},
            "murray_exponent": gamma,
            "root": 0,
            "nodes": [{"id": i, "position_mm": [round(float(v), 3) for v in p], "radius_mm": round(r, 4)}
                      for i, (p, r) in enumerate(zip(self.nodes, self.node_radius))],
            "edges": [{"id": s.id, "label": s.id if s.kind != "virtual" else 0, "parent": s.parent,
                       "children": list(s.children), "start": s.start, "end": s.end,
                       "generation": s.generation, "radius_mm": round(s.radius, 4),
                       "velocity_cm_s": round(s.velocity, 3), "length_mm": round(s.length, 3),
                       "name": s.name, "kind": s.kind,
                       "points_mm": [[round(float(v), 2) for v in p] for p in s.points]}
                      for s in self.segments],
            "anastomoses": [{"node": a, "touches": b} for a, b in self.anastomoses],
        }


@dataclass
class TreeParams:
    """Per-subject vessel parameters."""

    ica_radius: float = 1.9  # mm
    ica_velocity: float = 35.0  # cm/s, mean
    velocity_exponent: float = 0.8
    gamma: float = 3.0  # Murray exponent
    r_min: float = 0.2  # mm, no branching below
    max_generation: int = 14
    max_segments: int = 6000
    length_ratio: tuple[float, float] = (10.0, 24.0)  # segment length / radius
    tortuosity: float = 0.06  # perturbation sd as a fraction of the segment length
    landmark_jitter_mm: float = 1.5
    step_mm: float = 1.0  # polyline sampling


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.array([a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0]])


def _perp_basis(d: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two unit vectors perpendicular to unit ``d`` and to each other."""
    a = np.array([1.0, 0, 0]) if abs(d[0]) < 0.9 else np.array([0, 1.0, 0])
    e1 = _cross(d, a)
    e1 /= np.sqrt(e1 @ e1)
    return e1, _cross(d, e1)


def _tortuous(p0: np.ndarray, p1: np.ndarray, amp: float, rng: np.random.Generator, step: float,
              modes: int = 2) -> np.ndarray:
    """Points from ``p0`` to ``p1`` every ~``step`` mm with a smooth perpendicular wiggle (0 at both ends)."""
    chord = p1 - p0
    length = float(np.linalg.norm(chord))
    m = max(2, int(np.ceil(length / step)))
    t = np.linspace(0.0, 1.0, m + 1)[:, None]
    pts = p0 + t * chord
    if amp > 0 and length > 0:
        e1, e2 = _perp_basis(chord / length)
        for k in range(1, modes + 1):
            c = rng.normal(0, amp / k, 2)
            pts = pts + np.sin(k * np.pi * t) * (c[0] * e1 + c[1] * e2)
    return pts


def _spline(landmarks: np.ndarray, step: float) -> np.ndarray:
    """Cubic spline through ``landmarks`` (chord-length parameter), sampled every ~``step`` mm."""
    d = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(landmarks, axis=0), axis=1))]
    if len(landmarks) == 2:
        n = max(2, int(np.ceil(d[-1] / step)))
        return landmarks[0] + np.linspace(0, 1, n + 1)[:, None] * (landmarks[1] - landmarks[0])
    cs = CubicSpline(d, landmarks, axis=0, bc_type="natural")
    n = max(2, int(np.ceil(d[-1] / step)))
    return cs(np.linspace(0, d[-1], n + 1))


def _wiggle(pts: np.ndarray, amp: float, rng: np.random.Generator, modes: int = 3) -> np.ndarray:
    """Add a smooth random displacement, zero at both ends, to a polyline."""
    s = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(pts, axis=0), axis=1))]
    t = (s / max(s[-1], 1e-9))[:, None]
    out = pts.copy()
    for k in range(1, modes + 1):
        out += np.sin(k * np.pi * t) * rng.normal(0, amp / k, 3)
    out[0], out[-1] = pts[0], pts[-1]
    return out


def murray_split(radius: float, asymmetry: float, gamma: float) -> tuple[float, float]:
    """Child radii ``(r1, r2)`` with ``r2 = asymmetry * r1`` and ``r1^g + r2^g = radius^g``."""
    r1 = radius * (1.0 / (1.0 + asymmetry**gamma)) ** (1.0 / gamma)
    return r1, asymmetry * r1


def branching_angles(r0: float, r1: float, r2: float) -> tuple[float, float]:
    """Minimum-work branching angles (radians) of the two children (Zamir 1976, Murray gamma = 3)."""
    c1 = (r0**4 + r1**4 - r2**4) / (2 * r0**2 * r1**2)
    c2 = (r0**4 + r2**4 - r1**4) / (2 * r0**2 * r2**2)
    return float(np.arccos(np.clip(c1, -1, 1))), float(np.arccos(np.clip(c2, -1, 1)))


class DepthMap:
    """Depth (mm) inside the subject's brain on a coarse grid, with trilinear lookup and inward direction."""

    def __init__(self, depth: np.ndarray, grid: Grid):
        self.depth = depth.astype(np.float32)
        self.grid = grid
        self.grad = [g.astype(np.float32) for g in np.gradient(ndimage.gaussian_filter(self.depth, 1.5))]

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        idx = self.grid.to_voxel(np.atleast_2d(pts)).T
        return ndimage.map_coordinates(self.depth, idx, order=1, mode="constant", cval=-1.0)

    def inward(self, p: np.ndarray) -> np.ndarray:
        idx = self.grid.to_voxel(np.atleast_2d(p)).T
        g = np.array([ndimage.map_coordinates(gi, idx, order=1, mode="nearest")[0] for gi in self.grad])
        n = np.linalg.norm(g)
        return g / n if n > 1e-9 else np.zeros(3)


def build_tree(rng: np.random.Generator, params: TreeParams, deformation: Deformation, depth: DepthMap) -> VesselTree:
    """Trunks from landmarks (mapped into the subject) and recursive growth inside the brain."""
    g = params.gamma
    tree = VesselTree()
    velocity = lambda r: params.ica_velocity * (r / params.ica_radius) ** params.velocity_exponent  # noqa: E731
    specs = trunk_specs()
    inlets = [s for s in specs if s[1] is None]
    inlet_r = {n: params.ica_radius * _INLET_RADIUS[n] * float(np.exp(rng.normal(0, 0.05))) for n, *_ in inlets}
    root_r = float(sum(r**g for r in inlet_r.values()) ** (1.0 / g))
    root = tree.add_node([0.0, -10.0, -140.0], root_r)
    by_name: dict[str, Segment] = {}
    weights: dict[str, float] = {}
    joins_of: dict[str, str] = {}
    # flow weights jittered per subject, renormalised per parent
    for name, parent, w, _, _ in specs:
        if parent is not None:
            weights[name] = w * float(np.exp(rng.normal(0, 0.1))) if w < 1.0 else 1.0
    for name, parent, w, lms, joins in specs:
        lm = np.asarray(lms, dtype=np.float64)
        if parent is None:
            lm = lm + rng.normal(0, params.landmark_jitter_mm, lm.shape)
            pts_subject = deformation.inverse(lm)
            r = inlet_r[name]
            virt = np.stack([tree.nodes[root], pts_subject[0]])
            vseg = tree.add_segment(0, root, virt, r, velocity(r), f"{name}_inlet", "virtual")
            start, start_pos, parent_id = vseg.end, pts_subject[0], vseg.id
        else:
            pseg = by_name[parent]
            siblings = [n for n, p, *_ in specs if p == parent]
            total = sum(weights[s] for s in siblings)
            r = pseg.radius * (weights[name] / total) ** (1.0 / g)
            lm = lm + rng.normal(0, params.landmark_jitter_mm, lm.shape)
            pts_subject = np.vstack([pseg.points[-1], deformation.inverse(lm)])
            start, parent_id = pseg.end, pseg.id
        pts = _spline(pts_subject, params.step_mm)
        pts = _wiggle(pts, params.tortuosity * min(20.0, _len(pts)) * 0.5, rng)
        seg = tree.add_segment(parent_id, start, pts, r, velocity(r), name, "trunk")
        by_name[name] = seg
        if joins is not None:
            joins_of[name] = joins
    for a, b in joins_of.items():  # bend the joining trunk so that its end touches the other node
        seg, target = by_name[a], tree.nodes[by_name[b].end]
        arc = np.r_[0.0, np.cumsum(np.linalg.norm(np.diff(seg.points, axis=0), axis=1))]
        seg.points = seg.points + (arc / arc[-1])[:, None] * (target - seg.points[-1])
        tree.nodes[seg.end] = seg.points[-1].copy()
        tree.anastomoses.append((seg.end, by_name[b].end))
    # recursive growth (breadth first, so a segment cap truncates the deepest level)
    queue: deque[Segment] = deque(by_name[n] for n in by_name if n.split("_", 1)[-1] in _GROWTH_SEEDS)
    while queue and len(tree.segments) < params.max_segments:
        seg = queue.popleft()
        if seg.radius < params.r_min or seg.generation >= params.max_generation:
            continue
        kids = _grow_children(rng, seg, params, depth)
        if kids is None:
            continue
        for (pts, r) in kids:
            queue.append(tree.add_segment(seg.id, seg.end, pts, r, velocity(r), "grown", "grown"))
    return tree


def _len(pts: np.ndarray) -> float:
    return float(np.linalg.norm(np.diff(pts, axis=0), axis=1).sum())


def _grow_children(rng: np.random.Generator, seg: Segment, params: TreeParams,
                   depth: DepthMap) -> list[tuple[np.ndarray, float]] | None:
    """Two children of ``seg`` (Murray radii, minimum-work angles) inside the brain, or None."""
    p0 = seg.points[-1]
    tangent = seg.points[-1] - seg.points[max(0, len(seg.points) - 3)]
    tangent /= max(np.linalg.norm(tangent), 1e-9)
    asym = float(rng.uniform(0.45, 1.0))
    r1, r2 = murray_split(seg.radius, asym, params.gamma)
    t1, t2 = branching_angles(seg.radius, r1, r2)
    for attempt in range(6):
        d = tangent
        if attempt:
            d = d + 0.5 * attempt * depth.inward(p0) + rng.normal(0, 0.2 * attempt, 3)
            d /= max(np.linalg.norm(d), 1e-9)
        e1, e2 = _perp_basis(d)
        phi = rng.uniform(0, 2 * np.pi)
        side = np.cos(phi) * e1 + np.sin(phi) * e2
        out = []
        for r, th, sgn in ((r1, t1, 1.0), (r2, t2, -1.0)):
            th = max(th + rng.normal(0, np.deg2rad(8)), np.deg2rad(5))
            dc = np.cos(th) * d + sgn * np.sin(th) * side
            length = r * rng.uniform(*params.length_ratio)
            pts = _tortuous(p0, p0 + length * dc, params.tortuosity * length, rng, params.step_mm)
            if np.any(depth(pts[1:]) < 0.5):
                break
            out.append((pts, r))
        if len(out) == 2:
            return out
    return None


def inflow_times(tree: VesselTree, slab_mm: float, slab_origin_z: float) -> None:
    """Time (ms) each centreline point's blood has spent inside its current TOF slab (fresh at slab entry).

    Blood enters the field of view fresh at the inlets; the slabs are
    ``[slab_origin_z + k slab_mm, slab_origin_z + (k+1) slab_mm)`` and are acquired one after
    the other, so blood that enters a new slab is fresh again.
    """
    end_state: dict[int, tuple[float, int]] = {}
    for seg in tree.segments:
        pts = seg.points
        slab = np.floor((pts[:, 2] - slab_origin_z) / slab_mm).astype(int)
        if seg.kind == "virtual" or seg.parent == 0:
            t0, s0 = 0.0, slab[0]
        else:
            t0, s0 = end_state[seg.parent]
        dl = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        dt = dl / (seg.velocity * 10.0) * 1000.0  # mm / (mm/s) -> ms
        times = np.empty(len(pts))
        t, cur = (0.0, slab[0]) if seg.kind == "virtual" else (t0, s0)
        times[0] = t
        for i in range(1, len(pts)):
            t = 0.0 if slab[i] != cur else t + dt[i - 1]
            cur = slab[i]
            times[i] = t
        if seg.kind == "virtual":
            times[:] = 0.0
            t, cur = 0.0, slab[-1]
        seg.time_in_slab_ms = times
        end_state[seg.id] = (float(times[-1]), int(cur))


# --------------------------------------------------------------------------- rendering


def lumen_profile(d: np.ndarray, radius: float, sigma: float) -> np.ndarray:
    """Lumen fraction at distance ``d`` from the axis: disk of ``radius`` blurred by a Gaussian ``sigma``."""
    return special.chndtr((radius / sigma) ** 2, 2.0, (np.asarray(d) / sigma) ** 2)


@dataclass
class Tube:
    """A polyline tube to render: points (P, 3) mm, radius mm, integer label, per-point properties."""

    points: np.ndarray
    radius: float
    label: int
    props: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class Rendering:
    fraction: np.ndarray  # float32, lumen fraction in [0, 1]
    labels: np.ndarray  # int32, label of the dominant vessel where it reaches half its peak fraction
    props: dict[str, np.ndarray]  # fraction-weighted mean of each per-point property (0 where no vessel)


def render_tubes(tubes: list[Tube], grid: Grid, psf_sigma_vox: float = 0.5, chunk: int | None = None,
                 prop_names: tuple[str, ...] = ()) -> Rendering:
    """Partial-volume rendering of tubes on ``grid`` (only inside each chunk's bounding box).

    Each tube is cut into chunks of ``chunk`` polyline pieces (default: about 8 voxels
    long); a chunk's lumen fraction is evaluated only in its bounding box.
    """
    h = grid.spacing
    chunk = chunk or max(8, int(round(8 * h)))
    sigma = psf_sigma_vox * h
    shape = grid.shape
    frac = np.zeros(shape, np.float32)
    best = np.zeros(shape, np.float32)
    labels = np.zeros(shape, np.int32)
    wsum = np.zeros(shape, np.float32) if prop_names else None
    psum = {k: np.zeros(shape, np.float32) for k in prop_names}
    origin = grid.origin
    for tube in tubes:
        pts_all = np.asarray(tube.points, dtype=np.float64)
        peak = float(lumen_profile(0.0, tube.radius, sigma))
        reach = tube.radius + 3.5 * sigma
        # the exact profile tabulated against the squared distance (fast lookup)
        table_x = np.linspace(0.0, reach, 1024) ** 2
        table_f = lumen_profile(np.sqrt(table_x), tube.radius, sigma)
        for c0 in range(0, len(pts_all) - 1, chunk):
            pts = pts_all[c0:c0 + chunk + 1]
            lo = np.floor((pts.min(0) - reach - origin) / h).astype(int)
            hi = np.ceil((pts.max(0) + reach - origin) / h).astype(int) + 1
            lo = np.maximum(lo, 0)
            hi = np.minimum(hi, shape)
            if np.any(hi <= lo):
                continue
            ax = [origin[i] + h * np.arange(lo[i], hi[i]) for i in range(3)]
            gx, gy, gz = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
            d2 = None
            for p, q in zip(pts[:-1], pts[1:]):
                ab = q - p
                ab2 = max(float(ab @ ab), 1e-12)
                dx, dy, dz = gx - p[0], gy - p[1], gz - p[2]
                t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / ab2, 0.0, 1.0)
                e = (dx - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dz - t * ab[2]) ** 2
                d2 = e if d2 is None else np.minimum(d2, e)
            f = np.interp(d2, table_x, table_f).astype(np.float32)
            sl = tuple(slice(l, u) for l, u in zip(lo, hi))
            np.maximum(frac[sl], f, out=frac[sl])
            own = (f >= 0.5 * peak) & (f > best[sl])
            labels[sl][own] = tube.label
            best[sl][own] = f[own]
            if prop_names:
                wsum[sl] += f
                for k in prop_names:
                    psum[k][sl] += f * float(np.mean(tube.props[k][c0:c0 + chunk + 1]))
    means = {}
    for k in prop_names:
        means[k] = np.where(wsum > 1e-6, psum[k] / np.maximum(wsum, 1e-6), 0.0).astype(np.float32)
    return Rendering(fraction=np.clip(frac, 0, 1), labels=labels, props=means)


def tubes_from_tree(tree: VesselTree, props: Callable[[Segment], dict[str, np.ndarray]] | None = None) -> list[Tube]:
    """One tube per rendered segment, labelled with the segment id."""
    return [Tube(points=s.points, radius=s.radius, label=s.id, props=props(s) if props else {})
            for s in tree.rendered()]
