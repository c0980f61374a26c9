"""The reference-exact route: a diffusers Qwen-Image folder plus TAG-MoE weights, run by tagmoe_core's
pipeline (TAGMOE_MODEL, TAGMOE_CONDITIONING)."""
