"""Decode, resize and augment chest X-rays.

One decoding path serves training and scoring alike: any JPEG or PNG (grayscale, RGB, RGBA,
palette, 16-bit) becomes an 8-bit grayscale ``(S, S)`` array; the model sees it scaled to
[0, 1]. Images are squashed to a square, as the Kaggle copies of this data set already are.
"""

from __future__ import annotations

import io
import math
import warnings
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

# torch is imported inside the functions that need it: the decode tasks of Ray Data import
# this module, and without torch each of their worker processes is about 0.8 GB smaller.

# A real chest X-ray is at most a few thousand pixels a side; far beyond that it is a
# decompression bomb or not an X-ray at all.
MAX_PIXELS = 60_000_000
MIN_SIDE = 16

PREPROCESSING = {
    "decode": "8-bit grayscale (16-bit scaled by 1/257; alpha composited on black; DICOM: "
    "modality LUT, VOI window or pixel range, MONOCHROME1 inverted)",
    "resize": "bilinear to image_size x image_size (aspect ratio not kept)",
    "scale": "pixel / 255 -> [0, 1]",
    "jpeg_draft": "JPEG decoded at the smallest DCT scale not below image_size",
}


class ImageDecodeError(ValueError):
    """Bytes that are not a usable chest X-ray image; the message says why."""


# 16-bit grey -> 8-bit, value by value (scaled by 1/257 and rounded): one lookup per pixel.
U16_TO_U8 = np.clip(np.round(np.arange(65536, dtype=np.float64) / 257.0), 0, 255).astype(np.uint8)


def _to_grayscale_u8(image: Image.Image) -> np.ndarray:
    """Any Pillow mode -> 8-bit grayscale array."""
    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N"):
        return U16_TO_U8[np.asarray(image)]
    if mode == "I":
        pixels = np.asarray(image, dtype=np.float64)
        if pixels.max(initial=0) > 65535:
            raise ImageDecodeError(f"32-bit integer pixels up to {pixels.max():.0f}")
        return np.clip(np.round(pixels / 257.0), 0, 255).astype(np.uint8)
    if mode == "F":
        pixels = np.asarray(image, dtype=np.float64)
        hi = 1.0 if pixels.max(initial=0) <= 1.0 else 65535.0 if pixels.max() > 255 else 255.0
        return np.clip(np.round(pixels / hi * 255.0), 0, 255).astype(np.uint8)
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(black, rgba)
    return np.asarray(image.convert("L"), dtype=np.uint8)


def is_dicom(data: bytes) -> bool:
    """DICOM Part 10 files carry ``DICM`` after a 128-byte preamble."""
    return len(data) >= 132 and data[128:132] == b"DICM"


# The scope rules from metadata (issue 33): what the models learnt is frontal (PA, AP; a lateral
# decubitus film is frontal too) chest radiographs of children 1-5 years old.
NOT_FRONTAL_VIEWS = frozenset({"LL", "RL", "LLO", "RLO", "LAT", "LATERAL"})
RADIOGRAPH_MODALITIES = frozenset({"CR", "DX", "DR"})
CHEST_BODY_PARTS = frozenset(
    {"CHEST", "THORAX", "LUNG", "LUNGS", "CHEST_LAT", "TORSO", "PORT CHEST"}
)
MAX_AGE_YEARS = 10.0  # the training children were 1-5 years old; a margin of 5 years
COLOUR_SPREAD = 12.0  # mean |R - G| + |G - B| (0-255) above which a JPEG or PNG is a colour picture
AGE_UNITS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def scope_note(data: bytes) -> str:
    """Why the image's metadata says it is not what the models read ("" when nothing does):
    ``kind: details``. DICOM: Modality (CR, DX or DR), Body Part Examined (a chest, or
    absent), View Position (not lateral or oblique), Patient Age (at most MAX_AGE_YEARS),
    Photometric Interpretation (monochrome); JPEG and PNG: colour. Never raises: a file it
    cannot read is the decoder's to refuse."""
    try:
        return _dicom_note(data) if is_dicom(data) else _colour_note(data)
    except Exception:  # noqa: BLE001 - metadata that cannot be read raises no objection
        return ""


def _dicom_note(data: bytes) -> str:
    import pydicom

    dataset = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)

    def tag(name: str) -> str:
        return str(dataset.get(name, "") or "").strip().upper()

    modality, part, view = tag("Modality"), tag("BodyPartExamined"), tag("ViewPosition")
    if modality and modality not in RADIOGRAPH_MODALITIES:
        return f"not a radiograph: DICOM Modality {modality} (the models read CR, DX and DR)"
    if view in NOT_FRONTAL_VIEWS:
        return f"lateral or oblique view: DICOM ViewPosition {view} (the models read PA and AP)"
    if part and part not in CHEST_BODY_PARTS:
        return f"not a chest film: DICOM BodyPartExamined {part}"
    age = _age_years(tag("PatientAge"))
    if age is not None and age > MAX_AGE_YEARS:
        return (
            f"not a child: DICOM PatientAge {tag('PatientAge')} (the models learnt children of "
            f"1-5 years; in scope up to {MAX_AGE_YEARS:g})"
        )
    photometric = tag("PhotometricInterpretation")
    if photometric and not photometric.startswith("MONOCHROME"):
        return f"colour image: DICOM PhotometricInterpretation {photometric} (radiographs are grey)"
    return ""


def _age_years(value: str) -> float | None:
    """A DICOM Age String (``nnnD``, ``nnnW``, ``nnnM``, ``nnnY``) in years; None if absent."""
    if len(value) < 2 or value[-1] not in AGE_UNITS or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * AGE_UNITS[value[-1]]


def _colour_note(data: bytes) -> str:
    """A JPEG or PNG whose colour channels differ (a photograph, a coloured document)."""
    image = Image.open(io.BytesIO(data))
    if image.mode not in ("RGB", "RGBA", "P", "CMYK", "YCbCr"):
        return ""
    if image.format == "JPEG":
        image.draft("RGB", (64, 64))
    rgb = np.asarray(image.convert("RGB").resize((64, 64)), dtype=np.float32)
    spread = float(np.mean(np.abs(rgb[..., 0] - rgb[..., 1]) + np.abs(rgb[..., 1] - rgb[..., 2])))
    if spread > COLOUR_SPREAD:
        return f"colour image: its colour channels differ by {spread:.0f} of 255 on average"
    return ""


def _dicom_to_u8(data: bytes) -> np.ndarray:
    """A DICOM image -> 8-bit grayscale: modality LUT (rescale slope/intercept), the file's
    VOI window when it has one (else the pixel range), MONOCHROME1 inverted; a colour image
    (a secondary capture) as Pillow's luminance (whether the models can read it at all is
    ``scope_note``'s to say). Compressed pixel data decodes through pydicom's plugins: RLE
    natively, JPEG 2000 and 8-bit JPEG through Pillow, JPEG Lossless and JPEG-LS through GDCM
    (python-gdcm)."""
    import pydicom

    dataset = None
    try:
        dataset = pydicom.dcmread(io.BytesIO(data))
        rows, cols = int(dataset.Rows), int(dataset.Columns)
        if rows * cols > MAX_PIXELS:
            raise ImageDecodeError(f"{cols}x{rows} pixels is over the {MAX_PIXELS:,} pixel limit")
        pixels = dataset.pixel_array
    except ImageDecodeError:
        raise
    except Exception as exc:
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        encoding = f" ({syntax.name})" if syntax is not None else ""
        raise ImageDecodeError(
            f"not a readable DICOM image{encoding}: {type(exc).__name__}: {exc}"
        ) from exc
    if int(getattr(dataset, "SamplesPerPixel", 1)) == 3 and pixels.ndim == 3:
        if pixels.dtype != np.uint8:
            raise ImageDecodeError(f"DICOM colour pixels of type {pixels.dtype}; expected 8-bit")
        return np.asarray(Image.fromarray(pixels, "RGB").convert("L"), dtype=np.uint8)
    if pixels.ndim != 2:
        raise ImageDecodeError(f"DICOM pixel data of shape {pixels.shape}; expected one 2-D frame")
    if pixels.dtype.kind in "iu":
        low, high = int(pixels.min()), int(pixels.max())
        if high - low < DICOM_TABLE_LEVELS:
            return _grey_by_table(pixels, dataset, low, high)
    return _grey(pixels, dataset)


# Integer DICOM pixels spanning at most this many stored values (16-bit data always does) go
# through a lookup table: each stored value once through the display steps, then one gather.
DICOM_TABLE_LEVELS = 1 << 16


def _display_values(stored: np.ndarray, dataset) -> np.ndarray:
    """Stored DICOM values -> display values (float64), value by value: the modality LUT
    (rescale slope and intercept, or a LUT), then the file's VOI window or LUT if it has one."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    values = apply_modality_lut(stored, dataset).astype(np.float64)
    if "WindowCenter" in dataset and "WindowWidth" in dataset:
        values = apply_voi_lut(values, dataset).astype(np.float64)
    return values


def _stretch_u8(values: np.ndarray, low: float, high: float, dataset) -> np.ndarray:
    """Display values -> uint8 over [low, high]; MONOCHROME1 (high values dark) inverted."""
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    if getattr(dataset, "PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1":
        scaled = 1.0 - scaled
    return np.round(scaled * 255.0).astype(np.uint8)


def _grey(pixels: np.ndarray, dataset) -> np.ndarray:
    """A DICOM frame -> uint8, every pixel through the display steps and stretched to the
    range of the frame's display values."""
    values = _display_values(pixels, dataset)
    return _stretch_u8(values, float(values.min()), float(values.max()), dataset)


def _grey_by_table(pixels: np.ndarray, dataset, low: int, high: int) -> np.ndarray:
    """``_grey`` to the bit, for integer pixels within [low, high]: every stored value from
    low to high once through the same steps, stretched to the range of the values the frame
    holds, then looked up per pixel. About a third of ``_grey``'s time on a 16-bit frame."""
    levels = _display_values(np.arange(low, high + 1, dtype=pixels.dtype), dataset)
    index = pixels - low if pixels.dtype.kind == "u" else np.subtract(pixels, low, dtype=np.int32)
    steps = np.diff(levels)
    if (steps >= 0).all() or (steps <= 0).all():  # monotonic: the extremes are low's and high's
        held = levels[[0, -1]]
    else:  # a LUT that turns back: the extremes of the values the frame holds
        present = np.zeros(len(levels), dtype=bool)
        present[index] = True
        held = levels[present]
    return _stretch_u8(levels, float(held.min()), float(held.max()), dataset)[index]


def gpu_decodable(data: bytes) -> bool:
    """A JPEG that nvJPEG can decode to what ``decode_image`` gives: baseline grayscale or
    YCbCr, upright (no EXIF rotation), and within the size limits. Reads the header only."""
    if data[:2] != b"\xff\xd8":
        return False
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        upright = image.getexif().get(0x0112, 1) == 1
        return (
            image.format == "JPEG"
            and image.mode in ("L", "RGB")
            and upright
            and min(width, height) >= MIN_SIDE
            and width * height <= MAX_PIXELS
        )
    except Exception:  # decode_image will say what is wrong with it
        return False


def decode_image(data: bytes, image_size: int) -> np.ndarray:
    """Bytes of a JPEG, PNG or DICOM file -> ``(image_size, image_size)`` uint8 grayscale.

    Raises ImageDecodeError for empty, truncated, corrupt or absurdly large images.
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    if is_dicom(data):
        gray = Image.fromarray(_dicom_to_u8(data))
        resized = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(resized, dtype=np.uint8)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise ImageDecodeError(
                    f"{width}x{height} pixels is over the {MAX_PIXELS:,} pixel limit "
                    "(decompression bomb?)"
                )
            if min(width, height) < MIN_SIDE:
                raise ImageDecodeError(f"{width}x{height} pixels is too small for an X-ray")
            if image.format == "JPEG":
                # DCT scaling: decode at 1/2, 1/4 or 1/8 when that still covers the target.
                image.draft("L", (image_size, image_size))
            image = ImageOps.exif_transpose(image)
            image.load()
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(f"decompression bomb: {exc}") from exc
    except Exception as exc:  # Pillow raises many types for bad bytes
        raise ImageDecodeError(f"not a readable image: {type(exc).__name__}: {exc}") from exc
    gray = Image.fromarray(_to_grayscale_u8(image))
    resized = gray.resize((image_size, image_size), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.uint8)


def to_model_input(batch: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 ``(B, H, W)`` -> float32 ``(B, 1, H, W)`` in [0, 1]."""
    import torch

    if isinstance(batch, np.ndarray) and not batch.flags.writeable:
        batch = batch.copy()  # Ray hands out read-only views; torch wants to own writable memory
    tensor = torch.as_tensor(batch)
    return tensor.unsqueeze(1).to(torch.float32).div_(255.0)


def to_pixels(x: torch.Tensor) -> np.ndarray:
    """float ``(B, 1, H, W)`` in [0, 1] -> uint8 ``(B, H, W)`` (``to_model_input``'s inverse)."""
    import torch

    return (x[:, 0] * 255.0).round().clamp(0, 255).to(torch.uint8).numpy()


class AcquisitionShift:
    """What differs between X-ray sites, drawn at random for one ``(1, H, W)`` image in [0, 1]:

    - blur (detector and processing resolution) or sharpening (edge enhancement), p 0.5;
    - gamma (the site's tone curve), p 0.5;
    - Gaussian noise (dose, detector), p 0.3;
    - JPEG recompression at quality 20-80 (PACS exports), p 0.3;
    - down- and up-sampling by 0.35-0.8 (acquired or stored at lower resolution), p 0.3.

    Brightness and contrast are the ColorJitter's. Uses torch's global generator, which the
    training loop seeds per rank and epoch.
    """

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.nn.functional as F
        from torchvision.io import decode_jpeg, encode_jpeg
        from torchvision.transforms.v2 import functional as TF

        def draw(low: float, high: float) -> float:
            return low + (high - low) * float(torch.rand(()))

        if torch.rand(()) < 0.5:
            if torch.rand(()) < 0.5:
                sigma = draw(0.3, 1.5)
                image = TF.gaussian_blur(image, [2 * math.ceil(3 * sigma) + 1] * 2, [sigma])
            else:
                blurred = TF.gaussian_blur(image, [5, 5], [1.0])
                image = image + draw(0.3, 1.5) * (image - blurred)
        image = image.clamp(0.0, 1.0)
        if torch.rand(()) < 0.5:
            image = image.pow(draw(0.7, 1.5))
        if torch.rand(()) < 0.3:
            image = image + torch.randn_like(image) * draw(0.005, 0.03)
        image = image.clamp(0.0, 1.0)
        if torch.rand(()) < 0.3:
            encoded = encode_jpeg(image.mul(255).round().to(torch.uint8).cpu(), int(draw(20, 80)))
            image = decode_jpeg(encoded).to(image.device, torch.float32).div(255)
        if torch.rand(()) < 0.3:
            height, width = image.shape[-2:]
            factor = draw(0.35, 0.8)
            small = (max(8, round(height * factor)), max(8, round(width * factor)))
            image = F.interpolate(image[None], size=small, mode="bilinear", antialias=True)
            image = F.interpolate(image, size=(height, width), mode="bilinear")[0]
        return image.clamp(0.0, 1.0)


def acquisition_shifted(batch: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Ray Data batch function: the batch's uint8 ``image`` column as another site's
    acquisition might give it (exposure: brightness and contrast 0.6-1.4, then
    ``AcquisitionShift``), each row seeded by ``seed`` and its URI (a film gets the same pixels
    whichever batch it is in). The scope check's reference takes these in beside the clean
    images, so that a darker, softer or noisier site's films stay in scope."""
    import zlib

    import torch

    x = to_model_input(batch["image"])  # (B, 1, S, S)
    shift = AcquisitionShift()
    state = torch.random.get_rng_state()
    try:
        rows = []
        for uri, image in zip(batch["image_uri"], x, strict=True):
            torch.manual_seed((seed * 1_000_003 + zlib.crc32(str(uri).encode())) % (2**63))
            brightness, contrast = 0.6 + 0.8 * torch.rand(2)
            image = (image * brightness).clamp(0.0, 1.0)
            mean = image.mean()
            rows.append(shift(((image - mean) * contrast + mean).clamp(0.0, 1.0)))
    finally:
        torch.random.set_rng_state(state)
    x = torch.stack(rows) if rows else x
    return {**batch, "image": to_pixels(x)}


FRAME_SIDE = (0.5, 2.0)  # a predicted frame's side (of the film's) is held to this range


def frame_relative(
    scale: torch.Tensor, frames: torch.Tensor, size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """``BatchAugment``'s zoom and centre for views drawn relative to each film's frame.

    ``scale`` (n,): the zooms drawn for a typically framed film (its frame is the film);
    ``frames`` (n, 4): the films' frames as (left, top, right, bottom), the film [0, 1]^2.
    A frame of side f (the geometric mean of its width and height) has the zoom divided by
    f, so the view covers the same share of the frame as it would of a typical film, and
    the shift drawn in pixels is scaled by f with it; ``frame_centre`` (n, 2) is the frame's
    centre in pixels from the film's, where the view is centred before the drawn shift."""
    import torch

    frames = torch.as_tensor(frames, dtype=torch.float32)
    width, height = (frames[:, 2] - frames[:, 0]), (frames[:, 3] - frames[:, 1])
    side = (width.clamp(min=1e-3) * height.clamp(min=1e-3)).sqrt().clamp(*FRAME_SIDE)
    centre = (frames[:, :2] + frames[:, 2:]) / 2 - 0.5  # (n, 2): x, y; the film's centre is 0
    pixels = torch.tensor([size[1], size[0]], dtype=torch.float32)
    return {"scale": scale / side, "frame_centre": centre.clamp(-0.5, 0.5) * pixels}


def inverse_affine(
    angle: torch.Tensor,
    translate: torch.Tensor,
    scale: torch.Tensor,
    shear: torch.Tensor,
) -> torch.Tensor:
    """torchvision's inverse affine matrices (``_get_inverse_affine_matrix`` about the image
    centre), for a batch: output pixel -> input pixel, in pixels from the centre, x right and
    y down. ``angle`` and ``shear`` (x shear) in degrees (B,), ``translate`` (B, 2) pixels,
    ``scale`` (B,). Returns (B, 2, 3)."""
    import torch

    rot, sx = torch.deg2rad(angle), torch.deg2rad(shear)
    # rotation-scale-shear (y shear 0), then inverted; its determinant is 1 before scaling
    a = torch.cos(rot)
    b = -torch.cos(rot) * torch.tan(sx) - torch.sin(rot)
    c = torch.sin(rot)
    d = -torch.sin(rot) * torch.tan(sx) + torch.cos(rot)
    m = torch.stack([torch.stack([d, -b], -1), torch.stack([-c, a], -1)], 1) / scale[:, None, None]
    offset = -(m @ translate[:, :, None])  # (B, 2, 1): the inverse of the translation
    return torch.cat([m, offset], dim=2)


class BatchAugment:
    """The design's augmentation (rotation +-10 degrees, shifts up to 10% of the side in whole
    pixels, zoom 0.9-1.1, x shear +-8 degrees: torchvision's ``RandomAffine(10, (0.1, 0.1),
    (0.9, 1.1), 8)``; horizontal flip p 0.5; brightness, then contrast, factors 0.8-1.2:
    exposure differs between machines and sites, and the Kermany test split's differs from its
    train split's) applied to a whole batch ``(B, 1, H, W)`` in [0, 1] on its own device: one
    affine grid and one ``grid_sample`` for the batch (bilinear, zeros outside), the flip
    folded into the grid, the jitter as batched arithmetic. The training workers run it on the
    GPU there, and on CPU tensors here.

    ``framing`` (issue 31: the networks had learnt how tightly a film is framed and what is
    written on it) widens the framing and breaks its link with the label, on images of every
    class alike:

    - zoom 0.75-1.4 (log-uniform: from a black margin, a looser film, to a crop of the lungs
      well inside the ribs) and aspect 0.85-1.18 (sites' and exports' squashed films);
    - p 0.3, a border or collimation band on each side with p 0.5, 1-12% of the side wide,
      black or white;
    - p 0.6, one to three stamps (``io.edits.STAMP_TEXTS``: laterality and projection
      markers, exposure, times, dates, ids) 3-9% of the side tall, in a corner or at an edge's
      middle, white or (p 0.2) black, plain or bold.

    With ``frames`` (each film's typical frame, ``models.reframing``: where the training
    store's typical framing of this anatomy lies in the film), the framing is drawn relative to
    the film's frame instead of its edges: the zoom and shift that would have been drawn for
    a typically framed film are applied to the frame. A film framed tighter than usual then
    gets the same range of views of its anatomy as one framed loosely, so how tightly a class
    was framed in the training store no longer shows in what the network sees (the store
    frames pneumonia films 2-4% tighter per side than normal ones).

    Each image draws its own parameters from torch's global generator (on the CPU, so a seed
    gives the same draws on any device), which the training loop seeds per rank and epoch.
    ``acquisition_shift`` then applies ``AcquisitionShift`` to each image.
    """

    degrees, translate, scale, shear = 10.0, 0.1, (0.9, 1.1), 8.0
    flip, brightness, contrast = 0.5, 0.2, 0.2
    framing_scale, aspect = (0.75, 1.4), (0.85, 1.18)
    band_p, band_side_p, band_width = 0.3, 0.5, (0.01, 0.12)
    stamp_p, max_stamps, stamp_height, stamp_black = 0.6, 3, (0.03, 0.09), 0.2

    def __init__(self, acquisition_shift: bool = False, framing: bool = False) -> None:
        self.shift = AcquisitionShift() if acquisition_shift else None
        self.framing = framing

    def draw(
        self, n: int, size: tuple[int, int], frames: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Per-image parameters for ``n`` images of ``size`` (H, W), on the CPU; ``frames``
        (n, 4): each film's frame (left, top, right, bottom, the film being [0, 1]^2), which
        the framing is drawn relative to (``framing`` only)."""
        import torch

        def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return low + (high - low) * torch.rand(n, *shape)

        def log_uniform(low: float, high: float, *shape: int) -> torch.Tensor:
            return torch.exp(uniform(math.log(low), math.log(high), *shape))

        height, width = size
        limit = torch.tensor([self.translate * width, self.translate * height])
        params = {
            "angle": uniform(-self.degrees, self.degrees),
            "translate": torch.round((2 * torch.rand(n, 2) - 1) * limit),  # whole pixels
            "scale": uniform(*self.scale),
            "shear": uniform(-self.shear, self.shear),
            "flip": torch.rand(n) < self.flip,
            "brightness": uniform(1 - self.brightness, 1 + self.brightness),
            "contrast": uniform(1 - self.contrast, 1 + self.contrast),
        }
        if not self.framing:
            return params
        from pneumo_ray.io.edits import STAMP_TEXTS

        banded = torch.rand(n, 1) < self.band_p
        stamped = torch.rand(n) < self.stamp_p
        count = torch.randint(1, self.max_stamps + 1, (n,))
        params.update(
            scale=log_uniform(*self.framing_scale),
            aspect=log_uniform(*self.aspect),
            band_width=torch.where(
                banded & (torch.rand(n, 4) < self.band_side_p), uniform(*self.band_width, 4), 0.0
            ),  # (n, 4): top, bottom, left, right; 0 for none
            band_value=(torch.rand(n) < 0.5).float(),
            stamp_count=torch.where(stamped, count, 0),
            stamp_text=torch.randint(0, len(STAMP_TEXTS), (n, self.max_stamps)),
            stamp_height=uniform(*self.stamp_height, self.max_stamps),
            stamp_where=torch.randint(0, 8, (n, self.max_stamps)),  # CORNERS + EDGES
            stamp_margin=uniform(0.01, 0.06, self.max_stamps),
            stamp_jitter=uniform(-1.0, 1.0, self.max_stamps, 2),
            stamp_value=(torch.rand(n, self.max_stamps) >= self.stamp_black).float(),
            stamp_bold=torch.rand(n, self.max_stamps) < 0.5,
        )
        if frames is not None:
            params.update(frame_relative(params["scale"], frames, size))
        return params

    @staticmethod
    def apply(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """``x`` (B, 1, H, W) transformed with the given per-image parameters."""
        import torch
        import torch.nn.functional as F

        n, _, height, width = x.shape
        matrix = inverse_affine(
            params["angle"], params["translate"].float(), params["scale"], params["shear"]
        )
        if "aspect" in params:  # the output stretched by sqrt(aspect) in x, squeezed in y
            root = params["aspect"].sqrt()
            matrix = matrix * torch.stack([1 / root, root], dim=1)[:, :, None]
        if "frame_centre" in params:  # the view centred on the film's frame, not its centre
            matrix[:, :, 2] = matrix[:, :, 2] + params["frame_centre"]
        # pixels from the centre -> affine_grid's [-1, 1] (align_corners=False)
        half = torch.tensor([width / 2, height / 2])
        theta = matrix.clone()
        theta[:, :, :2] = matrix[:, :, :2] * half[None, None, :] / half[None, :, None]
        theta[:, :, 2] = matrix[:, :, 2] / half[None, :]
        # a horizontal flip of the output: its x coordinate mirrored before the lookup
        mirror = torch.where(params["flip"], -1.0, 1.0)
        theta[:, :, 0] = theta[:, :, 0] * mirror[:, None]
        grid = F.affine_grid(theta.to(x.device, x.dtype), [n, 1, height, width], False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        brightness = params["brightness"].to(x.device, x.dtype)[:, None, None, None]
        contrast = params["contrast"].to(x.device, x.dtype)[:, None, None, None]
        x = (x * brightness).clamp_(0.0, 1.0)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = ((x - mean) * contrast + mean).clamp_(0.0, 1.0)
        if "band_width" in params:
            x = paint_bands(x, params["band_width"], params["band_value"])
            x = paste_stamps(x, params)
        return x

    def __call__(self, x: torch.Tensor, frames: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, 1, H, W) augmented; ``frames`` (B, 4) or None: see the class."""
        import torch

        frames = frames.cpu() if frames is not None and self.framing else None
        x = self.apply(x, self.draw(len(x), tuple(x.shape[-2:]), frames))
        if self.shift is not None:
            x = torch.stack([self.shift(image) for image in x])
        return x


def paint_bands(x: torch.Tensor, widths: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Bands of ``widths`` (B, 4: top, bottom, left, right; shares of the side, 0 for none) in
    grey ``values`` (B,) on a batch ``(B, 1, H, W)``, as one batched mask."""
    import torch

    n, _, height, width = x.shape
    rows = torch.arange(height, device=x.device, dtype=x.dtype)[None, :, None] + 0.5  # (1, H, 1)
    cols = torch.arange(width, device=x.device, dtype=x.dtype)[None, None, :] + 0.5  # (1, 1, W)
    w = widths.to(x.device, x.dtype)[:, :, None, None]  # (B, 4, 1, 1)
    inside = (
        (rows < w[:, 0] * height)
        | (rows > height - w[:, 1] * height)
        | (cols < w[:, 2] * width)
        | (cols > width - w[:, 3] * width)
    )  # (B, H, W)
    value = values.to(x.device, x.dtype)[:, None, None, None]
    return torch.where(inside[:, None], value, x)


def paste_stamps(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
    """Burn each image's stamps (``BatchAugment.draw``'s stamp_* parameters) into ``x``."""
    import torch

    from pneumo_ray.io.edits import CORNERS, EDGES, STAMP_TEXTS, sized_stamp, stamp_position

    places = CORNERS + EDGES
    side = x.shape[-1]
    x = x.clone()
    for i in range(len(x)):
        for k in range(int(params["stamp_count"][i])):
            text = STAMP_TEXTS[int(params["stamp_text"][i, k])]
            mask = sized_stamp(
                text,
                max(4, round(float(params["stamp_height"][i, k]) * side)),
                bool(params["stamp_bold"][i, k]),
            )
            if mask.shape[1] > side - 2:
                continue  # a long text does not fit a tiny image
            margin = max(1, round(float(params["stamp_margin"][i, k]) * side))
            where = places[int(params["stamp_where"][i, k])]
            if where in ("left", "right") and mask.shape[1] > 0.2 * side:
                where = "top" if where == "left" else "bottom"  # long text runs along an edge
            row, col = stamp_position(
                side, mask.shape, where, margin, tuple(params["stamp_jitter"][i, k].tolist())
            )
            m = torch.from_numpy(mask).to(x.device, x.dtype)
            patch = x[i, 0, row : row + mask.shape[0], col : col + mask.shape[1]]
            value = float(params["stamp_value"][i, k])
            x[i, 0, row : row + mask.shape[0], col : col + mask.shape[1]] = (
                patch * (1 - m) + value * m
            )
    return x


IMAGE_STATS = ("image_mean", "image_contrast", "image_sharpness")
"""Per-image statistics the decode tasks add to each batch (``image_stats``), for drift checks."""


def image_stats(images: np.ndarray | torch.Tensor) -> dict[str, np.ndarray]:
    """Per image of a uint8 batch ``(B, S, S)``, on [0, 1] pixels at the model's input size:
    mean intensity, contrast (pixel standard deviation) and sharpness (standard deviation of
    the 4-neighbour Laplacian: fine detail, which blur removes).

    A numpy batch is computed with numpy (the decode tasks); a torch batch on its own device
    (a model actor that decoded on its GPU), with the same formulas, as float32 numpy."""
    if not isinstance(images, np.ndarray) and hasattr(images, "device"):
        return _image_stats_torch(images)
    x = np.asarray(images, dtype=np.float32) / 255.0  # (B, S, S)
    laplacian = _laplacian(x)
    return {
        "image_mean": x.mean(axis=(1, 2)),
        "image_contrast": x.std(axis=(1, 2)),
        "image_sharpness": laplacian.std(axis=(1, 2)),
    }


def _laplacian(x):
    """The 4-neighbour Laplacian of a (B, S, S) numpy or torch batch: (B, S-2, S-2)."""
    return (
        4 * x[:, 1:-1, 1:-1] - x[:, :-2, 1:-1] - x[:, 2:, 1:-1] - x[:, 1:-1, :-2] - x[:, 1:-1, 2:]
    )


def _image_stats_torch(images: torch.Tensor) -> dict[str, np.ndarray]:
    import torch

    x = images.to(torch.float32) / 255.0  # (B, S, S)
    laplacian = _laplacian(x)
    stats = {
        "image_mean": x.mean(dim=(1, 2)),
        "image_contrast": x.std(dim=(1, 2), correction=0),
        "image_sharpness": laplacian.std(dim=(1, 2), correction=0),
    }
    return {name: value.cpu().numpy() for name, value in stats.items()}


def as_numpy(images) -> np.ndarray:
    """A batch of decoded images, numpy or a torch tensor on any device, as a numpy array
    (torch is not imported for a numpy batch)."""
    return images.cpu().numpy() if hasattr(images, "cpu") else np.asarray(images)
