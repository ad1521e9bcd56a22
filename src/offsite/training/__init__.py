"""Layer 9, the pieces of fine-tuning: its config, the session (device, seed, emulator, precision,
trainable parameters), the loop, checkpoints, DP-SGD and data parallelism. The workflow that uses
them is :mod:`offsite.workflows.finetune`."""
