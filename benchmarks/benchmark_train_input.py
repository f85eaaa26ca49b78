"""What the training input costs a Ray Train worker (issue 22, benchmark b).

A TorchTrainer worker reads its shard of decoded images as the training job's workers do
(``training_batches``: Ray Data's ``iter_torch_batches``, whole-batch collation, a local
shuffle), augments each batch with the design's augmentation and takes a training step, over
several epochs; the first epoch is warm-up, the others are the steady state. The decoded
images are replicated (``--repeat``) so that an epoch is long next to its start (a new
streaming split per epoch). Side by side in one run:

- null network, batched augmentation (``BatchAugment``): the input pipeline's own rate;
- null network, the per-image torchvision augmentation it replaced (``RandomAffine``,
  ``RandomHorizontalFlip``, ``ColorJitter`` applied image by image);
- the real binary CNN with batched augmentation: the share the input takes of a real step.

    python benchmarks/benchmark_train_input.py [--images 618] [--repeat 8] [--epochs 3]
        [--batch-size 32]

Target on the 2-core development machine: at least 1,500 images/s per worker at 224 px with
the null network and the batched augmentation.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import ray  # noqa: E402
import torch  # noqa: E402
from ray.train import ScalingConfig  # noqa: E402
from ray.train.torch import TorchTrainer  # noqa: E402
from torch import nn  # noqa: E402

from pneumo_ray.io import data  # noqa: E402
from pneumo_ray.runtime import init_ray  # noqa: E402

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "chest_xray"
TARGET_NULL_IMAGES_PER_S = 1500


class NullNetwork(nn.Module):
    """A binary network's interface at almost no compute: one weight times the image mean."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(1, 2, 3)) * self.weight


def per_image_augmentation():
    """The per-image torchvision augmentation that ``BatchAugment`` replaced."""
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1), shear=8),
            v2.RandomHorizontalFlip(p=0.5),
            v2.ColorJitter(brightness=0.2, contrast=0.2),
        ]
    )
    return lambda x: torch.stack([transform(image) for image in x])


def worker_loop(config: dict) -> None:
    from pneumo_ray.io.images import BatchAugment
    from pneumo_ray.models.networks import build_network
    from pneumo_ray.training.loop import train_step, training_batches

    torch.set_num_threads(config["threads"])
    shard = ray.train.get_dataset_shard("train")
    device = ray.train.torch.get_device()
    figures = {}
    cases = [
        ("read_only", None, None, config["epochs"]),
        ("null_batched", NullNetwork, BatchAugment(), config["epochs"]),
        ("null_per_image", NullNetwork, per_image_augmentation(), config["epochs"]),
        ("real_batched", lambda: build_network("binary", config["size"]), BatchAugment(), 2),
    ]
    for name, network, augment, epochs in cases:
        model = network().to(device).train() if network else None
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4) if network else None
        seen, seconds = 0, 0.0
        for epoch in range(epochs):
            torch.manual_seed(epoch)
            started, images = time.perf_counter(), 0
            batches = training_batches(shard, config["batch"], device, epoch)
            for step, (x, y, _) in enumerate(batches):
                if name.startswith("real") and step == config["real_steps"]:
                    break
                if model is not None:
                    train_step("binary", model, optimizer, x, y, None, augment)
                images += len(y)
            if epoch > 0:  # the first epoch warms up (iterator start, allocations)
                seen, seconds = seen + images, seconds + time.perf_counter() - started
        figures[name] = seen / seconds
    if ray.train.get_context().get_world_rank() == 0:  # one worker, on this machine
        Path(config["figures"]).write_text(json.dumps(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--images", type=int, default=618, help="test-split images decoded")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=8, help="copies of each decoded image")
    parser.add_argument("--epochs", type=int, default=3, help="null-network epochs (1 warm-up)")
    parser.add_argument("--real-steps", type=int, default=6, help="real-network steps per epoch")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    init_ray()
    images = [i for i in data.list_store(args.data) if i.split == "test"][: args.images]
    decoded = data.decode_split(images, args.image_size, seed=0)
    dataset = decoded.dataset
    if args.repeat > 1:
        dataset = dataset.union(*[dataset] * (args.repeat - 1)).materialize()
    rows = dataset.count()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = TorchTrainer(
            worker_loop,
            train_loop_config={
                "epochs": args.epochs,
                "batch": args.batch_size,
                "size": args.image_size,
                "threads": args.threads,
                "real_steps": args.real_steps,
                "figures": f"{tmp}/figures.json",
            },
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": args.threads}),
            datasets={"train": dataset},
        )
        trainer.fit()
        figures = json.loads(Path(tmp, "figures.json").read_text())
    null, old, real = figures["null_batched"], figures["null_per_image"], figures["real_batched"]
    read = figures["read_only"]
    print(
        f"one Ray Train worker ({args.threads} CPU threads), {rows} rows per epoch "
        f"({decoded.count} decoded {args.image_size}x{args.image_size} images x {args.repeat}), "
        f"batches of {args.batch_size}, steady state (first epoch left out)"
    )
    print(f"reading alone (iter_torch_batches, collation, [0, 1] floats): {read:.0f} images/s")
    print(
        f"null network, batched augmentation: {null:.0f} images/s "
        f"(target >= {TARGET_NULL_IMAGES_PER_S})"
    )
    print(f"null network, per-image augmentation (before): {old:.0f} images/s")
    print(f"batched / per-image: {null / old:.2f}")
    print(f"real binary CNN, batched augmentation: {real:.1f} images/s")
    print(f"share of a real step spent on the input: {real / null:.3f}")


if __name__ == "__main__":
    main()
