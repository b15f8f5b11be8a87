"""AMT benchmark: episodes, models, adversarial meta-tuning and evaluation over HDF5 domains."""
