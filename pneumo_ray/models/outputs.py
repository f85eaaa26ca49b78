"""The raw outputs of the networks for a batch: what the bundle (pneumo_ray.models.bundle) and
the model actors (pneumo_ray.models.predict) both compute, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


# Images per forward pass on a CPU: the activations of a larger batch fall out of the caches.
# On this machine's two cores, EfficientNet-Lite0 at 224 px ran 63 images/s in batches of 16
# against 26 and 35 in batches of 128 (two runs); the seed CNN 98 and 77 against 70 and 74.
CPU_CHUNK = 16


def network_outputs(
    models: dict[str, torch.nn.Module], x: torch.Tensor, tta: str = "none", inpaint: bool = True
) -> dict[str, np.ndarray]:
    """``_network_outputs`` of ``x``, in chunks of exactly CPU_CHUNK images on a CPU.

    The last chunk is filled up with copies of its last image, whose outputs are dropped: a
    CPU kernel's arithmetic depends on the batch's size (an image alone, or in a chunk of 5,
    differs from the same image in a chunk of 16 in the last bits), never on the other images.
    So an image's outputs do not depend on how Ray Data cut the stream into batches, and a
    rerun of the same job writes the same bytes (the bundle's model_version is their hash).
    """
    n = len(x)
    if x.device.type != "cpu" or n == 0:
        return _network_outputs(models, x, tta, inpaint)
    fill = -n % CPU_CHUNK
    if fill:
        import torch

        layout = (
            torch.channels_last
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
            else torch.contiguous_format
        )
        x = torch.cat([x, x[-1:].expand(fill, *x.shape[1:])]).contiguous(memory_format=layout)
    parts = [_network_outputs(models, chunk, tta, inpaint) for chunk in x.split(CPU_CHUNK)]
    return {key: np.concatenate([part[key] for part in parts])[:n] for key in parts[0]}


def _network_outputs(
    models: dict[str, torch.nn.Module], x: torch.Tensor, tta: str = "none", inpaint: bool = True
) -> dict[str, np.ndarray]:
    """The raw outputs of whichever networks are given, for a batch ``x`` (B, 1, S, S).

    ``binary_logit`` and ``p_pneumonia`` (binary; uncalibrated), ``multiclass_logits``,
    ``probs`` (uncalibrated softmax) and ``embedding`` (three-class; with a site head,
    ``multiclass_site``, the logits are the site head's and the softmax and embedding the
    trained head's, which the KNN and the scope check were built from), ``ae_mse``, ``ae_code``
    and, with ``inpaint``, ``ae_inpaint`` (autoencoder: pixel error, pooled latent code,
    inpainting error), and ``patch_features`` (B, P * D) or, with its memory bank set,
    ``patch_distances`` (B, P) (PatchCore), as float32 numpy arrays. ``tta="flip"`` averages
    the CNNs' logits and embeddings over the image and its mirror image.
    """
    import torch

    from pneumo_ray.models.anomaly import autoencoder_outputs, inpainting_error

    views = [x, torch.flip(x, dims=(3,))] if tta == "flip" else [x]
    out: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        if "binary" in models:
            logit = torch.stack([models["binary"](v) for v in views]).mean(dim=0)
            out["binary_logit"], out["p_pneumonia"] = logit, torch.sigmoid(logit)
        if "multiclass" in models:
            model = models["multiclass"]  # eval mode: dropout off
            features = [model.features(model.normalize(v)) for v in views]
            embeddings = [model.embed(f) for f in features]
            logits = torch.stack([model.head(e) for e in embeddings]).mean(dim=0)
            site = models.get("multiclass_site")
            out["multiclass_logits"] = (
                torch.stack([site(f) for f in features]).mean(dim=0) if site is not None else logits
            )
            out["embedding"] = torch.stack(embeddings).mean(dim=0)
            out["probs"] = torch.softmax(logits, dim=1)
        if "autoencoder" in models:
            out["ae_mse"], out["ae_code"] = autoencoder_outputs(models["autoencoder"], x)
            if inpaint:
                out["ae_inpaint"] = inpainting_error(models["autoencoder"], x)
        if "scope" in models:
            out["scope_features"] = models["scope"](x)
        if "patchcore" in models:
            patches = models["patchcore"](x)
            key = "patch_features" if models["patchcore"].memory is None else "patch_distances"
            out[key] = patches.flatten(1)
        return {key: value.float().cpu().numpy() for key, value in out.items()}
