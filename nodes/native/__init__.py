"""TAG-MoE as a native ComfyUI MODEL: its loader, the edit conditioning, the reference's schedule,
CFG and noise for ComfyUI's samplers, LoRA loading with a report, and the task-intent patches.
The ComfyUI-facing code lives in ``nodes/comfy_*.py``; these nodes only adapt inputs and outputs."""
