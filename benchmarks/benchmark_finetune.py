"""What fine-tuning EfficientNet-Lite0 costs per training step on this machine's CPUs: input
size against frozen early blocks.

    python benchmarks/benchmark_finetune.py [--sizes 160 192 224] [--freeze -1 5] [--batch 32]

For each input size and ``--freeze-blocks`` value: the binary network from its packaged
ImageNet weights, AdamW over the trainable parameters, two timed steps on random images (one
untimed first), and two timed forward passes in eval mode; images/s of each, in this process
with 2 torch threads (as one Ray Train worker of a 2-core node has).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, too

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pneumo_ray.models.cnn import build_cnn  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[160, 192, 224])
    parser.add_argument("--freeze", type=int, nargs="+", default=[-1, 5])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    for size in args.sizes:
        for freeze in args.freeze:
            model = build_cnn(1, size, "efficientnet_lite0", "none", "imagenet", freeze)
            model = model.to(memory_format=torch.channels_last)
            trainable = [p for p in model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(trainable, 1e-4)
            x = torch.rand(args.batch, 1, size, size).contiguous(memory_format=torch.channels_last)
            y = torch.randint(0, 2, (args.batch,)).float()
            model.train()
            for step in range(3):
                if step == 1:
                    started = time.perf_counter()
                loss = F.binary_cross_entropy_with_logits(model(x), y)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            train = 2 * args.batch / (time.perf_counter() - started)
            model.eval()
            with torch.inference_mode():
                model(x)
                started = time.perf_counter()
                model(x)
                model(x)
                forward = 2 * args.batch / (time.perf_counter() - started)
            print(
                f"{size} px, --freeze-blocks {freeze:2d}: train {train:.1f} images/s, "
                f"forward {forward:.1f} images/s",
                flush=True,
            )


if __name__ == "__main__":
    main()
