"""Layer 1, the runtime every other layer stands on: errors, typed settings, progress, plots, device,
precision policy and the learning-rate schedule. Imports nothing of offsite."""
