"""Train chest X-ray pneumonia models with Ray Train; score image stores with Ray Data."""
