"""Find and read weight files in every layout the TAG-MoE reference accepts, lazily.

Layouts: a single ``.safetensors`` / ``.bin`` / ``.pt`` / ``.pth`` / ``.gguf`` file; a folder holding the
weight file directly or in a subfolder (``transformer/``); a sharded
``*.safetensors.index.json`` or ``*.bin.index.json`` (given as a file or found in the folder);
a Hugging Face repo id (downloaded through ``huggingface_hub``, or from its cache with
``local_files_only``). Pickle files load with ``weights_only=True`` only and may wrap the
state dict under ``model``, ``state_dict`` or ``transformer``.

Nothing is read until asked: keys, shapes and dtypes come from the file headers, and tensors
come out of ``safetensors``' memory map one at a time (``torch.load(mmap=True)`` for pickles),
so a reader costs no memory by itself. A ``.gguf`` (``tagmoe convert --quant``) is checked to be
TAG-MoE when opened (``gguf_reader``); its tensors come out as views of its map, quantized ones
dequantized to float32 one at a time.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, UnknownLayoutError
from .gguf_dequant import TYPES as GGML_TYPES

if TYPE_CHECKING:
    from .gguf_reader import GGUFFile

DEFAULT_WEIGHT_NAME = "diffusion_pytorch_model.safetensors"
DEFAULT_INDEX_NAMES = ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
WRAPPER_KEYS = ("model", "state_dict", "transformer")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass
class WeightFiles:
    """The files that together hold one state dict."""

    files: list[Path]
    index: Path | None = None

    @property
    def root(self) -> Path:
        return (self.index or self.files[0]).parent

    def describe(self) -> str:
        if self.index is not None:
            return f"'{self.index}' ({len(self.files)} shards)"
        return f"'{self.files[0]}'" if len(self.files) == 1 else f"{len(self.files)} files under '{self.root}'"


def resolve_weight_files(source: str | os.PathLike, weight_name: str | None = DEFAULT_WEIGHT_NAME,
                         subfolder: str | None = "transformer", revision: str | None = None,
                         local_files_only: bool = False, cache_dir: str | None = None) -> WeightFiles:
    """Find the weight files of ``source`` (a file, a folder or a Hugging Face repo id)."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        _check_suffix(path)
        return WeightFiles([path])
    if path.is_dir():
        return _from_folder(path, weight_name, subfolder)
    if looks_like_repo_id(source):
        return _from_hub(str(source), weight_name, subfolder, revision, local_files_only, cache_dir)
    raise CheckpointNotFoundError(f"'{source}' does not exist (expected a weights file, a folder or a "
                                  "Hugging Face repo id such as YUXU915/TAG-MoE)")


def looks_like_repo_id(source: str | os.PathLike) -> bool:
    """Whether ``source``, not found on disk, is meant as a Hugging Face repo id ("owner/name")
    rather than a local path that is missing (absolute, ``./``, ``~``, or under an existing folder)."""
    path = Path(os.path.expanduser(str(source)))
    looks_local = path.parent != Path(".") and path.parent.is_dir()  # "models/TAG-MoE" with ./models present
    return bool(_REPO_ID.match(str(source))) and not str(source).startswith((".", "/", "~")) and not looks_local


def _check_suffix(path: Path) -> None:
    if not path.name.endswith(WEIGHT_SUFFIXES):
        raise UnknownLayoutError(f"'{path}' is not a weights file: expected one of "
                                 f"{', '.join(WEIGHT_SUFFIXES)} or a *.index.json shard index")


def _index_candidates(weight_name: str | None) -> list[str]:
    names: list[str] = []
    if weight_name:
        names.append(weight_name if weight_name.endswith(".index.json") else f"{weight_name}.index.json")
    names += [n for n in DEFAULT_INDEX_NAMES if n not in names]
    return names


def _from_folder(folder: Path, weight_name: str | None, subfolder: str | None) -> WeightFiles:
    dirs = [folder] + ([folder / subfolder] if subfolder and (folder / subfolder).is_dir() else [])
    tried: list[str] = []
    for d in dirs:
        if weight_name and not weight_name.endswith(".index.json"):
            candidate = d / weight_name
            tried.append(str(candidate))
            if candidate.is_file():
                return WeightFiles([candidate])
    for name in _index_candidates(weight_name):
        for d in dirs:
            candidate = d / name
            tried.append(str(candidate))
            if candidate.is_file():
                return _from_index(candidate)
    # Not a diffusers layout: accept a folder (or its subfolder) holding exactly one weights file.
    for d in reversed(dirs):
        found = sorted(p for p in d.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES))
        if len(found) == 1:
            return WeightFiles(found)
        if len(found) > 1:
            raise UnknownLayoutError(
                f"'{d}' holds {len(found)} weight files ({', '.join(p.name for p in found[:6])}) but no "
                f"*.index.json saying how they fit together, and none is named '{weight_name}'. "
                "Point to one file, or to the index.")
    raise UnknownLayoutError(f"no weights found in folder '{folder}'. Tried: {', '.join(tried)}")


def _shard_names(index: Path) -> list[str]:
    """The shard file names an index's ``weight_map`` points to, in order, each checked to be a
    relative name inside the index's folder (the index is read as data: it may come from anywhere)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
        if not weight_map:
            raise ValueError("its weight_map is empty")
        for key, name in weight_map.items():
            if not isinstance(name, str) or not name.strip():
                raise TypeError(f"weight_map['{key}'] is {name!r}, not a file name")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptCheckpointError(f"shard index '{index}' cannot be read: {exc}") from exc
    names = list(dict.fromkeys(weight_map.values()))
    for name in names:
        if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute() or PureWindowsPath(name).drive
                or ".." in re.split(r"[\\/]", name)):
            raise CorruptCheckpointError(
                f"shard index '{index}' names '{name}', outside the index's folder: shards must be file names "
                "relative to it (e.g. diffusion_pytorch_model-00001-of-00002.safetensors); fix the index")
    return names


def _from_index(index: Path) -> WeightFiles:
    folder = index.parent
    shards = [folder / name for name in _shard_names(index)]
    missing = [str(s) for s in shards if not s.is_file()]
    if missing:
        raise CheckpointNotFoundError(f"shard index '{index}' names {len(missing)} missing file(s): "
                                      f"{', '.join(missing[:5])}")
    roots = _allowed_roots(folder)
    for shard in shards:
        real = shard.resolve()
        if not any(real.is_relative_to(root) for root in roots):
            raise CorruptCheckpointError(
                f"shard '{shard}' of index '{index}' is a link to '{real}', outside the index's folder; copy the "
                "file into the folder (or link the whole folder) instead")
        _check_suffix(shard)
    return WeightFiles(shards, index=index)


def _allowed_roots(folder: Path) -> list[Path]:
    """Where an index's shards may really live: its folder, and for a Hugging Face cache snapshot
    (whose files link to ``../../blobs/<hash>``) that repository's ``blobs/``."""
    folder = folder.absolute()
    roots = [folder.resolve()]
    for parent in folder.parents:
        if parent.name == "snapshots" and (parent.parent / "blobs").is_dir():
            roots.append((parent.parent / "blobs").resolve())
            break
    return roots


def _from_hub(repo_id: str, weight_name: str | None, subfolder: str | None, revision: str | None,
              local_files_only: bool, cache_dir: str | None) -> WeightFiles:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    def fetch(name: str) -> Path:
        return Path(hf_hub_download(repo_id, name, subfolder=subfolder or None, revision=revision,
                                    cache_dir=cache_dir, local_files_only=local_files_only))

    errors: list[str] = []
    names = ([weight_name] if weight_name and not weight_name.endswith(".index.json") else [])
    names += _index_candidates(weight_name)
    for name in names:
        try:
            path = fetch(name)
        except (EntryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
            errors.append(f"{name}: {type(exc).__name__}")
            continue
        if not name.endswith(".index.json"):
            return WeightFiles([path])
        for shard in _shard_names(path):
            fetch(shard)
        return _from_index(path)
    where = "the local Hugging Face cache" if local_files_only else "the Hugging Face hub"
    raise CheckpointNotFoundError(f"could not get weights of '{repo_id}' from {where} "
                                  f"(subfolder '{subfolder}'): {'; '.join(errors)}")


@dataclass
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype  # what ``CheckpointReader.tensors`` gives (float32 for a dequantized GGUF tensor)
    stored_nbytes: int | None = None  # bytes in the file when not numel x itemsize (a quantized GGUF tensor)
    ggml_type: str | None = None  # a GGUF tensor's GGML type (F32, BF16, Q8_0, ...)

    @property
    def quantized(self) -> bool:
        """A GGUF tensor in a quantized GGML type (kept as raw bytes by ``chunks(quantized=True)``)."""
        return self.ggml_type is not None and GGML_TYPES[self.ggml_type].quantized


@dataclass
class CheckpointReader:
    """Keys, shapes and dtypes of a :class:`WeightFiles` set; tensors on demand."""

    weights: WeightFiles
    infos: dict[str, TensorInfo] = field(default_factory=dict)
    stored_names: dict[str, str] = field(default_factory=dict)  # key -> name in the file, if renamed
    _pickled: dict[Path, Mapping[str, torch.Tensor]] = field(default_factory=dict, repr=False)
    _gguf: dict[Path, GGUFFile] = field(default_factory=dict, repr=False)

    floats_only: bool = True  # refuse integer/bool tensors (a transformer's weights are all floating point)

    @classmethod
    def open(cls, weights: WeightFiles, floats_only: bool = True) -> "CheckpointReader":
        reader = cls(weights, floats_only=floats_only)
        for path in weights.files:
            for key, info in reader._scan(path):
                reader.infos.setdefault(key, info)
        return reader

    def describe(self) -> str:
        return self.weights.describe()

    def keys(self) -> Iterable[str]:
        return self.infos.keys()

    def __contains__(self, key: object) -> bool:
        return key in self.infos

    def nbytes(self, keys: Iterable[str] | None = None) -> int:
        keys = self.infos.keys() if keys is None else keys
        total = 0
        for key in keys:
            info = self.infos[key]
            total += info.stored_nbytes if info.stored_nbytes is not None else _numel(info.shape) * info.dtype.itemsize
        return total

    def _scan(self, path: Path) -> Iterator[tuple[str, TensorInfo]]:
        if path.name.endswith(".safetensors"):
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in handle.keys():
                        meta = handle.get_slice(key)
                        if meta.get_dtype() not in _SAFETENSORS_DTYPES:
                            raise UnknownLayoutError(f"'{path}' stores '{key}' as {meta.get_dtype()}, a type these "
                                                     "weights never use; it is not a TAG-MoE checkpoint")
                        info = TensorInfo(path, tuple(meta.get_shape()), _SAFETENSORS_DTYPES[meta.get_dtype()])
                        self._check_float(key, info)
                        yield key, info
            except (SafetensorError, OSError) as exc:
                raise CorruptCheckpointError(f"'{path}' is not a readable safetensors file ({exc}); the "
                                             "download may be incomplete - fetch it again") from exc
            return
        if path.name.endswith(".gguf"):
            for key, tensor in self.gguf_file(path).tensors.items():
                yield key, TensorInfo(path, tensor.shape, tensor.dtype, tensor.nbytes, tensor.qtype.name)
            return
        state = self._load_pickle(path)
        for key, value in state.items():
            info = TensorInfo(path, tuple(value.shape), value.dtype)
            self._check_float(key, info)
            yield key, info

    def _check_float(self, key: str, info: TensorInfo) -> None:
        # An int8/bool tensor would load (the loader keeps non-float dtypes) and then fail in
        # every matmul with a raw RuntimeError; fp8 files (what a converter writes) are floats.
        if self.floats_only and not info.dtype.is_floating_point:
            raise UnknownLayoutError(
                f"'{info.file}' stores '{key}' as {str(info.dtype).removeprefix('torch.')}: TAG-MoE transformer "
                "weights are floating point (fp32, bf16, fp16 or fp8), so integer/quantized files cannot be used; "
                "load the original weights or an fp8 conversion")

    def gguf_file(self, path: Path) -> GGUFFile:
        """The parsed (and checked: TAG-MoE, whole, readable types) GGUF file at ``path``; a memory map."""
        if path not in self._gguf:
            from .gguf_reader import GGUFFile

            self._gguf[path] = GGUFFile.open(path)
        return self._gguf[path]

    def _load_pickle(self, path: Path) -> Mapping[str, torch.Tensor]:
        if path in self._pickled:
            return self._pickled[path]
        try:
            try:
                obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as exc:  # legacy (non-zip) files cannot be memory-mapped
                if "mmap" not in str(exc).lower() and "zip" not in str(exc).lower():
                    raise
                obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle_errors() as exc:
            raise CorruptCheckpointError(
                f"'{path}' cannot be loaded safely: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. "
                "Only plain tensor state dicts are accepted (weights_only=True); convert it to "
                ".safetensors if it came from a trusted source") from exc
        state = unwrap_state_dict(obj)
        if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in state.items()):
            raise UnknownLayoutError(f"'{path}' does not hold a state dict of tensors (top-level keys: "
                                     f"{list(obj)[:8] if isinstance(obj, Mapping) else type(obj).__name__})")
        self._pickled[path] = state
        return state

    def tensors(self, keys: Iterable[str], chunk_bytes: int = 1 << 30,
                quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield ``(key, tensor)`` for ``keys``, file by file.

        safetensors tensors come straight from the memory map (zero-copy until written or
        cast). Files are re-opened every ``chunk_bytes`` so that pages already consumed by a
        cast or a device copy leave the process as the old map closes. ``quantized``: a GGUF's
        quantized tensors come as their raw bytes (``gguf_reader.as_quantized``), not dequantized.
        """
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.infos[key].file, []).append(key)
        for path, file_keys in by_file.items():
            if path.name.endswith(".gguf"):  # float tensors as views of the map, quantized ones dequantized
                from .gguf_reader import as_quantized

                tensors = self.gguf_file(path).tensors
                for key in file_keys:
                    tensor = tensors[self.stored_names.get(key, key)]
                    yield key, as_quantized(tensor) if quantized and tensor.qtype.quantized else tensor.to_torch()
                continue
            if not path.name.endswith(".safetensors"):
                state = self._load_pickle(path)
                for key in file_keys:
                    yield key, state[self.stored_names.get(key, key)]
                continue
            from safetensors import safe_open

            for chunk in _chunks(file_keys, self.infos, chunk_bytes):
                with safe_open(str(path), framework="pt", device="cpu") as handle:
                    for key in chunk:
                        yield key, handle.get_tensor(self.stored_names.get(key, key))

    def close(self) -> None:
        self._pickled.clear()
        self._gguf.clear()


def _chunks(keys: list[str], infos: dict[str, TensorInfo], limit: int) -> Iterator[list[str]]:
    chunk: list[str] = []
    size = 0
    for key in keys:
        info = infos[key]
        chunk.append(key)
        size += _numel(info.shape) * info.dtype.itemsize
        if size >= limit:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def unwrap_state_dict(obj: object) -> object:
    if isinstance(obj, Mapping):
        for key in WRAPPER_KEYS:
            value = obj.get(key)
            if isinstance(value, Mapping):
                return value
    return obj


def pickle_errors() -> tuple[type[BaseException], ...]:
    import pickle
    import zipfile

    return (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ImportError, TypeError)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
