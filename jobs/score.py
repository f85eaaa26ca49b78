"""Score image stores with a trained bundle and write Parquet, incrementally.

    python jobs/score.py --model BUNDLE --input URI [--input URI ...] --output OUT_URI
        [--batch-size N] [--num-workers N|MIN-MAX] [--use-gpu/--no-use-gpu]
        [--commit-every N] [--only-new | --rescore]

Inputs are folders, s3:// prefixes (walked recursively) or manifests (.txt/.csv/.parquet) of
image URIs. Rows are committed in parts of --commit-every images, so a killed job keeps its
committed parts. Rerunning with the same output scores only what this model has not scored
(and images whose last read failed transiently). One job at a time per output: a second is
refused. The same command as ``pneumo-score`` (pneumo_ray.cli), kept as a file for
``ray job submit --working-dir . -- python jobs/score.py ...``.
"""

from pneumo_ray.cli import score_main

if __name__ == "__main__":
    score_main()
