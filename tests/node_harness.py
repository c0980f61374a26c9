"""Load the node pack the way ComfyUI does and run nodes through their entry points."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def load_pack(folder: Path = REPO):
    """Import ``folder/__init__.py`` as ComfyUI's ``load_custom_node`` does: as a package named
    after its full path (dots replaced), so only relative imports can work."""
    name = str(folder).replace(".", "_x_")
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def validate(node_cls, inputs: dict) -> None:
    """The checks ComfyUI's validate_prompt makes on widget values (required inputs, combo
    membership, numeric bounds), skipping those the node validates itself."""
    spec = node_cls.INPUT_TYPES()
    custom = set()
    if hasattr(node_cls, "VALIDATE_INPUTS"):
        import inspect

        custom = set(inspect.signature(node_cls.VALIDATE_INPUTS).parameters)
        result = node_cls.VALIDATE_INPUTS(**{k: inputs[k] for k in custom if k in inputs})
        if result is not True:
            raise ValueError(f"custom validation failed: {result}")
    for section in ("required", "optional"):
        for name, entry in spec.get(section, {}).items():
            if name not in inputs:
                if section == "required" and not (len(entry) > 1 and "default" in entry[1]):
                    raise ValueError(f"required input '{name}' missing")
                continue
            kind, options = entry[0], (entry[1] if len(entry) > 1 else {})
            value = inputs[name]
            if name in custom:
                continue
            if isinstance(kind, list):
                assert value in kind, f"{name}: {value!r} not in {kind}"
            elif kind in ("INT", "FLOAT"):
                assert options.get("min", -math.inf) <= value <= options.get("max", math.inf), f"{name} out of range"
            elif kind == "BOOLEAN":
                assert isinstance(value, bool)
            elif kind == "STRING":
                assert isinstance(value, str)


def run_node(node_cls, **inputs):
    """Validate, fill defaults, call FUNCTION under inference mode (as ComfyUI executes), and
    return (result tuple, ui dict)."""
    validate(node_cls, inputs)
    spec = node_cls.INPUT_TYPES()
    for name, entry in spec.get("required", {}).items():
        if name not in inputs and len(entry) > 1 and "default" in entry[1]:
            inputs[name] = entry[1]["default"]
    if "unique_id" in spec.get("hidden", {}):
        inputs.setdefault("unique_id", "7")
    with torch.inference_mode():
        out = getattr(node_cls(), node_cls.FUNCTION)(**inputs)
    if isinstance(out, dict):
        result, ui = out["result"], out.get("ui", {})
        for value in ui.values():
            assert isinstance(value, list), "ComfyUI requires every ui value to be a list"
    else:
        result, ui = out, {}
    assert isinstance(result, tuple) and len(result) == len(node_cls.RETURN_TYPES)
    return result, ui


# The pack's own TagMoEError (the copy of tagmoe_core its relative imports load), for pytest.raises.
PACK_ERROR = load_pack().tagmoe_core.errors.TagMoEError
