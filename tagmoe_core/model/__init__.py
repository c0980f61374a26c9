"""What TAG-MoE is and how its weights load: the MoE layer, the transformer, rotary positions,
checkpoint files and the one-copy loader."""
