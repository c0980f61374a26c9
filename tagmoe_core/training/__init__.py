"""Training TAG-MoE with the paper's objective (``L_flow + lambda_lbl * L_lbl + lambda_align * L_align``).

* ``data``: a folder of samples (``samples.jsonl`` beside the images), checked before training;
  the condition latents and the text built by the pipeline's own code, as inference builds them.
* ``losses``: the flow-matching velocity loss at the reference scheduler's sigmas, MegaBlocks'
  load-balancing loss, the predictive alignment loss.
* ``lora``: low-rank adapters on chosen ``nn.Linear`` modules, merged into the release layout on save.
* ``checkpoints``: checkpoints in the release's key layout (every loader reads them) plus what
  resuming needs.
* ``loop``: what trains (whole, MoE layers + tag heads, LoRA), the steps, progress, resume, seed.
* ``synthetic``: a seeded multi-task set of shapes on backgrounds (recolour, add, remove, background,
  grayscale, invert, text-to-image) with a held-out split, written as a data folder.
* ``task_success``: the pixel rule per synthetic task that decides whether an output succeeded.

Nothing used at inference imports this package (``tests/test_layout.py`` checks).
"""
