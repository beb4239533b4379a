"""``shapes``: generated images of one coloured shape, with a question about it (VHD items).

Each item is a PNG drawn with PIL (a circle, square or triangle in one of eight colours, at a
random place and size, on a light background with noise so no two images are alike) and the
text ``USER: <image>\\nWhat color is the shape? ASSISTANT:``. ``<image>`` is the generic
placeholder: :func:`workbench.inputs.conditions.image_pair` swaps it for the model's own (Gemma 3's
``<start_of_image>``, ...). Images are written once per seed under the workbench cache (or
``folder``); item paths are absolute. Metadata: ``color``, ``shape``.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Literal

from pydantic import Field

from workbench.inputs.prompts import Prompt
from workbench.protocol.params import Int

from .options import DatasetOptions

MAX_IMAGES = 10_000

DESCRIPTION = "generated images of a coloured shape + a question about it (items for the vhd probe)"
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (130, 40, 170),
    "orange": (245, 130, 20),
    "black": (15, 15, 15),
    "pink": (240, 110, 180),
}
SHAPES = ("circle", "square", "triangle")
QUESTIONS = {"color": "What color is the shape?", "shape": "What shape is in the image?"}


def draw(shape: str, color: tuple[int, int, int], rng: random.Random, size: int = 96):
    """One image: the shape on a noisy light background."""
    from PIL import Image, ImageDraw

    bg = tuple(rng.randint(225, 250) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    px = img.load()
    for _ in range(size * size // 8):
        x, y = rng.randrange(size), rng.randrange(size)
        px[x, y] = tuple(max(0, c - rng.randint(0, 30)) for c in bg)
    r = rng.randint(size // 5, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    d = ImageDraw.Draw(img)
    if shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=color)
    elif shape == "square":
        d.rectangle((cx - r, cy - r, cx + r, cy + r), fill=color)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    return img


class Options(DatasetOptions):
    n_prompts: Int | None = Field(
        None, ge=1, le=MAX_IMAGES, json_schema_extra={"fix": f"ask for 1 to {MAX_IMAGES} items (each is an image file)"}
    )
    question: Literal["color", "shape"] = "color"
    folder: str | None = None


def make(
    n_prompts: int | None = None, seed: int = 0, question: str = "color", folder: str | None = None
) -> list[Prompt]:
    from workbench.errors import WorkbenchError
    from workbench.files.atomic import atomic_write
    from workbench.models.embedded import cache_root

    if question not in QUESTIONS:
        raise WorkbenchError(f"unknown shapes question {question!r}", f"choose from: {', '.join(QUESTIONS)}")
    n = 8 if n_prompts is None else n_prompts
    out = Path(folder) if folder else cache_root() / "datasets" / f"shapes-{seed}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkbenchError(
            f"cannot create the shapes image folder {out}: {exc.strerror or exc}", "give a writable folder (folder=...)"
        ) from None
    rng = random.Random(seed)
    items = []
    for i in range(n):
        color, shape = rng.choice(sorted(COLORS)), rng.choice(SHAPES)
        path = out / f"{i:04d}-{color}-{shape}.png"
        img = draw(shape, COLORS[color], rng)
        if not path.is_file():  # atomic: concurrent runs of the same seed never see half a PNG
            atomic_write(path, lambda f, img=img: img.save(f, format="PNG"))
        items.append(
            Prompt(
                f"shape-{i}",
                text=f"USER: <image>\n{QUESTIONS[question]} ASSISTANT:",
                meta={"image": str(path.resolve()), "color": color, "shape": shape},
            )
        )
    return items
