"""Evaluate a trained model bundle on one split of a labelled image store.

    python jobs/evaluate.py --model BUNDLE --data STORE [--split test] [--output DIR]
        [--bootstrap N]

Scores every image of the split with all four models and writes the same report as training
(metrics.json, predictions.parquet, confusion matrices, ROC curves, reconstructions) to DIR
(default BUNDLE/evaluation/SPLIT), with patient-level bootstrap 95% confidence intervals on
every headline figure. Prints the results table. BUNDLE, STORE and DIR may be s3:// URIs.
The same command as ``pneumo-evaluate`` (pneumo_ray.cli).
"""

from pneumo_ray.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
