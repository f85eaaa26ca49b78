"""Adapt a trained bundle to a site: re-choose its operating point on the site's labelled
images, without retraining.

    python jobs/adapt.py --model BUNDLE --data SITE_STORE [--split test] --output ADAPTED

Refits both CNNs' temperatures and the binary and anomaly thresholds on the split's images
with the rules the bundle was trained with, adds the images to the KNN's reference images
(--knn keep: not), and makes them the drift reference; the networks stay as they are. The
adapted bundle goes to ADAPTED (not BUNDLE), its card recording what changed and from what.
The same command as ``pneumo-adapt`` (pneumo_ray.cli).
"""

from pneumo_ray.cli import adapt_main

if __name__ == "__main__":
    adapt_main()
