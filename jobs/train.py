"""Train the four chest X-ray models on a labelled image store and write a model bundle.

    python jobs/train.py --data STORE --output BUNDLE [--image-size N] [--epochs N] [--limit N]
        [--num-workers N|MIN-MAX] [--use-gpu/--no-use-gpu]

The same command as ``pneumo-train`` (pneumo_ray.cli), kept as a file for
``ray job submit --working-dir . -- python jobs/train.py ...`` (the working dir is on the
job's PYTHONPATH there; elsewhere the package is installed).
"""

from pneumo_ray.cli import train_main

if __name__ == "__main__":
    train_main()
