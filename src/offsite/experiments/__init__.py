"""Layer 12, measurements built from the workflows: the shared protocol, report (the OT table), audit
(the data owner's attacks), frontier (privacy against utility) and the demo."""
