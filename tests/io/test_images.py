from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pneumo_ray.io.images import (
    BatchAugment,
    ImageDecodeError,
    decode_image,
    scope_note,
    to_model_input,
)

from ..conftest import CHEST_XRAY, FULLRES


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _gradient(size=(80, 60)) -> np.ndarray:
    """Left-to-right ramp 0..255, so orientation and scale are checkable after decoding."""
    w, h = size
    return np.tile(np.linspace(0, 255, w), (h, 1)).astype(np.uint8)


def _variants() -> dict[str, bytes]:
    gray = _gradient()
    rgb = np.stack([gray] * 3, axis=-1)
    rgba = np.dstack([rgb, np.full(gray.shape, 255, np.uint8)])
    palette = Image.fromarray(gray).convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    sixteen = Image.fromarray(gray.astype(np.uint16) * 257)
    return {
        "jpeg_gray": _encode(Image.fromarray(gray), "JPEG"),
        "jpeg_rgb": _encode(Image.fromarray(rgb), "JPEG"),
        "png_gray": _encode(Image.fromarray(gray), "PNG"),
        "png_rgb": _encode(Image.fromarray(rgb), "PNG"),
        "png_rgba": _encode(Image.fromarray(rgba), "PNG"),
        "png_palette": _encode(palette, "PNG"),
        "png_16bit": _encode(sixteen, "PNG"),
    }


@pytest.mark.parametrize("kind", sorted(_variants()))
def test_every_image_kind_decodes_to_the_same_8bit_grayscale(kind):
    out = decode_image(_variants()[kind], 32)
    assert out.shape == (32, 32) and out.dtype == np.uint8
    reference = decode_image(_variants()["png_gray"], 32)
    # Same picture whatever the container: JPEG and palette quantisation allow a few levels.
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 4
    assert out[:, 0].mean() < 20 and out[:, -1].mean() > 235  # dark left, bright right


def test_16bit_is_scaled_by_its_full_range():
    values = np.full((40, 40), 32896, np.uint16)  # 128 * 257
    out = decode_image(_encode(Image.fromarray(values), "PNG"), 32)
    assert np.all(out == 128)


def test_transparent_pixels_composite_on_black():
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., :3] = 255
    rgba[:, 20:, 3] = 255  # left half transparent white, right half opaque white
    out = decode_image(_encode(Image.fromarray(rgba), "PNG"), 40)
    assert out[:, :18].max() == 0 and out[:, 22:].min() == 255


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"this is not an image at all", "not a readable image"),
        (_encode(Image.fromarray(_gradient()), "JPEG")[:200], "not a readable image"),
    ],
)
def test_bad_bytes_raise_a_decode_error_that_says_why(data, why):
    with pytest.raises(ImageDecodeError, match=why):
        decode_image(data, 32)


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG header claiming 20000 x 20000 pixels; the pixels themselves are never read.
    bomb = _encode(Image.new("1", (20000, 20000)), "PNG")
    with pytest.raises(ImageDecodeError, match="pixel limit|decompression bomb"):
        decode_image(bomb, 32)


def test_real_images_decode_and_scale_to_unit_range():
    path = next((CHEST_XRAY / "train" / "NORMAL").glob("*.jpeg"))
    fullres = next((FULLRES / "PNEUMONIA").glob("*.jpeg"))
    for source in (path, fullres):
        image = decode_image(source.read_bytes(), 64)
        x = to_model_input(image[None])
        assert x.shape == (1, 1, 64, 64) and x.dtype == torch.float32
        assert 0.0 <= float(x.min()) < float(x.max()) <= 1.0


def test_augmentation_changes_images_independently_and_keeps_shape():
    torch.manual_seed(0)
    x = to_model_input(np.stack([_gradient((64, 64))] * 4))
    out = BatchAugment()(x)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert not torch.equal(out[0], out[1])  # each image draws its own transform


def _centroid(image: torch.Tensor) -> tuple[float, float]:
    """(row, column) of an image's intensity centroid."""
    rows, cols = torch.meshgrid(
        torch.arange(image.shape[-2]).float(), torch.arange(image.shape[-1]).float(), indexing="ij"
    )
    image = image.reshape(rows.shape)
    return float((image * rows).sum() / image.sum()), float((image * cols).sum() / image.sum())


def test_batched_augmentation_moves_a_point_where_the_per_image_transform_does():
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    x = torch.zeros(5, 1, 64, 64)
    x[:, :, 18:21, 38:41] = 1.0  # a bright point off centre
    params = {
        "angle": torch.tensor([10.0, -7.0, 0.0, 3.0, 0.0]),
        "translate": torch.tensor([[3.0, -2.0], [0.0, 0.0], [5.0, 4.0], [-6.0, 1.0], [0.0, 0.0]]),
        "scale": torch.tensor([1.1, 0.9, 1.0, 1.05, 1.0]),
        "shear": torch.tensor([8.0, 0.0, -5.0, 2.0, 0.0]),
        "flip": torch.tensor([False, True, False, True, False]),
        "brightness": torch.ones(5),
        "contrast": torch.ones(5),
    }
    out = BatchAugment.apply(x, params)
    for i in range(5):
        expected = TF.affine(
            x[i],
            angle=float(params["angle"][i]),
            translate=[int(v) for v in params["translate"][i]],
            scale=float(params["scale"][i]),
            shear=[float(params["shear"][i]), 0.0],
            interpolation=InterpolationMode.BILINEAR,
        )
        if params["flip"][i]:
            expected = TF.horizontal_flip(expected)
        assert _centroid(out[i]) == pytest.approx(_centroid(expected), abs=1e-3)
    assert torch.equal(out[4], x[4])  # the identity leaves the image as it was
    assert _centroid(out[0])[1] > 44  # and the others did move it: 3 px right, zoomed out


def test_batched_jitter_scales_brightness_then_contrast():
    x = torch.full((2, 1, 8, 8), 0.25)
    x[:, :, :, 4:] = 0.75
    identity = {
        "angle": torch.zeros(2), "translate": torch.zeros(2, 2), "scale": torch.ones(2),
        "shear": torch.zeros(2), "flip": torch.zeros(2, dtype=torch.bool),
    }  # fmt: skip
    out = BatchAugment.apply(
        x,
        {**identity, "brightness": torch.tensor([1.2, 1.0]), "contrast": torch.tensor([1.0, 0.8])},
    )
    assert torch.allclose(out[0], x[0] * 1.2)
    assert torch.allclose(out[1], 0.5 + (x[1] - 0.5) * 0.8)


def test_batched_augmentation_draws_are_seeded_per_rank_and_epoch():
    from pneumo_ray.training.loop import rank_seed

    x = to_model_input(np.stack([_gradient((64, 64))] * 8))
    augment = BatchAugment()

    def draw(rank: int, epoch: int) -> torch.Tensor:
        torch.manual_seed(rank_seed(7, rank, epoch))  # what train_epoch does
        return augment(x)

    assert torch.equal(draw(0, 3), draw(0, 3))  # a resumed epoch draws the same
    assert not torch.equal(draw(0, 3), draw(1, 3))  # another rank, others
    assert not torch.equal(draw(0, 3), draw(0, 4))  # another epoch, others
    torch.manual_seed(0)
    params = augment.draw(10_000, (224, 224))
    assert params["angle"].abs().max() <= 10 and params["shear"].abs().max() <= 8
    assert params["translate"].abs().max() <= 22.4
    assert torch.equal(params["translate"], params["translate"].round())
    assert params["scale"].min() >= 0.9 and params["scale"].max() <= 1.1
    assert 0.45 < params["flip"].float().mean() < 0.55


@pytest.mark.parametrize(
    ("bits", "photometric", "slope", "intercept"),
    [
        (8, "MONOCHROME2", 1.0, 0.0),
        (8, "MONOCHROME1", 1.0, 0.0),
        (16, "MONOCHROME2", 2.0, -1024.0),
        (16, "MONOCHROME1", 1.0, 0.0),
    ],
)
def test_dicom_decodes_like_the_picture_it_holds(tmp_path, bits, photometric, slope, intercept):
    from ..dicom import write_dicom

    source = next((CHEST_XRAY / "test" / "PNEUMONIA").glob("*.jpeg"))
    gray = np.asarray(Image.open(source).convert("L"))
    path = tmp_path / "x.dcm"
    write_dicom(path, gray, bits=bits, photometric=photometric, slope=slope, intercept=intercept)
    out = decode_image(path.read_bytes(), 64)
    # The reference is the same picture stretched to its full range, as the DICOM path does.
    stretched = (gray - gray.min()) / max(1, int(gray.max()) - int(gray.min())) * 255
    reference = decode_image(_encode(Image.fromarray(stretched.astype(np.uint8)), "PNG"), 64)
    assert np.abs(out.astype(int) - reference.astype(int)).mean() < 3  # MONOCHROME1 inverted


def test_dicom_window_is_applied(tmp_path):
    from ..dicom import write_dicom

    ramp = _gradient((64, 64))
    path = tmp_path / "w.dcm"
    write_dicom(path, ramp, bits=8, window=(128.0, 64.0))  # values < 96 black, > 160 white
    out = decode_image(path.read_bytes(), 64)
    assert out[:, :20].max() == 0 and out[:, -20:].min() == 255


@pytest.mark.parametrize(
    ("syntax", "uid"),
    [
        ("JPEGLosslessProcess14_1", "1.2.840.10008.1.2.4.70"),  # the usual one for radiographs
        ("JPEGLosslessProcess14", "1.2.840.10008.1.2.4.57"),
        ("JPEGLSLossless", "1.2.840.10008.1.2.4.80"),
        ("JPEG2000Lossless", "1.2.840.10008.1.2.4.90"),
        ("RLELossless", "1.2.840.10008.1.2.5"),
    ],
)
def test_compressed_dicom_decodes_as_its_uncompressed_original(tmp_path, syntax, uid):
    import pydicom

    from ..dicom import transcode, write_dicom

    source = next((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))
    gray = np.asarray(Image.open(source).convert("L"))
    write_dicom(tmp_path / "plain.dcm", gray, bits=16, slope=2.0, intercept=-1024.0)
    transcode(tmp_path / "plain.dcm", tmp_path / "packed.dcm", syntax)
    packed = (tmp_path / "packed.dcm").read_bytes()
    assert pydicom.dcmread(tmp_path / "packed.dcm").file_meta.TransferSyntaxUID == uid
    plain = decode_image((tmp_path / "plain.dcm").read_bytes(), 64)
    np.testing.assert_array_equal(decode_image(packed, 64), plain)  # lossless: the same pixels
    assert plain.std() > 10


def test_colour_dicom_decodes_as_its_luminance(tmp_path):
    from ..dicom import write_rgb_dicom

    source = next((CHEST_XRAY / "test" / "NORMAL").glob("*.jpeg"))
    rgb = np.asarray(Image.open(source).convert("RGB"))
    rgb = np.ascontiguousarray(rgb * np.array([1.0, 0.9, 0.8])).astype(np.uint8)  # tinted
    write_rgb_dicom(tmp_path / "sc.dcm", rgb)
    as_png = decode_image(_encode(Image.fromarray(rgb), "PNG"), 64)
    np.testing.assert_array_equal(decode_image((tmp_path / "sc.dcm").read_bytes(), 64), as_png)


def test_a_dicom_codec_that_is_missing_names_the_transfer_syntax():
    import pydicom.data

    # 12-bit JPEG Extended: neither Pillow nor GDCM decodes it through pydicom
    path = pydicom.data.get_testdata_file("JPGExtended.dcm")
    with open(path, "rb") as f, pytest.raises(ImageDecodeError, match=r"\(JPEG Extended"):
        decode_image(f.read(), 32)


@pytest.mark.parametrize("view", ["LL", "RL", "RLO", "lateral"])
def test_a_lateral_or_oblique_dicom_view_decodes_and_is_out_of_scope(tmp_path, view):
    from ..dicom import write_dicom

    write_dicom(tmp_path / "lat.dcm", _gradient((64, 64)), view=view)
    data = (tmp_path / "lat.dcm").read_bytes()
    assert decode_image(data, 32).std() > 10  # a picture, not an error row
    assert scope_note(data).startswith(
        f"lateral or oblique view: DICOM ViewPosition {view.upper()}"
    )


@pytest.mark.parametrize(
    "tags, kind",
    [
        ({"modality": "CT"}, "not a radiograph: DICOM Modality CT"),
        ({"modality": "MR"}, "not a radiograph"),
        ({"BodyPartExamined": "KNEE"}, "not a chest film: DICOM BodyPartExamined KNEE"),
        ({"PatientAge": "045Y"}, "not a child: DICOM PatientAge 045Y"),
        ({"PatientAge": "011Y"}, "not a child"),
        ({"PatientAge": "036M"}, ""),  # three years: in scope
        ({"PatientAge": "010Y"}, ""),  # the margin's edge
        ({"BodyPartExamined": "CHEST", "modality": "CR", "PatientAge": "004Y"}, ""),
        ({}, ""),  # no tags beyond a DX modality: nothing to object to
    ],
)
def test_dicom_metadata_scope_rules(tmp_path, tags, kind):
    from ..dicom import write_dicom

    write_dicom(tmp_path / "a.dcm", _gradient((64, 64)), **tags)
    note = scope_note((tmp_path / "a.dcm").read_bytes())
    assert note.startswith(kind) if kind else note == ""


def test_a_dicom_without_modality_and_a_colour_capture(tmp_path):
    from ..dicom import write_dicom, write_rgb_dicom

    write_dicom(tmp_path / "a.dcm", _gradient((64, 64)), modality="")
    assert scope_note((tmp_path / "a.dcm").read_bytes()) == ""
    rgb = np.zeros((64, 64, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    write_rgb_dicom(tmp_path / "c.dcm", rgb)
    # a secondary capture's modality (OT) already says it is no radiograph
    assert scope_note((tmp_path / "c.dcm").read_bytes()).startswith(
        "not a radiograph: DICOM Modality OT"
    )


def test_a_colour_photograph_is_out_of_scope_and_a_grey_film_in_rgb_is_not():
    rng = np.random.default_rng(0)
    photo = rng.integers(0, 256, (80, 80, 3), dtype=np.uint8)
    grey = np.repeat(rng.integers(0, 256, (80, 80, 1), dtype=np.uint8), 3, axis=2)
    for pixels, expected in ((photo, "colour image"), (grey, "")):
        buffer = io.BytesIO()
        Image.fromarray(pixels, "RGB").save(buffer, format="JPEG", quality=95)
        note = scope_note(buffer.getvalue())
        assert note.startswith(expected) if expected else note == ""
    assert scope_note(b"not an image at all") == ""  # the decoder's to refuse, not this


@pytest.mark.parametrize("view", ["PA", "AP", "LLD", "", None])
def test_frontal_dicom_views_and_files_without_one_decode(tmp_path, view):
    from ..dicom import write_dicom

    ramp = _gradient((64, 64))
    write_dicom(tmp_path / "a.dcm", ramp, view=view)
    assert decode_image((tmp_path / "a.dcm").read_bytes(), 32).std() > 10


@pytest.mark.parametrize(
    ("dtype", "span", "slope", "intercept", "photometric", "window"),
    [
        (np.uint8, (0, 256), 1.0, 0.0, "MONOCHROME2", None),
        (np.uint16, (0, 4096), 1.0, 0.0, "MONOCHROME2", None),  # 12 bits, as detectors
        (np.uint16, (17, 65536), 2.0, -1024.0, "MONOCHROME1", None),
        (np.uint16, (300, 3900), 1.0, 0.0, "MONOCHROME2", (2000.0, 1500.0)),  # windowed
        (np.int16, (-2000, 2500), 1.5, -1000.0, "MONOCHROME2", None),  # signed
        (np.int16, (-300, 900), -1.0, 0.0, "MONOCHROME1", None),  # a falling modality LUT
    ],
)
def test_the_dicom_lookup_table_gives_the_per_pixel_result_to_the_bit(
    dtype, span, slope, intercept, photometric, window
):
    from pydicom.dataset import Dataset

    from pneumo_ray.io import images

    dataset = Dataset()
    dataset.RescaleSlope, dataset.RescaleIntercept = slope, intercept
    dataset.PhotometricInterpretation = photometric
    dataset.BitsStored = 8 * np.dtype(dtype).itemsize
    dataset.PixelRepresentation = int(np.dtype(dtype).kind == "i")
    if window is not None:
        dataset.WindowCenter, dataset.WindowWidth = window
    pixels = np.random.default_rng(0).integers(*span, size=(97, 83)).astype(dtype)
    low, high = int(pixels.min()), int(pixels.max())
    table = images._grey_by_table(pixels, dataset, low, high)
    np.testing.assert_array_equal(table, images._grey(pixels, dataset))
    assert table.min() == 0 and table.max() == 255


def test_a_dicom_lut_that_turns_back_is_stretched_over_the_values_the_frame_holds(monkeypatch):
    from pydicom.dataset import Dataset

    from pneumo_ray.io import images

    # a display LUT with its largest value at a stored value the frame does not hold (500)
    monkeypatch.setattr(images, "_display_values", lambda v, ds: -((v - 500.0) ** 2))
    pixels = np.array([[100, 200], [800, 900]], dtype=np.uint16)
    dataset = Dataset()
    table = images._grey_by_table(pixels, dataset, 100, 900)
    np.testing.assert_array_equal(table, images._grey(pixels, dataset))
    assert table.max() == 255 and table.min() == 0  # 200 and 800 are brightest, 900 darkest


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_16_bit_grey_becomes_8_bit_by_the_same_rounding_in_every_mode(mode):
    from pneumo_ray.io.images import _to_grayscale_u8

    values = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    image = {
        "I;16": lambda: Image.fromarray(values),
        "I;16B": lambda: Image.frombytes("I;16B", (256, 256), values.astype(">u2").tobytes()),
        "I": lambda: Image.fromarray(values.astype(np.int32)),
    }[mode]()
    assert image.mode == mode
    expected = np.clip(np.round(values / 257.0), 0, 255).astype(np.uint8)
    np.testing.assert_array_equal(_to_grayscale_u8(image), expected)


def test_corrupt_dicom_is_a_decode_error():
    data = b"\0" * 128 + b"DICM" + b"\x02\x00garbage" * 10
    with pytest.raises(ImageDecodeError, match="DICOM"):
        decode_image(data, 32)
