"""Errors a user can act on.

Every error raised on purpose by ``tagmoe_core`` derives from :class:`TagMoEError`, so
front-ends (the CLI, the ComfyUI nodes) can show its message as it is instead of a traceback.
"""

from __future__ import annotations

from collections.abc import Sequence


class TagMoEError(Exception):
    """Base class: the message is written for the person running the model."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.__module__ = _library_module(cls.__module__)


def _library_module(module: str) -> str:
    """ComfyUI imports a pack as a package named after its folder's full path, and reports an
    error's type as module + name: keep that the library's name, not a filesystem path."""
    if "tagmoe_core" in module and not module.startswith("tagmoe_core"):
        return "tagmoe_core" + module.split("tagmoe_core", 1)[1]
    return module


TagMoEError.__module__ = _library_module(TagMoEError.__module__)


class DeviceError(TagMoEError):
    """A device specification that cannot be used on this machine."""


class CheckpointError(TagMoEError):
    """A weights file or folder that cannot be loaded."""


class CheckpointNotFoundError(CheckpointError):
    pass


class CorruptCheckpointError(CheckpointError):
    pass


class UnknownLayoutError(CheckpointError):
    pass


class NotATagMoECheckpointError(CheckpointError):
    pass


class UnsupportedQuantizationError(CheckpointError):
    """A quantized file (GGUF) whose tensor types this library does not read."""


class InconsistentExpertsError(CheckpointError):
    """MoE layers whose router and expert weights do not fit together (or one of them is missing)."""


def _listed(keys: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    more = len(keys) - limit
    return shown + (f" ... and {more} more" if more > 0 else "")


class ShapeMismatchError(CheckpointError):
    def __init__(self, key: str, expected: tuple[int, ...], found: tuple[int, ...], source: str):
        self.key, self.expected, self.found, self.source = key, expected, found, source
        super().__init__(
            f"Shape mismatch for '{key}' in {source}: the model expects {list(expected)} "
            f"but the file has {list(found)}. The weights were made for a different model "
            "configuration (check that base model and TAG-MoE weights belong together)."
        )


class MissingKeysError(CheckpointError):
    def __init__(self, keys: Sequence[str], sources: str):
        self.keys = list(keys)
        super().__init__(
            f"{len(self.keys)} weight(s) were found in neither {sources}: {_listed(self.keys)}"
        )


IGNORE_UNEXPECTED_HINT = ("to load without them, pass --ignore-unexpected-keys (command line) or turn on "
                          "ignore_unexpected_keys (TAG-MoE Model Loader node)")


class UnexpectedKeysError(CheckpointError):
    def __init__(self, keys: Sequence[str], source: str, hint: str = IGNORE_UNEXPECTED_HINT):
        self.keys = list(keys)
        super().__init__(
            f"{len(self.keys)} weight(s) in {source} do not belong to the TAG-MoE transformer: "
            f"{_listed(self.keys)}. {hint[:1].upper()}{hint[1:]}."
        )


class InputError(TagMoEError):
    """Bad arguments to a pipeline call (sizes, boxes, prompts)."""


class Cancelled(TagMoEError):
    """Raised by a step callback to stop a sampling run early."""


class DataError(InputError):
    """A training data folder that cannot be trained on (missing or unreadable images, sizes, empty
    instructions, bad tags): found before training starts, one line naming the sample."""
