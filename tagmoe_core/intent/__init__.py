"""Task intent: task tags from rules or a VLM, instruction refinement, routing analysis and tag guidance."""
