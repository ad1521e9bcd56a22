"""Layer 8, what the data owner sends back: the adapter and LoRA artifacts (:mod:`.artifact`), their
strict checks (:mod:`.checks`), LoRA settings (:mod:`.lora`) and plugging one into a loaded full model
(:mod:`.plugging`)."""
