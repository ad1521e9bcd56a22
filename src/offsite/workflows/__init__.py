"""Layer 11, the three parties' verbs, each a function that reads top to bottom: emulate (model owner),
finetune (data owner), plug and verify (model owner)."""
