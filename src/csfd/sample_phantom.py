"""Synthetic neck CT phantom in Hounsfield units for the sample dataset.

A study is a stack of axial slices, position 0 at the top (head). Each slice contains air, a
soft-tissue neck with subcutaneous fat and an airway, and the vertebral column: C1..C7 and
two or three thoracic vertebrae, each over several consecutive slices with a one-slice disc
gap below it. The levels differ on purpose, so that a slice model can tell them apart: C1 is
a ring without a body, the dens of C2 reaches up into the C1 slices, C3..C7 bodies grow and
the spinous process is longest at C7, thoracic vertebrae are larger, carry rib stubs and sit
beside the lung apices. A fracture is a dark crack of soft-tissue HU, a few pixels wide,
through the cortex into the bone, drawn on most slices of the fractured vertebra.

Shapes are polygons in millimetres in a frame attached to the spine (u to the patient's
left, v posterior), rasterised with OpenCV, so the same anatomy fits any image size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np

LEVELS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", "T1", "T2", "T3")
CERVICAL_LEVELS = LEVELS[:7]
# Segmentation label of each level, as in the competition: C1..C7 are 1..7, T1.. are 8...
LEVEL_LABELS = {level: index + 1 for index, level in enumerate(LEVELS)}

# Stored values must fit the narrowest storage the writer uses: unsigned 12 bits with
# intercept -1024 (HU -1024..3071) and signed 12 bits with intercept 0 (HU -2048..2047).
HU_MIN = -1024
HU_MAX = 2047

# Internal label for bone that belongs to no vertebra (occiput, ribs); written out as 0.
_OTHER_BONE = 255
# Vertebrae are drawn this many times their real size relative to the neck, so that the
# cortex and a crack stay visible when a slice is downsized to 64-128 pixels.
_SPINE_ZOOM = 1.5
# Neck growth from the top slice to the bottom slice: half-width, half-depth factors.
_NECK_GROWTH = (1.2, 1.1)
_POLYGON_SHIFT = 4  # cv2 fixed-point bits: vertices carry 1/16 pixel precision


@dataclass(frozen=True)
class LevelShape:
    """Vertebra dimensions in mm before the study's scale: half-axes and process length."""

    body_half_width: float
    body_half_depth: float
    canal_half_width: float
    canal_half_depth: float
    spinous_length: float


# C1 has no body: its row gives the ring's inner size via the canal columns.
_LEVEL_SHAPES = {
    "C1": LevelShape(0.0, 0.0, 12.0, 10.0, 0.0),
    "C2": LevelShape(8.0, 7.5, 10.0, 6.5, 11.0),
    "C3": LevelShape(8.0, 6.5, 10.0, 6.0, 6.5),
    "C4": LevelShape(8.6, 6.8, 10.5, 6.0, 7.5),
    "C5": LevelShape(9.2, 7.0, 11.0, 6.0, 8.5),
    "C6": LevelShape(10.0, 7.3, 11.0, 6.0, 10.5),
    "C7": LevelShape(11.0, 7.8, 10.5, 6.5, 14.0),
    "T1": LevelShape(12.2, 9.5, 8.0, 7.0, 12.5),
    "T2": LevelShape(13.0, 10.5, 7.5, 7.0, 12.0),
    "T3": LevelShape(13.6, 11.5, 7.0, 7.0, 11.0),
}

_SLICE_COUNT_RANGES = {
    "C1": (3, 4),
    "C2": (4, 6),
    **{level: (3, 5) for level in CERVICAL_LEVELS[2:]},
    **{level: (4, 5) for level in ("T1", "T2", "T3")},
}


@dataclass(frozen=True)
class LevelExtent:
    """The consecutive slice positions of one vertebra (position 0 is the top slice)."""

    level: str
    first: int
    count: int

    @property
    def positions(self) -> range:
        return range(self.first, self.first + self.count)


@dataclass(frozen=True)
class Crack:
    """One fracture line of a vertebra: a segment in the spine frame (mm), drawn per slice.

    The crack is `start_width_mm` wide where it enters the cortex at `start` and narrows to
    `width_mm`, so the break of the cortical outline stays visible in a downsized image.
    """

    level: str
    positions: tuple[int, ...]
    start: tuple[float, float]
    end: tuple[float, float]
    start_width_mm: float
    width_mm: float
    # Shift of the segment per slice (mm), so the crack forms a slanted plane.
    drift: tuple[float, float]


@dataclass(frozen=True)
class Tissue:
    """Hounsfield units of the study's tissues."""

    soft: float
    fat: float
    disc: float
    csf: float
    lung: float
    cortical: float
    cancellous: float
    noise_sigma: float


@dataclass(frozen=True)
class PhantomSpec:
    """Everything that fixes a study's pixels; render_slice is a pure function of it."""

    image_size: int
    pixel_spacing: float  # mm, square pixels
    slice_spacing: float  # mm between slice centres
    n_slices: int
    top_margin: int
    extents: tuple[LevelExtent, ...]
    scale: float
    level_scales: tuple[float, ...]  # per level of LEVELS
    level_rotations: tuple[float, ...]  # degrees added to `rotation` per level
    rotation: float  # degrees, in-plane
    neck_half_width: float  # mm at the top slice
    neck_half_depth: float
    neck_offset: tuple[float, float]  # mm from the image centre to the neck centre
    spine_offset: tuple[float, float]  # mm from the neck centre to the C2 body centre
    lordosis: float  # mm of anterior bow at mid-column
    fat_thickness: float
    cortex_thickness: float
    tissue: Tissue
    cracks: tuple[Crack, ...]
    noise_seed: int

    def extent(self, level: str) -> LevelExtent:
        for extent in self.extents:
            if extent.level == level:
                return extent
        raise KeyError(f"level {level} is not in this phantom (levels: {self.levels})")

    @property
    def levels(self) -> tuple[str, ...]:
        return tuple(extent.level for extent in self.extents)


@dataclass(frozen=True)
class SliceImage:
    """One rendered slice: HU (int16), vertebra labels (uint8, 0 or 1..10) and cracks.

    A label marks all bone of its vertebra, crack pixels included, as a segmentation of the
    whole vertebra would. `crack` is uint8: 0 where no crack was drawn, i + 1 on the pixels
    of spec.cracks[i].
    """

    hu: np.ndarray
    labels: np.ndarray
    crack: np.ndarray


def make_phantom_spec(
    rng: np.random.Generator, image_size: int, fractured_levels: tuple[str, ...] = ()
) -> PhantomSpec:
    """Draw one study's anatomy, with cracks through the vertebrae in `fractured_levels`."""
    unknown = [level for level in fractured_levels if level not in CERVICAL_LEVELS]
    if unknown:
        raise ValueError(f"fractured levels must be among C1..C7, got {unknown}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels, got {image_size}")

    n_thoracic = int(rng.choice([2, 3]))
    levels = LEVELS[: 7 + n_thoracic]
    top_margin = int(rng.integers(1, 3))
    extents = []
    position = top_margin
    for level in levels:
        low, high = _SLICE_COUNT_RANGES[level]
        count = int(rng.integers(low, high + 1))
        extents.append(LevelExtent(level, position, count))
        position += count + 1  # one disc slice below each vertebra
    n_slices = position - 1  # the stack ends on the last vertebra, not on a disc

    neck_half_width = float(rng.uniform(60.0, 68.0))
    neck_half_depth = float(rng.uniform(58.0, 64.0))
    # The neck widens toward the shoulders. The widest slice fills this fraction of the image.
    fill = float(rng.uniform(0.84, 0.92))
    pixel_spacing = round(neck_half_width * _NECK_GROWTH[0] / (fill * image_size / 2), 6)
    field_of_view = pixel_spacing * image_size

    tissue = Tissue(
        soft=float(rng.uniform(35.0, 50.0)),
        fat=float(rng.uniform(-110.0, -85.0)),
        disc=float(rng.uniform(70.0, 95.0)),
        csf=float(rng.uniform(10.0, 25.0)),
        lung=float(rng.uniform(-870.0, -820.0)),
        cortical=float(rng.uniform(700.0, 1200.0)),
        cancellous=float(rng.uniform(200.0, 350.0)),
        noise_sigma=float(rng.uniform(10.0, 20.0)),
    )
    # A global intensity scale on bone imitates scanner and reconstruction differences.
    intensity = float(rng.uniform(0.9, 1.1))
    tissue = replace(
        tissue, cortical=tissue.cortical * intensity, cancellous=tissue.cancellous * intensity
    )

    spec = PhantomSpec(
        image_size=image_size,
        pixel_spacing=pixel_spacing,
        slice_spacing=float(rng.choice([2.5, 3.0, 3.5])),
        n_slices=n_slices,
        top_margin=top_margin,
        extents=tuple(extents),
        scale=float(rng.uniform(0.9, 1.1)),
        level_scales=tuple(float(x) for x in rng.uniform(0.95, 1.05, len(LEVELS))),
        level_rotations=tuple(float(x) for x in rng.uniform(-2.0, 2.0, len(LEVELS))),
        rotation=float(rng.uniform(-8.0, 8.0)),
        neck_half_width=neck_half_width,
        neck_half_depth=neck_half_depth,
        neck_offset=(
            float(rng.uniform(-0.03, 0.03) * field_of_view),
            float(rng.uniform(-0.03, 0.03) * field_of_view),
        ),
        # The vertebral bodies sit a little in front of the neck's centre.
        spine_offset=(float(rng.uniform(-4.0, 4.0)), float(-rng.uniform(0.1, 0.16) * neck_half_depth)),
        lordosis=float(rng.uniform(2.0, 6.0)),
        fat_thickness=float(rng.uniform(3.0, 7.0)),
        cortex_thickness=float(rng.uniform(2.0, 2.8)),
        tissue=tissue,
        cracks=(),
        noise_seed=int(rng.integers(0, 2**31 - 1)),
    )
    cracks: list[Crack] = []
    for level in fractured_levels:
        cracks.extend(_make_cracks(rng, spec, level))
    return replace(spec, cracks=tuple(cracks))


def _level_size(spec: PhantomSpec, level: str) -> float:
    return _SPINE_ZOOM * spec.scale * spec.level_scales[LEVELS.index(level)]


def _atlas_geometry(spec: PhantomSpec) -> dict[str, float]:
    """Return the C1 ring and dens geometry (mm, spine frame) for rendering and crack placement."""
    axis = _LEVEL_SHAPES["C2"]
    size_c2 = _level_size(spec, "C2")
    size = _level_size(spec, "C1")
    dens_radius = 5.0 * size_c2
    dens_v = -0.1 * axis.body_half_depth * size_c2
    thickness = 4.0 * size
    outer_half_depth = (_LEVEL_SHAPES["C1"].canal_half_depth + 8.0) * size
    outer_half_width = (_LEVEL_SHAPES["C1"].canal_half_width + 4.0) * size
    # The anterior arch sits 1.5 mm in front of the dens.
    ring_v = dens_v - dens_radius - 1.5 + outer_half_depth - thickness
    return {
        "dens_radius": dens_radius,
        "dens_v": dens_v,
        "ring_v": ring_v,
        "ring_half_width": outer_half_width,
        "ring_half_depth": outer_half_depth,
        "ring_thickness": thickness,
    }


def _make_cracks(rng: np.random.Generator, spec: PhantomSpec, level: str) -> list[Crack]:
    """Place one or two cracks through the cortex of `level` on most of its slices."""
    extent = spec.extent(level)
    n_drawn = int(rng.integers(max(2, math.ceil(0.7 * extent.count)), extent.count + 1))
    first = extent.first + int(rng.integers(0, extent.count - n_drawn + 1))
    positions = tuple(range(first, first + n_drawn))
    # 3.5-5 mm: about 2-3 pixels once a 256 px slice is downsized to the demo's 96 px.
    width = float(rng.uniform(3.5, 5.0))
    drift = (float(rng.uniform(-0.5, 0.5)), float(rng.uniform(-0.5, 0.5)))
    cracks = []
    if level == "C1":
        # A ring fracture (Jefferson type): a gap across the ring, often on both sides.
        atlas = _atlas_geometry(spec)
        n_gaps = int(rng.choice([1, 2]))
        angles = rng.uniform(0.0, 2 * math.pi, n_gaps)
        for angle in angles:
            tilt = rng.uniform(-0.25, 0.25)
            a, b = atlas["ring_half_width"], atlas["ring_half_depth"]
            start = (0.6 * a * math.cos(angle), atlas["ring_v"] + 0.6 * b * math.sin(angle))
            end = (
                1.3 * a * math.cos(angle + tilt),
                atlas["ring_v"] + 1.3 * b * math.sin(angle + tilt),
            )
            cracks.append(Crack(level, positions, start, end, width * 1.3, width * 1.3, drift))
        return cracks

    shape = _LEVEL_SHAPES[level]
    size = _level_size(spec, level)
    a, b = shape.body_half_width * size, shape.body_half_depth * size
    angle = float(rng.uniform(0.0, 2 * math.pi))
    start = (1.3 * a * math.cos(angle), 1.3 * b * math.sin(angle))
    # Aim at the body centre with a tilt. Long cracks split the body from side to side.
    direction = math.atan2(-start[1], -start[0]) + float(rng.uniform(-0.45, 0.45))
    length = float(rng.uniform(1.0, 2.1)) * math.hypot(*start)
    end = (start[0] + length * math.cos(direction), start[1] + length * math.sin(direction))
    cracks.append(Crack(level, positions, start, end, 2.0 * width, width, drift))
    if rng.random() < 0.3:
        # A second line through a lamina of the posterior arch.
        canal_v = b + 1.0 + shape.canal_half_depth * size
        side = float(rng.choice([-1.0, 1.0]))
        angle = math.radians(float(rng.uniform(40.0, 80.0)))
        radius_a = shape.canal_half_width * size
        radius_b = shape.canal_half_depth * size
        start = (side * 0.7 * radius_a * math.cos(angle), canal_v + 0.7 * radius_b * math.sin(angle))
        end = (
            side * (radius_a + 6.0) * math.cos(angle),
            canal_v + (radius_b + 6.0) * math.sin(angle),
        )
        cracks.append(Crack(level, positions, start, end, width, width, drift))
    return cracks


class _Frame:
    """Map (u, v) mm in a rotated frame to pixel (column, row) of the image."""

    def __init__(self, origin_px: tuple[float, float], degrees: float, pixel_spacing: float):
        self.origin = np.asarray(origin_px, dtype=np.float64)
        theta = math.radians(degrees)
        cos, sin = math.cos(theta), math.sin(theta)
        self.rotation = np.array([[cos, -sin], [sin, cos]])
        self.pixel_spacing = pixel_spacing

    def to_pixels(self, points_mm: np.ndarray) -> np.ndarray:
        return self.origin + points_mm @ self.rotation.T / self.pixel_spacing


class _Canvas:
    """HU image and label image of one slice, drawn in painter's order."""

    def __init__(self, size: int):
        self.hu = np.full((size, size), -1000.0, dtype=np.float32)
        self.labels = np.zeros((size, size), dtype=np.uint8)

    def fill(self, frame: _Frame, polygon_mm: np.ndarray, hu: float, label: int | None = None) -> None:
        """Fill a polygon with `hu` and, unless `label` is None, set its labels to `label`."""
        points = _fixed_point(frame, polygon_mm)
        cv2.fillPoly(self.hu, [points], float(hu), lineType=cv2.LINE_8, shift=_POLYGON_SHIFT)
        if label is not None:
            cv2.fillPoly(self.labels, [points], int(label), lineType=cv2.LINE_8, shift=_POLYGON_SHIFT)

    def mask(self, frame: _Frame, polygon_mm: np.ndarray) -> np.ndarray:
        mask = np.zeros(self.labels.shape, dtype=np.uint8)
        points = _fixed_point(frame, polygon_mm)
        cv2.fillPoly(mask, [points], 1, lineType=cv2.LINE_8, shift=_POLYGON_SHIFT)
        return mask.astype(bool)


def _fixed_point(frame: _Frame, polygon_mm: np.ndarray) -> np.ndarray:
    return np.round(frame.to_pixels(polygon_mm) * (1 << _POLYGON_SHIFT)).astype(np.int32)


def _ellipse(cu: float, cv: float, a: float, b: float, n: int = 48) -> np.ndarray:
    t = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
    return np.stack([cu + a * np.cos(t), cv + b * np.sin(t)], axis=1)


def _circle(cu: float, cv: float, radius: float) -> np.ndarray:
    return _ellipse(cu, cv, radius, radius, 24)


def _arc_band(
    cu: float, cv: float, a: float, b: float, thickness: float, start: float, stop: float
) -> np.ndarray:
    """Polygon of an elliptic band between angles `start` and `stop` (radians)."""
    t = np.linspace(start, stop, 32)
    outer = np.stack([cu + a * np.cos(t), cv + b * np.sin(t)], axis=1)
    inner = np.stack([cu + (a - thickness) * np.cos(t), cv + (b - thickness) * np.sin(t)], axis=1)
    return np.concatenate([outer, inner[::-1]])


def _bar(
    p0: tuple[float, float], p1: tuple[float, float], width: float, end_width: float | None = None
) -> np.ndarray:
    """Polygon of a straight band from p0 to p1, `width` mm wide (tapering to `end_width`)."""
    start, stop = np.asarray(p0, dtype=np.float64), np.asarray(p1, dtype=np.float64)
    direction = stop - start
    length = float(np.hypot(*direction))
    if length == 0.0:
        raise ValueError(f"a bar needs two distinct end points, got {p0} twice")
    unit_normal = np.array([-direction[1], direction[0]]) / length
    start_offset = unit_normal * (width / 2)
    stop_offset = unit_normal * ((width if end_width is None else end_width) / 2)
    return np.stack([start + start_offset, stop + stop_offset, stop - stop_offset, start - start_offset])


class _Painter:
    """Draw the bones of one slice in the spine frame."""

    def __init__(self, spec: PhantomSpec, canvas: _Canvas, frame: _Frame):
        self.spec = spec
        self.canvas = canvas
        self.frame = frame
        self.tissue = spec.tissue
        self.cortex = spec.cortex_thickness

    @property
    def arch_hu(self) -> float:
        """HU of thin bone (arches, processes, ribs): mostly cortical."""
        return 0.75 * self.tissue.cortical + 0.25 * self.tissue.cancellous

    def shell(self, cu: float, cv: float, a: float, b: float, label: int) -> None:
        """Fill an ellipse of cortical bone around cancellous bone."""
        self.canvas.fill(self.frame, _ellipse(cu, cv, a, b), self.tissue.cortical, label)
        inner_a, inner_b = a - self.cortex, b - self.cortex
        if inner_a > 0.5 and inner_b > 0.5:
            self.canvas.fill(self.frame, _ellipse(cu, cv, inner_a, inner_b), self.tissue.cancellous)

    def solid(self, polygon: np.ndarray, label: int) -> None:
        self.canvas.fill(self.frame, polygon, self.arch_hu, label)

    def soft(self, polygon: np.ndarray, hu: float) -> None:
        self.canvas.fill(self.frame, polygon, hu, 0)

    def occiput(self) -> None:
        atlas = _atlas_geometry(self.spec)
        a = atlas["ring_half_width"] * 1.6
        b = atlas["ring_half_depth"] * 1.5
        band = _arc_band(0.0, atlas["ring_v"], a, b, 6.0 * self.spec.scale, 0.2, math.pi - 0.2)
        self.canvas.fill(self.frame, band, self.arch_hu, _OTHER_BONE)

    def atlas(self, index: int, count: int, with_dens: bool) -> None:
        """C1: a ring with lateral masses and, on middle slices, transverse processes."""
        label = LEVEL_LABELS["C1"]
        atlas = _atlas_geometry(self.spec)
        size = _level_size(self.spec, "C1")
        ring_v, a, b = atlas["ring_v"], atlas["ring_half_width"], atlas["ring_half_depth"]
        thickness = atlas["ring_thickness"]
        if 0 < index < count - 1 or count <= 2:
            for side in (-1.0, 1.0):
                root = (side * (a - 3.0), ring_v - 4.0)
                tip = (side * (a + 9.0 * size), ring_v - 5.0)
                self.solid(_bar(root, tip, 6.0 * size), label)
                self.soft(_circle(side * (a + 3.0 * size), ring_v - 4.5, 2.3 * size), self.tissue.soft)
        self.canvas.fill(self.frame, _ellipse(0.0, ring_v, a, b, 64), self.arch_hu, label)
        self.soft(_ellipse(0.0, ring_v, a - thickness, b - thickness, 64), self.tissue.soft)
        self.solid(_circle(0.0, ring_v + b - 1.0, 3.0 * size), label)  # posterior tubercle
        for side in (-1.0, 1.0):
            self.shell(side * (a - 4.0 * size), ring_v - 4.0 * size, 5.5 * size, 8.0 * size, label)
        if with_dens:
            self.dens()

    def dens(self) -> None:
        atlas = _atlas_geometry(self.spec)
        radius = atlas["dens_radius"]
        self.shell(0.0, atlas["dens_v"], radius, radius, LEVEL_LABELS["C2"])

    def body(self, level: str) -> None:
        shape = _LEVEL_SHAPES[level]
        size = _level_size(self.spec, level)
        a, b = shape.body_half_width * size, shape.body_half_depth * size
        self.shell(0.0, 0.0, a, b, LEVEL_LABELS[level])

    def posterior(self, level: str, arch: bool, spinous: bool, transverse: bool) -> None:
        """Draw the arch, canal and processes of `level`. Call it before body(), which overlaps them."""
        shape = _LEVEL_SHAPES[level]
        size = _level_size(self.spec, level)
        label = LEVEL_LABELS[level]
        a, b = shape.body_half_width * size, shape.body_half_depth * size
        canal_a, canal_b = shape.canal_half_width * size, shape.canal_half_depth * size
        canal_v = b + 1.0 + canal_b
        arch_thickness = 3.5 * size
        back = canal_v + canal_b + arch_thickness * 0.5
        thoracic = level.startswith("T")

        if transverse and not thoracic:
            # Cervical transverse processes carry a foramen; C7's is small, its process long.
            reach = (13.0 if level == "C7" else 9.0) * size
            hole = (1.5 if level == "C7" else 2.4) * size
            for side in (-1.0, 1.0):
                process = _bar((side * 0.8 * a, 0.2 * b), (side * (a + reach), 0.1 * b), 6.0 * size)
                self.solid(process, label)
                self.soft(_circle(side * (a + 4.0 * size), 0.15 * b, hole), self.tissue.soft)
        if transverse and thoracic:
            for side in (-1.0, 1.0):
                tip = (side * (canal_a + 16.0 * size), canal_v + 5.0 * size)
                self.solid(_bar((side * 0.8 * canal_a, canal_v), tip, 7.0 * size), label)
                # Rib stub from the body's side past the transverse process tip, then forward.
                rib_end = (side * (canal_a + 28.0 * size), canal_v - 6.0 * size)
                rib_neck = _bar((side * (a + 1.0), 0.0), tip, 5.0 * size)
                self.canvas.fill(self.frame, rib_neck, self.arch_hu, _OTHER_BONE)
                self.canvas.fill(self.frame, _bar(tip, rib_end, 6.0 * size), self.arch_hu, _OTHER_BONE)
        if spinous and shape.spinous_length > 0:
            tip_v = back + shape.spinous_length * size
            self.solid(_bar((0.0, back - 1.0), (0.0, tip_v), 4.5 * size), label)
            if level in ("C2", "C3", "C4", "C5", "C6"):  # bifid tips
                for side in (-1.0, 1.0):
                    self.solid(_circle(side * 2.5 * size, tip_v, 2.3 * size), label)
            else:
                self.solid(_circle(0.0, tip_v, 3.2 * size), label)
        if arch:
            self.solid(_ellipse(0.0, canal_v, canal_a + arch_thickness, canal_b + arch_thickness), label)
            self.soft(_ellipse(0.0, canal_v, canal_a, canal_b), self.tissue.csf)

    def axis_facets(self) -> None:
        """C2's superior articular facets, on both sides of the dens."""
        shape = _LEVEL_SHAPES["C2"]
        size = _level_size(self.spec, "C2")
        a, b = shape.body_half_width * size, shape.body_half_depth * size
        for side in (-1.0, 1.0):
            centre_u = side * (0.9 * a + 5.0 * size)
            self.shell(centre_u, 0.3 * b, 5.5 * size, 7.0 * size, LEVEL_LABELS["C2"])

    def disc(self, upper: str, lower: str) -> None:
        half_widths, half_depths = [], []
        for level in (upper, lower):
            size = _level_size(self.spec, level)
            half_widths.append(_LEVEL_SHAPES[level].body_half_width * size)
            half_depths.append(_LEVEL_SHAPES[level].body_half_depth * size)
        disc = _ellipse(0.0, 0.0, float(np.mean(half_widths)), float(np.mean(half_depths)))
        self.soft(disc, self.tissue.disc)


def _slice_role(spec: PhantomSpec, position: int) -> tuple[str, str | None, int, int]:
    """Return (kind, level, index, count): kind is 'margin', 'vertebra' or 'disc'."""
    if position < spec.top_margin:
        return "margin", None, position, spec.top_margin
    for extent in spec.extents:
        if position in extent.positions:
            return "vertebra", extent.level, position - extent.first, extent.count
        if position == extent.first + extent.count:
            return "disc", extent.level, 0, 1
    raise ValueError(f"slice position {position} is outside the phantom's {spec.n_slices} slices")


def _paint_neck(canvas: _Canvas, spec: PhantomSpec, depth: float) -> _Frame:
    """Draw the neck (fat rim, soft tissue, fat pads); return the neck frame."""
    spacing = spec.pixel_spacing
    centre = (spec.image_size - 1) / 2
    origin = (centre + spec.neck_offset[0] / spacing, centre + spec.neck_offset[1] / spacing)
    frame = _Frame(origin, spec.rotation, spacing)
    neck_a = spec.neck_half_width * (1.0 + (_NECK_GROWTH[0] - 1.0) * depth)
    neck_b = spec.neck_half_depth * (1.0 + (_NECK_GROWTH[1] - 1.0) * depth)
    canvas.fill(frame, _ellipse(0.0, 0.0, neck_a, neck_b, 96), spec.tissue.fat)
    inner_a, inner_b = neck_a - spec.fat_thickness, neck_b - spec.fat_thickness
    canvas.fill(frame, _ellipse(0.0, 0.0, inner_a, inner_b, 96), spec.tissue.soft)
    for side in (-1.0, 1.0):
        fat_pad = _ellipse(side * 0.45 * inner_a, 0.35 * inner_b, 0.08 * inner_a, 0.16 * inner_b, 32)
        canvas.fill(frame, fat_pad, spec.tissue.fat)
    return frame


def _spine_frame(spec: PhantomSpec, neck: _Frame, depth: float, level: str | None) -> _Frame:
    """Return the frame centred on the vertebral body.

    The column bows forward at mid-neck (lordosis) and turns a little per level.
    """
    bow = -spec.lordosis * math.sin(math.pi * min(depth / 0.75, 1.0))
    level_turn = spec.level_rotations[LEVELS.index(level)] if level else 0.0
    offset_mm = np.array([spec.spine_offset[0], spec.spine_offset[1] + bow])
    offset_px = neck.rotation @ offset_mm / spec.pixel_spacing
    return _Frame(tuple(neck.origin + offset_px), spec.rotation + level_turn, spec.pixel_spacing)


def _paint_air(
    canvas: _Canvas, spec: PhantomSpec, frame: _Frame, position: int, depth: float, thoracic: bool
) -> None:
    """Draw the airway in front of the spine and, at thoracic levels, the lung apices."""
    # A wide flat pharynx at the top, a round trachea lower down.
    body_depth = _LEVEL_SHAPES["C3"].body_half_depth * _SPINE_ZOOM * spec.scale
    airway_a = (12.0 - 4.0 * depth) * spec.scale
    airway_b = (5.0 + 3.5 * depth) * spec.scale
    airway_v = -(body_depth + 5.0 + airway_b + 6.0 * depth)
    canvas.fill(frame, _ellipse(0.0, airway_v, airway_a, airway_b), -1000.0, 0)
    if not thoracic:
        return
    # The apices beside T1.. grow toward the bottom of the stack.
    first_thoracic = spec.extent("T1").first
    radius = min(4.0 + 1.5 * max(position - first_thoracic + 1, 0), 13.0) * spec.scale
    body_a = _LEVEL_SHAPES["T1"].body_half_width * _SPINE_ZOOM * spec.scale
    for side in (-1.0, 1.0):
        apex = _ellipse(side * (body_a + 10.0 + radius), -2.0, radius, 1.2 * radius, 40)
        canvas.fill(frame, apex, spec.tissue.lung, 0)


def _paint_bones(painter: _Painter, kind: str, level: str | None, index: int, count: int) -> None:
    if kind == "margin":
        painter.occiput()
    elif kind == "vertebra" and level == "C1":
        painter.atlas(index, count, with_dens=index >= count - 2)
    elif kind == "disc" and level == "C1":
        painter.dens()  # the dens passes the C1/C2 joint
    elif kind == "vertebra" and level == "C2":
        _paint_axis(painter, index, count)
    elif kind == "vertebra":
        if level.startswith("T"):
            transverse = 1 <= index <= count - 2 or count <= 3  # with the rib stubs
        else:
            transverse = index <= count - 2
        arch = index >= 1 or count <= 3
        painter.posterior(level, arch=arch, spinous=index >= count // 2, transverse=transverse)
        painter.body(level)
    else:
        # A disc slice shows the disc and the laminae and spinous process of the vertebra above.
        following = LEVELS[LEVELS.index(level) + 1]
        painter.posterior(level, arch=True, spinous=True, transverse=False)
        painter.disc(level, following)


def _paint_axis(painter: _Painter, index: int, count: int) -> None:
    """C2: dens and superior facets on top, then the body with a long bifid spinous process."""
    if index == 0:
        painter.axis_facets()
        painter.dens()
        return
    if index == 1:
        painter.axis_facets()
        painter.body("C2")
        painter.dens()
        return
    painter.posterior("C2", arch=True, spinous=index >= count // 2, transverse=False)
    painter.body("C2")


def _cut_cracks(canvas: _Canvas, spec: PhantomSpec, frame: _Frame, position: int) -> np.ndarray:
    """Replace the bone under each crack on this slice by soft tissue and return the crack ids."""
    crack_ids = np.zeros(canvas.labels.shape, dtype=np.uint8)
    # A crack narrower than about one pixel would vanish in rasterisation.
    minimum = 1.2 * spec.pixel_spacing
    for crack_index, crack in enumerate(spec.cracks):
        if position not in crack.positions:
            continue
        shift = np.array(crack.drift) * (position - crack.positions[0])
        start = tuple(np.array(crack.start) + shift)
        end = tuple(np.array(crack.end) + shift)
        polygon = _bar(start, end, max(crack.start_width_mm, minimum), max(crack.width_mm, minimum))
        hit = canvas.mask(frame, polygon) & (canvas.labels == LEVEL_LABELS[crack.level])
        canvas.hu[hit] = spec.tissue.soft
        crack_ids[hit] = crack_index + 1
    return crack_ids


def render_slice(spec: PhantomSpec, position: int) -> SliceImage:
    """Render the slice at `position` (0 = top) as HU, vertebra labels and crack ids."""
    if not 0 <= position < spec.n_slices:
        raise ValueError(f"slice position {position} is outside 0..{spec.n_slices - 1}")
    depth = position / max(spec.n_slices - 1, 1)  # 0 at the top, 1 at the bottom
    kind, level, index, count = _slice_role(spec, position)
    canvas = _Canvas(spec.image_size)

    neck = _paint_neck(canvas, spec, depth)
    frame = _spine_frame(spec, neck, depth, level)
    thoracic = level is not None and (level.startswith("T") or (kind == "disc" and level == "C7"))
    _paint_air(canvas, spec, frame, position, depth, thoracic)
    _paint_bones(_Painter(spec, canvas, frame), kind, level, index, count)
    crack_ids = _cut_cracks(canvas, spec, frame, position)

    noise_rng = np.random.default_rng([spec.noise_seed, position])
    noise = noise_rng.normal(0.0, spec.tissue.noise_sigma, canvas.hu.shape).astype(np.float32)
    hu = np.clip(np.rint(canvas.hu + noise), HU_MIN, HU_MAX).astype(np.int16)
    labels = np.where(canvas.labels == _OTHER_BONE, 0, canvas.labels).astype(np.uint8)
    return SliceImage(hu=hu, labels=labels, crack=crack_ids)


def render_volume(spec: PhantomSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Render all slices, top first: HU (n, S, S) int16, labels and crack ids, both uint8."""
    slices = [render_slice(spec, position) for position in range(spec.n_slices)]
    hu = np.stack([s.hu for s in slices])
    labels = np.stack([s.labels for s in slices])
    crack = np.stack([s.crack for s in slices])
    return hu, labels, crack
