"""Task intent: task tags, VLM instruction refinement, routing maps."""
