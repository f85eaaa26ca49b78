"""The label-preserving edits of the counterfactual check and the framing augmentation
(pneumo_ray.io.edits, io.images.BatchAugment with framing)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pneumo_ray.io import edits
from pneumo_ray.io.images import BatchAugment, paint_bands, paste_stamps


def films(n: int = 4, side: int = 64) -> np.ndarray:
    """A film-like batch: a bright body on a dark background, with texture."""
    rng = np.random.default_rng(0)
    images = np.full((n, side, side), 20, dtype=np.uint8)
    inner = side // 6
    images[:, inner:-inner, inner:-inner] = rng.integers(
        80, 220, (n, side - 2 * inner, side - 2 * inner)
    )
    return images


@pytest.mark.parametrize("edit", edits.CHECK_EDITS, ids=lambda e: e.name)
def test_every_check_edit_keeps_size_and_dtype_and_is_the_same_given_its_seed(edit):
    images = films()
    first, again = edit.apply(images, 3), edit.apply(images, 3)
    assert first.shape == images.shape and first.dtype == np.uint8
    assert np.array_equal(first, again)
    assert not np.array_equal(first, images)  # every edit changes the pixels
    assert np.array_equal(images, films())  # and leaves its input alone


def test_a_marker_lands_in_its_corner_and_nowhere_else():
    images = films(2, 96)
    marked = edits.stamp(images, "R", "top_right", seed=1)
    changed = np.argwhere((marked != images).any(axis=0))
    assert len(changed)
    assert changed[:, 0].max() < 96 * 0.2 and changed[:, 1].min() > 96 * 0.7
    assert marked.max() == 255  # burned in white
    # another seed moves it a little, not out of the corner
    moved = edits.stamp(images, "R", "top_right", seed=2)
    assert not np.array_equal(moved, marked)
    assert np.argwhere((moved != images).any(axis=0))[:, 1].min() > 96 * 0.7


def test_crop_frames_tighter_and_pad_looser():
    images = films(1, 60)
    assert np.array_equal(edits.crop(images, 1.0), images)
    tight = edits.crop(images, 0.5)
    assert (tight[0, 0] > 20).any()  # the dark background is cropped away at the top edge
    loose = edits.pad(images, 0.8)
    assert (loose[0, :6] == 0).all() and (loose[0, :, :6] == 0).all()
    assert loose[0, 30, 30] > 0


def test_border_band_and_exposure_edits():
    images = films(1, 50)
    white = edits.border(images, 0.1, 255)
    assert (white[0, :5] == 255).all() and (white[0, :, -5:] == 255).all()
    assert np.array_equal(white[0, 5:-5, 5:-5], images[0, 5:-5, 5:-5])
    assert edits.brightness(images, 1.15).mean() > images.mean()
    assert edits.gamma(images, 1.25).mean() < images.mean()
    assert edits.contrast(images, 0.85).std() < images.std()
    assert np.array_equal(edits.hflip(edits.hflip(images)), images)


# --- the framing augmentation ------------------------------------------------------------------


def test_framing_augmentation_is_seeded_and_keeps_shape_and_range():
    x = torch.from_numpy(films(6, 64)).float()[:, None] / 255
    augment = BatchAugment(framing=True)
    torch.manual_seed(5)
    first = augment(x)
    torch.manual_seed(5)
    again = augment(x)
    assert first.shape == x.shape and first.dtype == x.dtype
    assert torch.equal(first, again)
    assert float(first.min()) >= 0.0 and float(first.max()) <= 1.0


def test_framing_augmentation_covers_both_classes_in_equal_measure():
    """A labelled batch: stamps, bands and framing are drawn without the label, so each class
    gets them at the same rates (a class that got more stamps would teach the shortcut)."""
    torch.manual_seed(0)
    n = 4000
    labels = torch.arange(n) % 2  # normal, pneumonia alternating
    params = BatchAugment(framing=True).draw(n, (64, 64))
    stamped = params["stamp_count"] > 0
    banded = (params["band_width"] > 0).any(dim=1)
    tight = params["scale"] > 1.1
    loose = params["scale"] < 0.9
    for drawn, rate in ((stamped, 0.6), (banded, 0.3 * (1 - 0.5**4)), (tight, None), (loose, None)):
        shares = [float(drawn[labels == k].float().mean()) for k in (0, 1)]
        assert abs(shares[0] - shares[1]) < 0.04, shares
        if rate is not None:
            assert abs(np.mean(shares) - rate) < 0.03
    # the framing range reaches well beyond the design's zoom of 0.9-1.1 on both sides
    assert float(params["scale"].min()) < 0.8 and float(params["scale"].max()) > 1.3


def test_without_framing_the_design_augmentation_is_unchanged():
    params = BatchAugment().draw(100, (32, 32))
    assert "stamp_count" not in params and "band_width" not in params
    assert float(params["scale"].min()) >= 0.9 and float(params["scale"].max()) <= 1.1


def test_paint_bands_paints_the_sides_asked_for():
    x = torch.full((2, 1, 20, 20), 0.5)
    widths = torch.tensor([[0.25, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.1]])
    out = paint_bands(x, widths, torch.tensor([1.0, 0.0]))
    assert (out[0, 0, :5] == 1.0).all() and (out[0, 0, 5:] == 0.5).all()
    assert (out[1, 0, :, -2:] == 0.0).all() and (out[1, 0, :, :-2] == 0.5).all()


def test_paste_stamps_burns_text_into_the_border_only():
    torch.manual_seed(1)
    x = torch.full((8, 1, 128, 128), 0.5)
    params = BatchAugment(framing=True).draw(8, (128, 128))
    params["stamp_count"] = torch.full((8,), 2)
    params["stamp_value"] = torch.ones(8, 3)
    params["stamp_height"] = torch.full((8, 3), 0.05)
    out = paste_stamps(x, params)
    changed = (out != x)[:, 0]
    assert changed.any(dim=(1, 2)).all()  # every image got its stamps
    centre = changed[:, 40:88, 40:88]
    assert not centre.any()  # markers sit at the corners and edges, not on the lungs


def test_acquisition_shifted_copies_are_seeded_by_their_rows():
    from pneumo_ray.io.images import acquisition_shifted

    batch = {"image_uri": np.array(["/a.jpeg", "/b.jpeg"], dtype=object), "image": films(2, 48)}
    first, again = acquisition_shifted(batch, 1)["image"], acquisition_shifted(batch, 1)["image"]
    other = acquisition_shifted(batch, 2)["image"]
    assert first.shape == batch["image"].shape and first.dtype == np.uint8
    assert np.array_equal(first, again) and not np.array_equal(first, other)
    assert not np.array_equal(first, batch["image"])
    state = torch.random.get_rng_state()
    acquisition_shifted(batch, 3)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's generator untouched


def test_framing_drawn_relative_to_the_frame_gives_a_tighter_film_the_same_views():
    """The same draws on a film and on its crop to 80% (the crop's frame reaching past it as
    the film's frame maps into it) give the same view of the anatomy: how tightly the store
    framed a film no longer shows in what the network sees. Drawn relative to the films'
    edges, the crop's views are tighter."""
    side = 160
    yy, xx = np.meshgrid(np.linspace(-1, 1, side), np.linspace(-1, 1, side), indexing="ij")
    film = 0.5 + 0.25 * np.sin(5 * xx + 2 * yy) * np.cos(3 * yy - xx)  # smooth anatomy
    lo, hi = round(0.1 * side), round(0.9 * side)
    crop = torch.nn.functional.interpolate(
        torch.tensor(film[lo:hi, lo:hi], dtype=torch.float32)[None, None],
        size=(side, side), mode="bilinear", align_corners=False,
    )[0]  # fmt: skip
    x = torch.stack([torch.tensor(film, dtype=torch.float32)[None], crop])  # (2, 1, S, S)
    frame = torch.tensor([[0.0, 0.0, 1.0, 1.0]])
    reach = 0.1 / 0.8  # the film's edges in the crop's coordinates: -0.125 and 1.125
    frames = torch.cat([frame, torch.tensor([[-reach, -reach, 1 + reach, 1 + reach]])])
    augment = BatchAugment(framing=True)

    def views(frames):
        torch.manual_seed(3)
        params = augment.draw(1, (side, side), frames[:1])
        torch.manual_seed(3)
        other = augment.draw(1, (side, side), frames[1:])
        both = {k: torch.cat([params[k], other[k]]) for k in params}
        both.update(  # the geometry alone: no jitter, bands or stamps; a zoom inside both
            scale=both["scale"] * 1.6 / params["scale"][0],
            brightness=torch.ones(2), contrast=torch.ones(2),
            band_width=torch.zeros(2, 4), stamp_count=torch.zeros(2, dtype=torch.long),
        )  # fmt: skip
        out = BatchAugment.apply(x, both)[:, 0, 30:-30, 30:-30]
        return float((out[0] - out[1]).abs().mean())

    relative = views(frames)
    assert relative < 0.01
    edges = views(torch.cat([frame, frame]))
    assert edges > 5 * relative


def test_frames_move_nothing_without_framing_and_a_typical_frame_changes_no_draw():
    torch.manual_seed(1)
    plain = BatchAugment().draw(8, (32, 32))
    torch.manual_seed(1)
    ignored = BatchAugment().draw(8, (32, 32), None)
    assert all(torch.equal(plain[k], ignored[k]) for k in plain)
    typical = torch.tensor([[0.0, 0.0, 1.0, 1.0]]).repeat(8, 1)
    torch.manual_seed(2)
    edges = BatchAugment(framing=True).draw(8, (32, 32))
    torch.manual_seed(2)
    relative = BatchAugment(framing=True).draw(8, (32, 32), typical)
    assert torch.allclose(edges["scale"], relative["scale"])
    assert torch.equal(relative["frame_centre"], torch.zeros(8, 2))
    x = torch.from_numpy(films(8, 32)).float()[:, None] / 255
    assert torch.allclose(BatchAugment.apply(x, edges), BatchAugment.apply(x, relative), atol=1e-6)
