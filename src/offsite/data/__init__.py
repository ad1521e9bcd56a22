"""Layer 5, data: records and their checks (:mod:`.records`, no torch), the evaluation and fine-tuning
task specs (:mod:`.tasks`, no torch), tokenised fine-tuning examples and batches (:mod:`.examples`,
:mod:`.batching`) and the per-token loss (:mod:`.token_loss`)."""
