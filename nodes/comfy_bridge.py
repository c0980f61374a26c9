"""The one place where the node pack talks to ComfyUI.

Everything ComfyUI-specific (model folders, progress bars and previews, cancellation, VRAM,
messages to the browser) goes through here. Without ComfyUI (tests, scripts) the same calls
work on plain defaults: model folders come from ``configure()`` or ``TAGMOE_MODELS_DIR``,
progress is recorded instead of sent, and cancellation is requested with ``interrupt()``.
"""

from __future__ import annotations

import functools
import logging
import os
import types
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..tagmoe_core.errors import CheckpointNotFoundError

log = logging.getLogger("tagmoe")

try:  # ComfyUI's modules are top-level imports inside a running ComfyUI
    import comfy.model_management as _mm
    import comfy.utils as _comfy_utils
    import folder_paths as _folder_paths

    HAVE_COMFY = True
except ImportError:  # pragma: no cover - exercised by the tests' plain Python environment
    _mm = _comfy_utils = _folder_paths = None
    HAVE_COMFY = False

TAGMOE_FOLDER = "tagmoe"  # models/tagmoe: TAG-MoE weights (files or folders)
WEIGHT_EXTENSIONS = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_IGNORED_DIRS = {".git", ".cache", "__pycache__"}
# The trained tiny model the package ships (tagmoe_core/assets/tiny-shapes), offered by the TAG-MoE Model
# Loader after the user's models so a workflow runs with nothing downloaded. One name for the base folder
# and for the weights (a listed weights entry ends in an extension or a separator, so none has it; a
# diffusers folder of that name would be hidden behind it).
EMBEDDED_MODEL = "tiny-shapes (embedded)"


# -- model folders ------------------------------------------------------------------------------------
_fallback_roots: dict[str, list[Path]] = {}


def configure(models_dir: str | os.PathLike) -> None:
    """Without ComfyUI: use ``models_dir/{diffusers,tagmoe,diffusion_models,loras}`` as model folders."""
    root = Path(models_dir)
    for kind in ("diffusers", TAGMOE_FOLDER, "diffusion_models", "loras"):
        _fallback_roots[kind] = [root / kind]


def register_model_folder() -> None:
    """Add ``models/tagmoe`` to ComfyUI's model folders (kept beside any extra_model_paths entries)."""
    if not HAVE_COMFY:
        return
    path = os.path.join(_folder_paths.models_dir, TAGMOE_FOLDER)
    known = _folder_paths.folder_names_and_paths.get(TAGMOE_FOLDER)
    if known is None or path not in known[0]:
        _folder_paths.add_model_folder_path(TAGMOE_FOLDER, path, is_default=True)


def guard_gguf_loader(module: types.ModuleType) -> bool:
    """Make ``module.gguf_sd_loader`` refuse a TAG-MoE ``.gguf`` in one line. Some ComfyUI builds read
    ``.gguf`` diffusion models themselves (the hiddenswitch fork's ``comfy.gguf``, from ComfyUI-GGUF's
    loader, lists them in Load Diffusion Model and only warns on an unknown ``general.architecture``): they
    would build a dense Qwen-Image from a TAG-MoE file, without its experts, and sample with it. Where the
    file's header says TAG-MoE (its label, or a ``qwen_image`` label over MoE routers), the wrapped loader
    raises instead, naming the node that loads it; every other file, and one whose header cannot be read,
    goes to the original loader unchanged. Returns whether the loader is guarded."""
    from ..tagmoe_core.model.gguf_reader import tagmoe_architecture

    original = getattr(module, "gguf_sd_loader", None)
    if not callable(original):
        return False
    if getattr(original, "tagmoe_guard", False):
        return True

    @functools.wraps(original)
    def gguf_sd_loader(path, *args, **kwargs):
        arch = tagmoe_architecture(path)
        if arch is not None:
            raise ValueError(f"'{Path(path).name}' is a TAG-MoE .gguf ('{arch}'): load it with TAG-MoE Load "
                             "Diffusion Model; this loader would drop its MoE experts")
        return original(path, *args, **kwargs)

    setattr(gguf_sd_loader, "tagmoe_guard", True)
    module.gguf_sd_loader = gguf_sd_loader
    return True


def guard_builtin_gguf_loader() -> bool:
    """:func:`guard_gguf_loader` on ComfyUI's own GGUF reader where the running ComfyUI has one
    (``comfy.gguf``, read at each load by ``comfy.utils.load_torch_file``); Comfy-Org's ComfyUI has none
    and does not list ``.gguf`` files in its loaders, so nothing changes there."""
    if not HAVE_COMFY:
        return False
    try:
        import comfy.gguf as builtin
    except ImportError:
        return False
    return guard_gguf_loader(builtin)


def model_roots(kind: str) -> list[Path]:
    if HAVE_COMFY:
        try:
            return [Path(p) for p in _folder_paths.get_folder_paths(kind)]
        except KeyError:
            return []
    if not _fallback_roots and os.environ.get("TAGMOE_MODELS_DIR"):
        configure(os.environ["TAGMOE_MODELS_DIR"])
    return list(_fallback_roots.get(kind, []))


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if d not in _IGNORED_DIRS)
        yield Path(dirpath), sorted(filenames)


def list_diffusers_models() -> list[str]:
    """Folders holding a ``model_index.json`` under the ``diffusers`` model folders."""
    found: list[str] = []
    for root in model_roots("diffusers"):
        if root.is_dir():
            found += [str(d.relative_to(root)) for d, files in _walk(root) if "model_index.json" in files]
    return sorted(dict.fromkeys(found))


def list_tagmoe_weights() -> list[str]:
    """Weight files, and folders holding weights or a shard index, under ``models/tagmoe``
    and ``models/diffusion_models`` (shards of an indexed folder are not listed one by one)."""
    found: list[str] = []
    for kind in (TAGMOE_FOLDER, "diffusion_models"):
        for root in model_roots(kind):
            if not root.is_dir():
                continue
            for d, files in _walk(root):
                indexed = any(f.endswith(".index.json") for f in files)
                weights = [f for f in files if f.endswith(WEIGHT_EXTENSIONS)]
                if d != root and (indexed or weights):
                    # a hub repo layout (TAG-MoE/transformer/...) is listed as the repo folder
                    folder = d.parent if d.name == "transformer" and d.parent != root else d
                    found.append(str(folder.relative_to(root)) + os.sep)
                if not indexed:
                    found += [str((d / f).relative_to(root)) for f in weights]
    return sorted(dict.fromkeys(found))


def list_files(kind: str) -> list[str]:
    """Files of a model folder kind (``loras``, ...), as ComfyUI lists them."""
    if HAVE_COMFY:
        return list(_folder_paths.get_filename_list(kind))
    found = [str((d / f).relative_to(root)) for root in model_roots(kind) if root.is_dir() for d, files in _walk(root)
             for f in files if f.endswith(WEIGHT_EXTENSIONS)]
    return sorted(found)


def file_path(kind: str, name: str) -> Path:
    """The full path of a file listed by :func:`list_files`, or FileNotFoundError."""
    for root in model_roots(kind):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(f"'{name}' was not found in models/{kind}")


def weights_missing(name: str) -> "str | bool":
    """VALIDATE_INPUTS' answer for a TAG-MoE weights choice: True, or what to do."""
    try:
        resolve_model(TAGMOE_FOLDER, name)
    except FileNotFoundError as exc:
        if name == EMBEDDED_MODEL:  # its files left out of the install
            return str(exc)
        return ("the TAG-MoE weights were not found: put a TAG-MoE .safetensors file (or the release's folder) in "
                f"models/diffusion_models or models/tagmoe and pick it (got '{name}')")
    return True


def embedded_model(kind: str) -> Path:
    """The shipped trained tiny model's base folder (``kind`` 'diffusers') or TAG-MoE weights ('tagmoe');
    a one-line CheckpointNotFoundError when the install left the package's data out."""
    from ..tagmoe_core.tiny import trained_tiny_bundle

    bundle = trained_tiny_bundle()
    return bundle.base if kind == "diffusers" else bundle.tagmoe


def resolve_model(kind: str, name: str) -> Path:
    """The full path of a listed model (``kind`` 'diffusers' or 'tagmoe'; :data:`EMBEDDED_MODEL` is the
    shipped tiny model), or FileNotFoundError."""
    if name == EMBEDDED_MODEL:
        try:
            return embedded_model(kind)
        except CheckpointNotFoundError as exc:
            raise FileNotFoundError(str(exc)) from exc
    kinds = ("diffusers",) if kind == "diffusers" else (TAGMOE_FOLDER, "diffusion_models")
    relative = name.rstrip("/" + os.sep)
    for k in kinds:
        for root in model_roots(k):
            candidate = root / relative
            if candidate.exists():
                return candidate
    where = ", ".join(str(r) for k in kinds for r in model_roots(k)) or "no model folders are configured"
    raise FileNotFoundError(f"'{name}' was not found in {where}")


# -- memory --------------------------------------------------------------------------------------------
def free_vram_for_external_model() -> None:
    """Ask ComfyUI to unload its own models before a multi-GB model it does not manage loads."""
    if HAVE_COMFY:
        _mm.unload_all_models()
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


def empty_cache() -> None:
    if HAVE_COMFY:
        _mm.soft_empty_cache()
    elif torch.cuda.is_available():
        torch.cuda.empty_cache()


# -- cancellation ---------------------------------------------------------------------------------------
class Interrupted(Exception):
    """Raised by :func:`check_interrupt` outside ComfyUI (inside, ComfyUI's own exception is)."""


_interrupt_requested = False


def interrupt(value: bool = True) -> None:
    """Outside ComfyUI: request that the running node stops at its next check."""
    global _interrupt_requested
    if HAVE_COMFY:
        _mm.interrupt_current_processing(value)
    _interrupt_requested = value


def check_interrupt() -> None:
    """Raise if the user cancelled (ComfyUI's InterruptProcessingException inside ComfyUI)."""
    global _interrupt_requested
    if HAVE_COMFY:
        _mm.throw_exception_if_processing_interrupted()
    if _interrupt_requested:
        _interrupt_requested = False
        raise Interrupted("cancelled")


def cancellation_types() -> tuple[type[BaseException], ...]:
    return (Interrupted, _mm.InterruptProcessingException) if HAVE_COMFY else (Interrupted,)


# -- progress and previews ---------------------------------------------------------------------------------
@dataclass
class Progress:
    """A progress bar for one node run; records updates (tests read ``updates``)."""

    total: int
    node_id: str | None = None
    updates: list[tuple[int, int, bool]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._bar = _comfy_utils.ProgressBar(self.total, node_id=self.node_id) if HAVE_COMFY else None
        self._previewer = _make_previewer()

    def update(self, value: int, preview_latents: torch.Tensor | None = None) -> None:
        """``preview_latents``: normalised (model-space) latents [B, 16, 1, h, w] to preview."""
        preview = None
        if preview_latents is not None and self._previewer is not None:
            preview = self._previewer.decode_latent_to_preview_image("JPEG", preview_latents.float().cpu())
        self.updates.append((value, self.total, preview is not None))
        if self._bar is not None:
            self._bar.update_absolute(value, self.total, preview)  # also a cancellation point in ComfyUI


def _make_previewer():
    """ComfyUI's chosen previewer for Qwen-Image latents (Wan 2.1 format); Latent2RGB when it
    has none (its default is no previews, but a 16-to-3 projection costs next to nothing)."""
    if not HAVE_COMFY:
        return _Latent2RGB()
    try:
        import latent_preview
        from comfy import latent_formats

        fmt = latent_formats.Wan21()
        previewer = latent_preview.get_previewer(_mm.get_torch_device(), fmt)
        return previewer or latent_preview.Latent2RGBPreviewer(fmt.latent_rgb_factors, fmt.latent_rgb_factors_bias)
    except Exception as exc:  # noqa: BLE001 - previews are a nicety; never fail a run over them
        log.debug("no previews: %s", exc)
        return None


class _Latent2RGB:
    """The same projection outside ComfyUI (so previews are testable): Wan 2.1 RGB factors."""

    FACTORS = [[-0.1299, -0.1692, 0.2932], [0.0671, 0.0406, 0.0442], [0.3568, 0.2548, 0.1747],
               [0.0372, 0.2344, 0.1420], [0.0313, 0.0189, -0.0328], [0.0296, -0.0956, -0.0665],
               [-0.3477, -0.4059, -0.2925], [0.0166, 0.1902, 0.1975], [-0.0412, 0.0267, -0.1364],
               [-0.1293, 0.0740, 0.1636], [0.0680, 0.3019, 0.1128], [0.0032, 0.0581, 0.0639],
               [-0.1251, 0.0927, 0.1699], [0.0060, -0.0633, 0.0005], [0.3477, 0.2275, 0.2950],
               [0.1984, 0.0913, 0.1861]]
    BIAS = [-0.1835, -0.0868, -0.3360]

    def decode_latent_to_preview_image(self, fmt: str, x0: torch.Tensor):
        from PIL import Image

        rgb = torch.nn.functional.linear(x0[0, :, 0].movedim(0, -1), torch.tensor(self.FACTORS).T,
                                         torch.tensor(self.BIAS))
        pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).to(torch.uint8).numpy()
        return (fmt, Image.fromarray(pixels), 512)


# -- messages to the browser ---------------------------------------------------------------------------------
def send_text(node_id: str | None, text: str) -> None:
    """Show ``text`` as the node's progress text in the browser (no-op outside ComfyUI)."""
    if not HAVE_COMFY or node_id is None:
        return
    try:
        from server import PromptServer

        PromptServer.instance.send_progress_text(text, node_id)
    except Exception as exc:  # noqa: BLE001 - the text is informative only
        log.debug("send_progress_text failed: %s", exc)


def execution_device() -> torch.device:
    """ComfyUI's compute device (its --cpu and GPU choice), else the first GPU or the CPU."""
    if HAVE_COMFY:
        return _mm.get_torch_device()
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def intermediate_device() -> torch.device:
    return _mm.intermediate_device() if HAVE_COMFY else torch.device("cpu")

