"""The four models and what runs them: the CNNs (cnn), the autoencoder and its anomaly scores
(autoencoder, anomaly), the KNN (knn), calibration, the bundle that holds them (bundle) and the
one prediction path (outputs, predict).

Nothing is imported here: the scoring driver reads cards and plans actors through
pneumo_ray.models.bundle and pneumo_ray.models.predict without loading torch."""
