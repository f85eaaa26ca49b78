"""A small SYNTHETIC labelled store for demos and tests: made by code, not real X-rays.

Each image is a crude frontal chest film: a bright body, two dark lung fields and ribs.
Bacterial pneumonia adds one dense lobar opacity; viral adds faint patchy opacities in both
lungs. Files follow the Kaggle layout and the Kermany naming, so the real pipeline reads them.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pneumo_ray.io import stores

NOTICE = (
    "SYNTHETIC DATA made by pneumo_ray.io.synthetic for demos and tests.\n"
    "These are not chest X-rays and say nothing about any patient.\n"
)


def synthetic_xray(label: str, rng: np.random.Generator, size: int = 256) -> Image.Image:
    """One synthetic grayscale chest image of class ``label`` (normal, bacterial, viral)."""
    image = Image.new("L", (size, size), int(rng.integers(10, 30)))
    draw = ImageDraw.Draw(image)
    s = size / 256
    body = int(rng.integers(150, 190))
    draw.ellipse([30 * s, 20 * s, 226 * s, 250 * s], fill=body)
    lungs = []
    for cx in (88, 168):
        cx += rng.normal(0, 3)
        box = [(cx - 40) * s, 50 * s, (cx + 40) * s, (210 + rng.normal(0, 5)) * s]
        lungs.append(box)
        draw.ellipse(box, fill=int(rng.integers(55, 80)))
    for y in range(60, 210, 22):  # ribs
        draw.arc(
            [40 * s, (y - 30) * s, 216 * s, (y + 30) * s],
            200,
            340,
            fill=body - 40,
            width=max(1, int(4 * s)),
        )
    if label == "bacterial":  # one dense, lobar consolidation
        box = lungs[int(rng.integers(0, 2))]
        x0, y0, x1, y1 = box
        cy = rng.uniform(y0 + (y1 - y0) * 0.45, y1 - (y1 - y0) * 0.2)
        r = (x1 - x0) * rng.uniform(0.3, 0.42)
        cx = (x0 + x1) / 2 + rng.normal(0, 4 * s)
        draw.ellipse([cx - r, cy - r * 0.8, cx + r, cy + r * 0.8], fill=int(rng.integers(160, 200)))
    elif label == "viral":  # faint, patchy, both sides
        for x0, y0, x1, y1 in lungs:
            for _ in range(int(rng.integers(6, 10))):
                cx, cy = (
                    rng.uniform(x0 + 10 * s, x1 - 10 * s),
                    rng.uniform(y0 + 15 * s, y1 - 15 * s),
                )
                r = rng.uniform(4, 9) * s
                draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=int(rng.integers(110, 140)))
    image = image.filter(ImageFilter.GaussianBlur(radius=2.0 * s))
    noise = rng.normal(0, 6, (size, size))
    return Image.fromarray(np.clip(np.asarray(image) + noise, 0, 255).astype(np.uint8))


def _name(label: str, index: int) -> tuple[str, str]:
    """(class folder, Kermany-style filename) of the ``index``-th image of ``label``."""
    patient = index // 2 + 1  # two images per patient, so patient-level splitting matters
    if label == "normal":
        return "NORMAL", f"IM-{patient:04d}-{index % 2 + 1:04d}.jpeg"
    kind = "bacteria" if label == "bacterial" else "virus"
    offset = 0 if label == "bacterial" else 5000
    return "PNEUMONIA", f"person{patient + offset}_{kind}_{index}.jpeg"


def write_synthetic_store(
    root: str, per_class: int = 60, test_per_class: int = 20, size: int = 256, seed: int = 0
) -> str:
    """Write a Kaggle-layout synthetic store under ``root`` (local or s3://); returns root."""
    rng = np.random.default_rng(seed)
    counts = {"train": per_class, "val": 2, "test": test_per_class}
    index = {"normal": 0, "bacterial": 0, "viral": 0}
    for split, count in counts.items():
        for label in index:
            for _ in range(count):
                folder, filename = _name(label, index[label])
                index[label] += 1
                buffer = io.BytesIO()
                synthetic_xray(label, rng, size).save(buffer, format="JPEG", quality=90)
                stores.write_bytes(stores.join(root, split, folder, filename), buffer.getvalue())
    stores.write_bytes(stores.join(root, "SYNTHETIC.txt"), NOTICE.encode())
    return root


if __name__ == "__main__":
    import sys

    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join("out", "demo_store")
    print(f"wrote synthetic store to {write_synthetic_store(target)}")
