"""A deterministic, dermoscopy-like synthetic dataset with exact masks.

Each sample is drawn from its own random stream ``SeedSequence([seed, split, index])``, so
splits never share a stream and a sample does not depend on how many others are made.
An image is built in layers: skin-toned textured background with freckles, one irregular
pigmented lesion (varied size, shape, colour, contrast, internal texture and edge softness),
hair strands, sometimes a gel bubble or a ruler, vignetting or the dark circular frame of a
dermoscope, illumination gradient and sensor noise. The mask is the lesion's own shape
(the level set at which the lesion blends in at half strength), so it is exact; hairs,
bubbles and rulers cover the lesion without changing the mask, as in ISIC ground truth.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

GENERATOR_VERSION = 1
DEFAULT_SPLIT_COUNTS = {"train": 160, "val": 40, "test": 60}
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}

# Colours in RGB, 0..255.
_SKIN_TONES = np.array(
    [[236, 200, 175], [225, 180, 150], [210, 160, 130], [240, 190, 170], [200, 140, 115],
     [170, 115, 90], [228, 170, 160]],
    dtype=np.float32,
)  # fmt: skip
_LESION_TONES = np.array(
    [[150, 95, 65], [110, 65, 45], [70, 45, 35], [45, 30, 28], [95, 85, 100], [165, 85, 80],
     [125, 80, 60]],
    dtype=np.float32,
)  # fmt: skip
_HAIR_TONES = np.array([[35, 25, 20], [70, 50, 35], [20, 18, 18], [120, 95, 70]], np.float32)
_REDNESS = np.array([1.0, -0.3, -0.4], np.float32)  # erythema direction in RGB
_FRECKLE = np.array([0.8, 1.0, 1.1], np.float32)  # freckles darken blue and green most
_ANGLE_BINS = 1024


def split_counts(total: int | None = None) -> dict[str, int]:
    """Images per split: the defaults (160/40/60), or ``total`` shared in the same ratio."""
    if total is None:
        return dict(DEFAULT_SPLIT_COUNTS)
    if not isinstance(total, int) or total < 3:
        raise ValueError(f"num_synthetic must be an integer >= 3, got {total!r}")
    default_total = sum(DEFAULT_SPLIT_COUNTS.values())
    train = max(1, round(total * DEFAULT_SPLIT_COUNTS["train"] / default_total))
    val = max(1, round(total * DEFAULT_SPLIT_COUNTS["val"] / default_total))
    test = total - train - val
    if test < 1:
        train, test = train - 1, 1
    return {"train": train, "val": val, "test": test}


def sample_id(split: str, index: int) -> str:
    return f"synthetic_{split}_{index:05d}"


def generate_sample(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """One sample: image (size, size, 3) uint8 and mask (size, size) uint8 in {0, 1}."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_STREAM[split], index]))
    canvas = _Canvas(size)
    image = _skin(rng, canvas)
    lesion_field = _lesion_field(rng, canvas)
    mask = lesion_field > 0
    image = _paint_lesion(rng, canvas, image, lesion_field)
    image = _paint_hairs(rng, canvas, image)
    if rng.random() < 0.15:
        image = _paint_bubbles(rng, canvas, image)
    if rng.random() < 0.1:
        image = _paint_ruler(rng, canvas, image)
    image = _optics(rng, canvas, image)
    return image, mask.astype(np.uint8)


class _Canvas:
    """Pixel coordinates, normalised to [0, 1), shared by the drawing steps."""

    def __init__(self, size: int) -> None:
        self.size = size
        axis = (np.arange(size, dtype=np.float32) + 0.5) / size
        self.y, self.x = np.meshgrid(axis, axis, indexing="ij")  # (S, S) each

    def window(self, cx: float, cy: float, reach: float) -> tuple[slice, slice]:
        """Rows and columns within ``reach`` (normalised units) of the point (cx, cy)."""

        def span(centre: float) -> slice:
            low = max(0, int((centre - reach) * self.size))
            return slice(low, max(low, min(self.size, int((centre + reach) * self.size) + 1)))

        return span(cy), span(cx)

    def noise(self, rng: np.random.Generator, grid: int, channels: int = 1) -> np.ndarray:
        """Smooth noise, unit std at grid resolution, bicubic-upsampled: (S, S, channels)."""
        layers = []
        for _ in range(channels):
            coarse = rng.standard_normal((grid, grid)).astype(np.float32)
            layer = Image.fromarray(coarse, mode="F").resize((self.size, self.size), Image.BICUBIC)
            layers.append(np.asarray(layer))
        return np.stack(layers, axis=-1)

    def fractal(
        self, rng: np.random.Generator, grids: tuple[int, ...], channels: int = 1
    ) -> np.ndarray:
        """Sum of octaves of smooth noise, amplitude halving per octave: (S, S, channels)."""
        total = np.zeros((self.size, self.size, channels), np.float32)
        for octave, grid in enumerate(grids):
            total += self.noise(rng, min(grid, self.size), channels) * 0.5**octave
        return total


def _skin(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Background: skin tone, mottling, fine pore texture and a few freckles: (S, S, 3)."""
    tone = _SKIN_TONES[rng.integers(len(_SKIN_TONES))] * np.float32(rng.uniform(0.85, 1.08))
    brightness = canvas.fractal(rng, (3, 6, 12)) * np.float32(rng.uniform(4, 12))
    redness = canvas.noise(rng, 4) * np.float32(rng.uniform(0, 5)) * _REDNESS
    pores = canvas.noise(rng, canvas.size // 2) * np.float32(rng.uniform(2, 7))
    image = tone + brightness + redness + pores
    for _ in range(rng.integers(0, 6)):
        cx, cy = (float(v) for v in rng.uniform(0, 1, 2))
        radius = float(rng.uniform(0.005, 0.02))
        window = canvas.window(cx, cy, 3 * radius)
        spot = np.exp(
            -((canvas.x[window] - cx) ** 2 + (canvas.y[window] - cy) ** 2) / (2 * radius**2)
        )
        image[window] -= spot[..., None] * np.float32(rng.uniform(20, 60)) * _FRECKLE
    return image


def _lesion_field(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
    """Signed field, > 0 inside the lesion: 1 - r / R(theta) plus boundary noise: (S, S)."""
    radius = float(np.sqrt(rng.uniform(0.02, 0.45) / np.pi))
    reach = (0.5 - min(0.5, radius * 0.9)) * 0.8  # how far off-centre the lesion may sit
    cx, cy = (float(v) for v in rng.uniform(0.5 - reach, 0.5 + reach, 2))
    stretch = float(rng.uniform(0.65, 1.0))
    cos_turn, sin_turn = (
        float(v) for v in np.cos(rng.uniform(0, np.pi) + np.array([0, -np.pi / 2]))
    )
    dx, dy = canvas.x - cx, canvas.y - cy
    u = dx * cos_turn + dy * sin_turn
    v = (dy * cos_turn - dx * sin_turn) / stretch
    # Radius as a function of angle, tabulated on _ANGLE_BINS angles, then looked up.
    angles = np.linspace(-np.pi, np.pi, _ANGLE_BINS + 1, dtype=np.float32)
    outline = np.ones_like(angles)
    for k in range(2, 9):
        outline += rng.uniform(0, 0.28 / k) * np.cos(k * angles + rng.uniform(0, 2 * np.pi))
    bins = ((np.arctan2(v, u) + np.pi) * (_ANGLE_BINS / (2 * np.pi))).astype(np.int32)
    field = 1.0 - np.sqrt(u * u + v * v) / (radius * outline.astype(np.float32)[bins])
    raggedness = np.float32(rng.uniform(0.0, 0.25) * 0.5)
    return field + raggedness * canvas.fractal(rng, (8, 16))[..., 0]


def _paint_lesion(
    rng: np.random.Generator, canvas: _Canvas, image: np.ndarray, field: np.ndarray
) -> np.ndarray:
    """Blend the pigmented lesion in; its opacity is exactly 0.5 on the mask boundary."""
    tone = _LESION_TONES[rng.integers(len(_LESION_TONES))]
    contrast = np.float32(rng.uniform(0.3, 1.0))
    softness = np.float32(rng.uniform(0.03, 0.35))
    core = np.clip(field, 0, 1)[..., None]  # deeper inside -> darker
    texture = canvas.fractal(rng, (6, 12, 24)) * np.float32(rng.uniform(0.05, 0.25))
    colour = tone * (1.0 - np.float32(rng.uniform(0, 0.45)) * core) * (1.0 + texture)
    if rng.random() < 0.3:  # regression: pale patches inside the lesion
        pale = np.clip(canvas.noise(rng, 5) - 0.6, 0, 1)
        colour = colour + pale * (image - colour) * 0.8
    if rng.random() < 0.35:  # dark dots and globules
        dots = np.clip(canvas.noise(rng, canvas.size // 6) - 1.4, 0, 1)
        colour = colour * (1 - 0.7 * dots)
    opacity = np.clip(0.5 + field / softness, 0, 1)[..., None] * contrast
    opacity = np.where(field[..., None] > 0, np.maximum(opacity, 0.5 * contrast), opacity)
    return image + opacity * (colour - image)


def _paint_hairs(rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> np.ndarray:
    """Dark curved strands (quadratic Bezier curves), from none to dense."""
    count = 0 if rng.random() < 0.45 else int(rng.integers(1, 28))
    if count == 0:
        return image
    size = canvas.size
    layer = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(layer)
    steps = np.linspace(0, 1, 24)[:, None]
    for _ in range(count):
        start, bend, end = rng.uniform(-0.2, 1.2, (3, 2)) * size
        points = (1 - steps) ** 2 * start + 2 * (1 - steps) * steps * bend + steps**2 * end
        width = int(rng.integers(1, max(2, size // 96) + 1))
        draw.line([tuple(p) for p in points], fill=int(rng.integers(150, 256)), width=width)
    alpha = np.asarray(layer, np.float32)[..., None] / 255.0
    tone = _HAIR_TONES[rng.integers(len(_HAIR_TONES))]
    return image + alpha * (tone - image)


def _paint_bubbles(rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> np.ndarray:
    """Gel bubbles: a bright thin rim and a small specular highlight."""
    for _ in range(rng.integers(1, 5)):
        cx, cy = (float(v) for v in rng.uniform(0.05, 0.95, 2))
        radius = float(rng.uniform(0.03, 0.15))
        distance = np.sqrt((canvas.x - cx) ** 2 + (canvas.y - cy) ** 2)
        rim = np.exp(-(((distance - radius) / (radius * 0.06)) ** 2))
        glint = np.exp(
            -((canvas.x - cx + radius * 0.4) ** 2 + (canvas.y - cy + radius * 0.4) ** 2)
            / (2 * (radius * 0.12) ** 2)
        )
        image = image + (rim * 0.5 + glint * 0.8)[..., None] * (255.0 - image)
    return image


def _paint_ruler(rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> np.ndarray:
    """A pale ruler band with dark tick marks along one image edge."""
    size = canvas.size
    band = int(size * rng.uniform(0.06, 0.1))
    ruler = np.empty((band, size, 3), np.float32)
    ruler[:] = np.array([235, 232, 220], np.float32) * rng.uniform(0.85, 1.0)
    spacing = max(3, size // int(rng.integers(20, 40)))
    ticks = np.arange(0, size, spacing)
    for i, tick in enumerate(ticks):
        length = band // 2 if i % 5 == 0 else band // 4
        ruler[:length, tick : tick + max(1, size // 200)] = 40.0
    ruler = np.rot90(ruler, k=int(rng.integers(4)))  # which edge it lies on
    out = image.copy()
    if ruler.shape[0] == band:  # horizontal band: top or bottom
        rows = slice(0, band) if rng.random() < 0.5 else slice(size - band, size)
        out[rows] = ruler
    else:
        cols = slice(0, band) if rng.random() < 0.5 else slice(size - band, size)
        out[:, cols] = ruler
    return out


def _optics(rng: np.random.Generator, canvas: _Canvas, image: np.ndarray) -> np.ndarray:
    """Illumination gradient, vignetting or a dermoscope frame, sensor noise, then uint8."""
    slope_x, slope_y = (float(v) for v in rng.uniform(-0.15, 0.15, 2))
    light = 1.0 + slope_x * (canvas.x - 0.5) + slope_y * (canvas.y - 0.5)
    radius = np.sqrt((canvas.x - 0.5) ** 2 + (canvas.y - 0.5) ** 2)
    light = light * (1.0 - float(rng.uniform(0.0, 0.5)) * (radius / 0.7071) ** 2)
    if rng.random() < 0.3:
        edge = float(rng.uniform(0.5, 0.7))
        light = light * np.clip((edge - radius) / 0.02, 0.04, 1.0)
    image = image * light[..., None]
    noise_level = np.float32(rng.uniform(1, 6))
    image = image + rng.standard_normal(image.shape, dtype=np.float32) * noise_level
    return np.clip(image + 0.5, 0, 255).astype(np.uint8)
