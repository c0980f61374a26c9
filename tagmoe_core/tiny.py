"""An embedded tiny TAG-MoE: the real classes and file layouts at toy sizes, built in seconds.

``build_tiny_bundle(root)`` writes two folders, deterministically from a seed:

* ``Qwen-Image-tiny/``: a diffusers Qwen-Image folder (``model_index.json``, a dense
  ``QwenImageTransformer2DModel``, a ``Qwen2_5_VLForConditionalGeneration`` text encoder, a
  ``Qwen2Tokenizer`` with Qwen's special tokens trained on the fly, an
  ``AutoencoderKLQwenImage`` and Qwen-Image's ``FlowMatchEulerDiscreteScheduler`` config);
* ``TAG-MoE-tiny/transformer/``: TAG-MoE weights in the release's key layout (MoE experts in
  the last blocks, ``tag_embedding``, ``router_head``), sharded with a safetensors index.

The weights are random, so images are noise; everything else (loading, shapes, routing, the
sampling loop, the nodes) runs for real. The tests use it.

``trained_tiny_bundle()`` is the other embedded model, shipped in the package (``assets/tiny-shapes``,
about 12 MB): the same layout, with a VAE and a TAG-MoE transformer trained by
``scripts/train_tiny.py`` on the synthetic shapes task set (``training.synthetic``), so it really
edits 64x64 pictures of shapes ("Remove the circle", "Turn the whole image black and white"). Its
base folder holds the dense transformer's config but not its weights: the TAG-MoE checkpoint is
complete, so no loader here opens them. ``--tiny`` and the README's demo use it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .model.moe import MoESpec
from .pipeline.schedule import QWEN_IMAGE_SCHEDULER as SCHEDULER_CONFIG

TINY_VERSION = 1
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")

TRANSFORMER_CONFIG = {
    "patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 4, "attention_head_dim": 16,
    "num_attention_heads": 2, "joint_attention_dim": 32, "guidance_embeds": False, "axes_dims_rope": [4, 6, 6],
}
TINY_MOE = MoESpec(num_experts=4, top_k=1, num_moe_blocks=2)
_CORPUS = (
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial relationships "
    "of the objects and background: system user assistant. You are a helpful assistant. Picture 1: "
    "Change the cloak to red color. Make the person wear sunglasses. Replace the sky with a sunset. "
    "Turn the photo into a watercolor painting. Remove the umbrella, the girl's hands hung naturally at her "
    "sides. Change the weather to sunny. Add a small dog next to the bench. Make it night time with warm "
    "street lights. A cat holding a sign that says hello world. Keep the face and the background unchanged. "
    "Rotate the view to show the left side of the car. Put the logo on the mug in the style of the poster."
)


@dataclass(frozen=True)
class TinyBundle:
    root: Path

    @property
    def base(self) -> Path:
        return self.root / "Qwen-Image-tiny"

    @property
    def tagmoe(self) -> Path:
        return self.root / "TAG-MoE-tiny"


TRAINED_ROOT = Path(__file__).resolve().parent / "assets" / "tiny-shapes"
TRAINED_SIZE = 64  # the trained tiny model's pictures: 64x64 (what --tiny edits and draws by default)
TRAINED_CFG = 1.0  # trained without the empty prompt (no text dropout): true CFG would extrapolate from noise
TRAINED_FILES = (
    "Qwen-Image-tiny/model_index.json", "Qwen-Image-tiny/scheduler/scheduler_config.json",
    "Qwen-Image-tiny/text_encoder/config.json", "Qwen-Image-tiny/text_encoder/generation_config.json",
    "Qwen-Image-tiny/text_encoder/model.safetensors", "Qwen-Image-tiny/tokenizer/chat_template.jinja",
    "Qwen-Image-tiny/tokenizer/tokenizer.json", "Qwen-Image-tiny/tokenizer/tokenizer_config.json",
    "Qwen-Image-tiny/transformer/config.json", "Qwen-Image-tiny/vae/config.json",
    "Qwen-Image-tiny/vae/diffusion_pytorch_model.safetensors", "TAG-MoE-tiny/transformer/config.json",
    "TAG-MoE-tiny/transformer/diffusion_pytorch_model.safetensors", "demo.png",
)


def trained_tiny_bundle(root: str | os.PathLike | None = None) -> TinyBundle:
    """The trained tiny model shipped with the package (or a packed one at ``root``). Raises one line
    naming the first missing file (an install that left the package's data out)."""
    from .errors import CheckpointNotFoundError

    bundle = TinyBundle(Path(root) if root is not None else TRAINED_ROOT)
    missing = next((name for name in TRAINED_FILES if not (bundle.root / name).is_file()), None)
    if missing is not None:
        raise CheckpointNotFoundError(f"the trained tiny model is incomplete: '{bundle.root / missing}' is missing "
                                      "(reinstall the pack; a wheel must include tagmoe_core/assets)")
    return bundle


def trained_tiny_demo_picture(root: str | os.PathLike | None = None):
    """The picture ``tagmoe edit --tiny`` edits when no --image is given: one of the task set's."""
    from PIL import Image

    with Image.open(trained_tiny_bundle(root).root / "demo.png") as image:
        return image.convert("RGB")


def default_tiny_root() -> Path:
    cache = os.environ.get("TAGMOE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tagmoe")
    return Path(cache) / f"tiny-v{TINY_VERSION}"


def ensure_tiny_bundle(root: str | os.PathLike | None = None, seed: int = 0) -> TinyBundle:
    """The tiny bundle at ``root`` (default: the user cache), built on first use."""
    bundle = TinyBundle(Path(root) if root is not None else default_tiny_root())
    if not (bundle.root / "COMPLETE").is_file():
        build_tiny_bundle(bundle.root, seed=seed)
    return bundle


def build_tiny_bundle(root: str | os.PathLike, seed: int = 0, transformer_config: dict | None = None,
                      corpus: Sequence[str] = ()) -> TinyBundle:
    """Write the tiny bundle to ``root`` (replacing it). Same seed, same bytes.

    ``transformer_config`` overrides entries of :data:`TRANSFORMER_CONFIG` (a wider transformer to
    train, say); ``joint_attention_dim`` is also the text encoder's hidden size. ``corpus``: more
    text for the tokenizer to learn, so that a model trained on those words sees each as one token
    (the default corpus spells "yellow" or "circle" letter by letter)."""
    config = {**TRANSFORMER_CONFIG, **(transformer_config or {})}
    root = Path(root)
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=root.parent))
    try:
        bundle = TinyBundle(staging)
        with torch.random.fork_rng(devices=[]):
            _write_base(bundle.base, seed, config, tuple(corpus))
            _write_tagmoe(bundle, seed)
        (staging / "COMPLETE").write_text(json.dumps({"version": TINY_VERSION, "seed": seed}))
        if root.exists():
            shutil.rmtree(root)
        staging.rename(root)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return TinyBundle(root)


def train_tokenizer(vocab_size: int = 640, corpus: Sequence[str] = ()):
    """A byte-level BPE with Qwen2's pre-tokenizer and special tokens, trained on a small corpus
    (and ``corpus``, with room for its words: the default corpus alone gives the same tokenizer)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from .intent.chat_template import QWEN_VL_CHAT_TEMPLATE

    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    if corpus:
        vocab_size += 1024  # merges stop when every word is whole: room, not a size
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    # The prompt template itself is in the corpus, so that, as with Qwen's tokenizer, every word
    # of its system prefix is one token (34 tokens in all, the reference's drop index).
    from .pipeline.text_encoding import PROMPT_TEMPLATE

    bpe.train_from_iterator([_CORPUS, PROMPT_TEMPLATE.format(_CORPUS)] * 4 + list(corpus), trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, eos_token="<|im_end|>",
                               pad_token="<|endoftext|>", unk_token=None, model_max_length=32768)
    tokenizer.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS[1:])})  # ids kept from training
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    return tokenizer


def _write_base(base: Path, seed: int, config: dict, corpus: tuple[str, ...]) -> None:
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = train_tokenizer(corpus=corpus)
    tokenizer.save_pretrained(base / "tokenizer")
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    hidden = config["joint_attention_dim"]

    torch.manual_seed(seed)
    te_config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer), "hidden_size": hidden, "intermediate_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]},
            "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"], "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": hidden,
            "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
            "fullatt_block_indexes": [1],
        },
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_config).eval()
    text_encoder.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    text_encoder.generation_config.pad_token_id = ids["<|endoftext|>"]
    text_encoder.save_pretrained(base / "text_encoder")

    torch.manual_seed(seed + 1)
    vae = AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])
    vae.save_pretrained(base / "vae")

    torch.manual_seed(seed + 2)
    transformer = QwenImageTransformer2DModel(**config)
    _scale_output_layers(transformer)
    transformer.save_pretrained(base / "transformer")

    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(base / "scheduler")
    (base / "model_index.json").write_text(json.dumps({
        "_class_name": "QwenImagePipeline",
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "text_encoder": ["transformers", "Qwen2_5_VLForConditionalGeneration"],
        "tokenizer": ["transformers", "Qwen2Tokenizer"],
        "transformer": ["diffusers", "QwenImageTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderKLQwenImage"],
    }, indent=2))


def _scale_output_layers(transformer) -> None:
    # Keep a random tiny model's velocity O(1) so that a few Euler steps stay finite.
    with torch.no_grad():
        transformer.proj_out.weight.mul_(0.1)


def _write_tagmoe(bundle: TinyBundle, seed: int) -> None:
    """TAG-MoE weights as the release ships them: the whole transformer, MoE layers included,
    fine-tuned from the base (here: the base weights slightly perturbed)."""
    from diffusers import QwenImageTransformer2DModel
    from huggingface_hub import save_torch_state_dict

    from .model.transformer import convert_to_tagmoe

    base = QwenImageTransformer2DModel.from_pretrained(bundle.base / "transformer")
    generator = torch.Generator().manual_seed(seed + 3)
    dense = {}
    for index in TINY_MOE.block_indices(len(base.transformer_blocks)):
        dense[index] = base.transformer_blocks[index].img_mlp
    model = convert_to_tagmoe(base, TINY_MOE, backend="torch")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.01)
        for index, ffn in dense.items():
            _upcycle(model.transformer_blocks[index].img_mlp, ffn, generator)
        for module in (model.tag_embedding, model.router_head):
            for param in module.parameters():
                param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
    target = bundle.tagmoe / "transformer"
    target.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    save_torch_state_dict(state, target, filename_pattern="diffusion_pytorch_model{suffix}.safetensors",
                          max_shard_size=size // 2 + 1)
    config = json.loads((bundle.base / "transformer" / "config.json").read_text())
    (target / "config.json").write_text(json.dumps(config, indent=2))


def _upcycle(moe, dense, generator: torch.Generator) -> None:
    """Experts start as the dense FFN plus noise (how MoE fine-tunes usually begin); routers are
    scaled up so that tokens really choose between experts."""
    w_in = dense.net[0].proj.weight  # [F, H]
    w_out = dense.net[2].weight  # [H, F]
    rows = moe.ffn_hidden_size
    for e in range(moe.num_experts):
        sl = slice(e * rows, (e + 1) * rows)
        moe.experts.mlp.w1[sl].copy_(w_in + torch.randn(w_in.shape, generator=generator) * 0.05)
        moe.experts.mlp.w2[sl].copy_(w_out.T + torch.randn(w_out.T.shape, generator=generator) * 0.05)
    moe.router.layer.weight.mul_(4.0)
