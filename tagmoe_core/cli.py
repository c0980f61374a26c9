"""``tagmoe`` / ``python -m tagmoe_core``: edit, generate, tag, refine, convert, train and write the synthetic
task set (``synth-data``) from the command line.

The flags of the reference ``infer.py`` are accepted as they are (``--pretrained_model_path``,
``--transformer_model_path``, ``--transformer_weight_name``, ...) and in dashed form.
``--tiny`` runs on the embedded trained tiny model (64x64 pictures of shapes: "Remove the circle"; without
--image, edit takes its demo picture).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

from .errors import TagMoEError
from .model.moe import BACKENDS
from .pipeline.placement import MODES
from .runtime.devices import DTYPES


def _flag(parser: argparse.ArgumentParser, name: str, **kwargs) -> None:
    """``--name`` plus its dashed spelling ``--na-me`` (the reference uses underscores)."""
    names = [f"--{name}"] + ([f"--{name.replace('_', '-')}"] if "_" in name else [])
    parser.add_argument(*names, dest=name, **kwargs)


def _common(parser: argparse.ArgumentParser, edit: bool) -> None:
    src = parser.add_argument_group("model")
    _flag(src, "pretrained_model_path", metavar="BASE", help="base Qwen-Image: a diffusers folder or a hub repo id")
    _flag(src, "transformer_model_path", metavar="TAGMOE",
          help="TAG-MoE weights: a file (.safetensors/.bin/.pt), a folder, a *.index.json, or a hub repo id")
    _flag(src, "transformer_weight_name", default="diffusion_pytorch_model.safetensors",
          help="weights file (or index) name inside a folder or repo")
    _flag(src, "transformer_subfolder", default="transformer", help="subfolder holding the weights")
    _flag(src, "transformer_revision", default=None, help="hub revision of the TAG-MoE weights")
    _flag(src, "local_files_only", action="store_true", help="never download; use the local hub cache only")
    _flag(src, "ignore_unexpected_keys", action="store_true",
          help="load even if the TAG-MoE weights hold keys the transformer has no place for (skipped, counted)")
    src.add_argument("--tiny", action="store_true",
                     help="use the embedded trained tiny model (64x64 pictures of shapes; without --image, edit "
                          "takes its demo picture)")
    run = parser.add_argument_group("run")
    _flag(run, "device", default="auto", help="'auto', 'cpu', '0', 'cuda:1', or '0,1' to split across GPUs")
    _flag(run, "dtype", default="auto", choices=list(DTYPES), help="default: bf16 on GPUs, fp32 on the CPU")
    _flag(run, "moe_backend", default="auto", choices=list(BACKENDS))
    _flag(run, "placement", default="auto", choices=list(MODES),
          help="where the weights live (auto: the first that fits the free GPU memory)")
    _flag(run, "fp8", action="store_true", help="store the transformer's weights in float8, compute in bf16")
    _flag(run, "drop_text_encoder", action="store_true", help="keep the text encoder off the GPU between prompts")
    _flag(run, "blocks_on_gpu", type=int, default=None,
          help="block-swap: blocks kept on the GPU (default: all that fit)")
    _flag(run, "prompt", required=True, help="the instruction (edit) or description (generate)")
    _flag(run, "negative_prompt", default="", help="negative prompt (default: empty, encoded as ' ')")
    _flag(run, "width", type=int, default=None,
          help="output width, a multiple of 16 (default: the input's preferred bucket; 1024 for generate; "
               "64 with --tiny)")
    _flag(run, "height", type=int, default=None, help="output height, a multiple of 16")
    _flag(run, "cfg", type=float, default=None,
          help="true CFG scale (default 4; 1 with --tiny, whose model never learnt the empty prompt; <= 1 "
               "disables the negative pass)")
    _flag(run, "steps", type=int, default=30, help="denoising steps")
    _flag(run, "seed", type=int, default=-1, help="-1 = random; the seed used is printed")
    _flag(run, "num_images", type=int, default=1, help="images per prompt")
    _flag(run, "output", required=True, help="output PNG (several images: name_0.png, name_1.png, ...)")
    if edit:
        _flag(run, "image", default=None, help="input image (with --tiny, a built-in picture if omitted)")
        _flag(run, "keep_original_size", action="store_true", help="resize the result back to the input's size")
        _flag(run, "region", default=None, metavar="X1,Y1,X2,Y2",
              help="edit only this box of the input (pixels); condition tokens outside it are dropped")
        _flag(run, "use_vlm", action="store_true", help="let the text encoder see the input image")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tagmoe", description="TAG-MoE instruction editing and text-to-image.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log loading details")
    sub = parser.add_subparsers(dest="command", required=True)
    _common(sub.add_parser("edit", help="edit an image following an instruction"), edit=True)
    _common(sub.add_parser("generate", help="text-to-image"), edit=False)
    tiny = sub.add_parser("tiny", help="print where the embedded trained tiny model is (--random: build the "
                                       "random test model)")
    tiny.add_argument("--random", action="store_true",
                      help="build the random tiny model the tests use (same layout, random weights)")
    tiny.add_argument("--root", default=None, help="with --random: where to build it (default: the user cache)")
    _add_refine(sub)
    _add_convert(sub)
    _tags_parser(sub)
    _add_train(sub)
    _add_synth_data(sub)
    return parser


# -- tagmoe tags ---------------------------------------------------------------------------------------------
def _tags_parser(sub) -> None:
    tags = sub.add_parser("tags", help="TAG-MoE task tags for an instruction: scored by a model's text encoder "
                                       "(a VLM), or read by the English keyword rules without a model")
    tags.add_argument("instruction", help="the edit instruction (or, with --no-image, the description)")
    tags.add_argument("--no-image", action="store_true", help="text-to-image: there is no input image")
    tags.add_argument("--image", default=None, metavar="IMG", help="the input image, for the VLM to look at")
    tags.add_argument("--json", action="store_true", help="print one JSON object: tags, source, confidence, warnings")
    src = tags.add_argument_group("model (without one: the rules)")
    src.add_argument("--tiny", action="store_true",
                     help="score with the embedded tiny model's text encoder (random, frozen: the tags are noise)")
    _flag(src, "pretrained_model_path", metavar="BASE",
          help="score with the text encoder (Qwen2.5-VL) of this Qwen-Image folder or hub repo id")
    _flag(src, "local_files_only", action="store_true", help="never download; use the local hub cache only")
    _flag(src, "device", default="auto", help="'auto', 'cpu', '0', 'cuda:1' (the scorer runs on one device)")


def _tag_scorer(args):
    from .intent.tag_scoring import TagScorer
    from .pipeline.builder import load_text_encoder, load_tokenizer
    from .runtime.devices import resolve_devices

    device = resolve_devices(args.device)
    if args.tiny:
        from .tiny import trained_tiny_bundle

        base = str(trained_tiny_bundle().base)
    else:
        base = args.pretrained_model_path
        if not Path(base).expanduser().is_dir() and (Path(base).expanduser().exists() or base.count("/") != 1):
            raise TagMoEError(f"the base model folder '{base}' does not exist (give a Qwen-Image folder or a hub "
                              "repo id such as Qwen/Qwen-Image)")
    try:
        encoder = load_text_encoder(base, device.default_dtype, device.primary, args.local_files_only)
        tokenizer = load_tokenizer(base, args.local_files_only)
    except (OSError, ValueError) as exc:
        raise TagMoEError(f"cannot load the text encoder of '{base}': {str(exc).splitlines()[0]}") from exc
    return TagScorer(encoder, tokenizer)


def run_tags(args) -> int:
    import json

    from .intent.tag_rules import tag_with_rules

    if not args.instruction.strip():
        raise TagMoEError("the instruction is empty")
    if args.no_image and args.image:
        raise TagMoEError("--image and --no-image contradict each other")
    image = _open_image(args.image) if args.image else None
    if args.tiny or args.pretrained_model_path:
        result = _tag_scorer(args).tag(args.instruction, image, has_image=not args.no_image)
    else:
        result = tag_with_rules(args.instruction, has_image=not args.no_image)
        if image is not None:
            result.warnings.append("the rules do not look at the image: give --tiny or --pretrained_model_path "
                                   "to tag with a VLM")
    if args.json:
        print(json.dumps(result.to_dict(), ensure_ascii=False))
    else:
        ids = ", ".join(str(i) for i in result.tags.ids)
        print(f"tags: {result.tags.to_text()} (ids {ids})")
        print(f"source: {result.source}")
        print(f"confidence: {result.confidence.to_text()}")
        for warning in result.warnings:
            print(f"warning: {warning}")
    return 0


def _sources(args) -> tuple[str, str]:
    if args.tiny:
        from .tiny import trained_tiny_bundle

        bundle = trained_tiny_bundle()
        return str(bundle.base), str(bundle.tagmoe)
    if not args.pretrained_model_path or not args.transformer_model_path:
        raise TagMoEError("give --pretrained_model_path (base Qwen-Image) and --transformer_model_path "
                          "(TAG-MoE weights), or --tiny for the embedded tiny model")
    return args.pretrained_model_path, args.transformer_model_path


def _parse_region(text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        values = ()
    if len(values) != 4:
        raise TagMoEError(f"--region must be four numbers X1,Y1,X2,Y2 (pixels), got {text!r}")
    return values


def _open_image(path: str):
    """The input image, upright (EXIF orientation), checked: ``images.open_image``."""
    from .images import open_image

    return open_image(path)


def _outputs(output: str, count: int) -> list[Path]:
    path = Path(output)
    if path.suffix == "":
        path = path.with_suffix(".png")
    if count == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(count)]


def _check_outputs(paths: list[Path]) -> None:
    """Refuse, before the run, outputs the images could not be written to: a folder, a name whose
    extension PIL cannot write an RGB picture as, or a place this process cannot write."""
    import io
    import tempfile

    from PIL import Image

    checked: set[tuple[str, Path]] = set()
    for path in paths:
        if path.is_dir():
            raise TagMoEError(f"--output '{path}' is a folder: give a file name, such as '{path / 'result.png'}'")
        if path.exists():
            try:
                open(path, "ab").close()  # appends nothing: the file stays as it is
            except OSError as exc:
                raise TagMoEError(f"--output '{path}': cannot write in '{path}' ({exc.strerror or exc})") from None
        if (path.suffix.lower(), path.parent) in checked:
            continue
        checked.add((path.suffix.lower(), path.parent))
        fmt = Image.registered_extensions().get(path.suffix.lower())
        try:
            if fmt is None or fmt not in Image.SAVE:
                raise ValueError
            Image.new("RGB", (16, 16)).save(io.BytesIO(), format=fmt)  # e.g. XBM writes only 1-bit pictures
        except (ValueError, OSError, KeyError):
            raise TagMoEError(f"--output '{path}': '{path.suffix}' is not an image format PIL can write an RGB "
                              "picture as; use .png, .jpg or .webp") from None
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise TagMoEError(f"--output '{path}': '{folder}' is a file, not a folder")
        try:
            tempfile.TemporaryFile(dir=folder).close()
        except OSError as exc:
            raise TagMoEError(f"--output '{path}': cannot write in '{folder}' ({exc.strerror or exc})") from None


def _save(images, paths: list[Path], seed: int) -> None:
    """Write the results; one that cannot be written (disk full, ...) goes to the temporary
    folder instead, and the error says where, so a finished run is never lost."""
    import tempfile

    failed = []
    for path, im in zip(paths, images):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            im.save(path)
        except (OSError, ValueError) as exc:
            handle, kept = tempfile.mkstemp(prefix=f"tagmoe-seed{seed}-", suffix=".png")
            os.close(handle)
            im.save(kept)
            failed.append(f"{path} ({getattr(exc, 'strerror', None) or exc}): saved to {kept} instead")
            continue
        print(f"Saved to {path} ({im.width}x{im.height}, seed {seed})")
    if failed:
        raise TagMoEError("could not write " + "; ".join(failed))


def _check_run_memory(args, base: str, devices, dtype, width: int, height: int, edit: bool,
                      region: tuple[int, int, int, int] | None) -> None:
    """The pipeline's memory check of the run (activations and VAE), made before loading from the
    base model's configs (the release's shapes for a hub id not downloaded yet). It leaves out the
    weights, which are not loaded yet; the pipeline checks again, exactly, before sampling."""
    import json

    from .pipeline.placement import ALL_PHASES, QWEN_VAE_BASE_DIM, RELEASE_TRANSFORMER, RunEstimate, check_run_fits
    from .pipeline.text_encoding import MAX_PROMPT_TOKENS
    from .runtime.memory import available_bytes

    def config(component: str) -> dict:
        path = Path(base).expanduser() / component / "config.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except (OSError, ValueError):
            return {}

    transformer = config("transformer") or RELEASE_TRANSFORMER
    hidden = transformer.get("num_attention_heads", 24) * transformer.get("attention_head_dim", 128)
    estimate = RunEstimate(hidden, dtype.itemsize, config("vae").get("base_dim", QWEN_VAE_BASE_DIM), dtype.itemsize,
                           tiled_decode=devices.kind == "cuda")
    share = 1.0 if edit else 0.0
    if region is not None:
        x1, y1, x2, y2 = region
        share = (x2 - x1 + 1) * (y2 - y1 + 1) / ((width // 16) * (height // 16))
    # Byte-level BPE: a prompt has at most as many tokens as UTF-8 bytes (plus the template's end).
    text = min(MAX_PROMPT_TOKENS, max(len(p.encode()) for p in (args.prompt, args.negative_prompt or " ")) + 8)
    device = str(devices.primary)
    check_run_fits(estimate, width, height, args.num_images, share, text,
                   {device: ALL_PHASES},
                   {device: available_bytes(devices.primary)}, "edit" if edit else "text-to-image")


def run(args) -> int:
    from tqdm.auto import tqdm

    from .pipeline.builder import load_pipeline
    from .pipeline.buckets import target_size
    from .pipeline.checks import check_number, check_size
    from .pipeline.pipeline import resolve_seed
    from .pipeline.regions import region_from_pixel_box
    from .runtime.devices import resolve_devices

    # Check everything that can be checked before spending minutes loading the model.
    for name in ("width", "height"):
        if getattr(args, name) is not None:
            check_size(f"--{name}", getattr(args, name))
    if args.steps < 1 or args.num_images < 1:
        raise TagMoEError("--steps and --num_images must be at least 1")
    if args.cfg is None:
        from .pipeline.pipeline import DEFAULT_CFG
        from .tiny import TRAINED_CFG

        args.cfg = TRAINED_CFG if args.tiny else DEFAULT_CFG
    check_number("--cfg", args.cfg, minimum=0)
    seed = resolve_seed(args.seed)
    region_px = _parse_region(getattr(args, "region", None))
    outputs = _outputs(args.output, args.num_images)
    _check_outputs(outputs)
    devices = resolve_devices(args.device)
    base, tagmoe = _sources(args)
    image = None
    if args.command == "edit":
        if args.image is None:
            if not args.tiny:
                raise TagMoEError("edit needs --image (or use --tiny for a built-in demo picture)")
            from .tiny import trained_tiny_demo_picture

            image = trained_tiny_demo_picture()
        else:
            image = _open_image(args.image)
    size_given = args.width is not None or args.height is not None
    if args.tiny:  # the trained tiny model knows square 64x64 pictures: that, or the side given, for both
        from .tiny import TRAINED_SIZE

        side = args.width or args.height or TRAINED_SIZE
        width, height = target_size(image, args.width or side, args.height or side)
    else:
        width, height = target_size(image, args.width, args.height)
    region = None
    if region_px is not None:  # finite, inside the image: checked on the grid the edit will use
        region = region_from_pixel_box(region_px, image.size, (width, height))
    dtype = DTYPES[args.dtype]
    _check_run_memory(args, base, devices, dtype or devices.default_dtype, width, height, image is not None, region)

    start = time.perf_counter()
    with tqdm(total=100, desc="loading", unit="%", leave=False) as bar:
        def on_load(done: int, total: int) -> None:
            bar.n = int(100 * done / max(total, 1))
            bar.refresh()

        pipe = load_pipeline(base, tagmoe, device=args.device, dtype=dtype, backend=args.moe_backend,
                             placement=args.placement, fp8=args.fp8, drop_text_encoder=args.drop_text_encoder,
                             blocks_on_gpu=args.blocks_on_gpu,
                             weight_name=args.transformer_weight_name, subfolder=args.transformer_subfolder,
                             revision=args.transformer_revision, local_files_only=args.local_files_only,
                             strict=not args.ignore_unexpected_keys, progress=on_load)
    print(pipe.load_report.summary(), file=sys.stderr)
    print(f"placement: {pipe.placement.describe()} - {pipe.placement.reason}", file=sys.stderr)
    print(f"loaded in {time.perf_counter() - start:.1f}s", file=sys.stderr)

    with tqdm(total=args.steps, desc="sampling", unit="step") as bar:
        def on_step(info) -> None:
            bar.update(1)

        if args.command == "edit":
            from .pipeline.pipeline import resized_back

            result = pipe.edit(image, args.prompt, args.negative_prompt, width=width, height=height,
                               steps=args.steps, cfg=args.cfg, seed=seed, num_images=args.num_images,
                               region=region, use_vlm=args.use_vlm, callback=on_step)
            if args.keep_original_size and not size_given:  # the reference's: resized back when no size is asked
                result.images = resized_back(result.images, image)
        else:
            result = pipe.generate(args.prompt, args.negative_prompt, width=width, height=height, steps=args.steps,
                                   cfg=args.cfg, seed=seed, num_images=args.num_images, callback=on_step)
    _save(result.images, outputs, result.seed)
    return 0


# -- refine: the Prompt Refine node's backends from the command line -------------------------------------
def _add_refine(sub) -> None:
    parser = sub.add_parser("refine", help="rewrite an instruction with a VLM that sees the image (prints it)",
                            description="Rewrite an edit instruction with a vision-language model that looks at "
                                        "the image; prints the refined instruction (or the original one, with a "
                                        "warning, when the answer is unusable). One VLM: --endpoint, "
                                        "--vlm-folder, --pretrained_model_path or --tiny.")
    parser.add_argument("--image", required=True, help="the image the instruction is about")
    parser.add_argument("--prompt", required=True, help="the instruction to refine")
    vlm = parser.add_argument_group("VLM (one of)")
    vlm.add_argument("--endpoint", metavar="URL", default=None,
                     help="an OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1 (needs --model)")
    vlm.add_argument("--vlm-folder", dest="vlm_folder", metavar="PATH", default=None,
                     help="a local Qwen2-VL / Qwen2.5-VL instruct folder")
    _flag(vlm, "pretrained_model_path", metavar="BASE", default=None,
          help="the text encoder of this base Qwen-Image (a folder or a hub repo id)")
    vlm.add_argument("--tiny", action="store_true", help="the embedded tiny model's text encoder (a random model)")
    endpoint = parser.add_argument_group("endpoint")
    endpoint.add_argument("--model", default=None, help="the model name the endpoint serves")
    endpoint.add_argument("--api-key-env", dest="api_key_env", metavar="VAR", default="OPENAI_API_KEY",
                          help="environment variable holding the API key (default: OPENAI_API_KEY; '' for none)")
    endpoint.add_argument("--timeout", type=float, default=60.0, metavar="S",
                          help="seconds for one whole answer, per try (default: 60)")
    endpoint.add_argument("--retries", type=int, default=2, help="retries on errors and timeouts (default: 2)")
    local = parser.add_argument_group("local VLM")
    _flag(local, "device", default="auto", help="'auto', 'cpu', '0', 'cuda:1'")
    _flag(local, "dtype", default="auto", choices=list(DTYPES), help="default: bf16 on GPUs, fp32 on the CPU")
    _flag(local, "local_files_only", action="store_true", help="never download --pretrained_model_path")
    answer = parser.add_argument_group("answer")
    answer.add_argument("--seed", type=int, default=0, help="the same seed gives the same answer (default: 0)")
    answer.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    _flag(answer, "max_new_tokens", type=int, default=160, help="longest answer, in tokens (default: 160)")
    answer.add_argument("--tags", action="store_true", help="also print the task tags the VLM proposes (2nd line)")


def _refine_backend(args):
    from .intent.refine import LocalVLM, OpenAIChatVLM, TextEncoderVLM

    chosen = [name for name, given in (("--endpoint", args.endpoint), ("--vlm-folder", args.vlm_folder),
                                       ("--pretrained_model_path", args.pretrained_model_path),
                                       ("--tiny", args.tiny)) if given]
    if not chosen:
        raise TagMoEError("refine needs a VLM: --endpoint URL --model NAME (an OpenAI-compatible server), "
                          "--vlm-folder PATH (a local Qwen2/2.5-VL folder), --pretrained_model_path BASE (its "
                          "text encoder) or --tiny")
    if len(chosen) > 1:
        raise TagMoEError(f"refine takes one VLM, got {' and '.join(chosen)}")
    if args.endpoint:
        if not (args.model or "").strip():
            raise TagMoEError("--endpoint needs --model, the model name the endpoint serves")
        if args.retries < 0:
            raise TagMoEError("--retries must be 0 or more")
        return OpenAIChatVLM(args.endpoint, args.model, args.api_key_env, args.timeout, args.retries)
    from .runtime.devices import resolve_devices

    spec = resolve_devices(args.device)
    device, dtype = spec.primary, DTYPES[args.dtype] or spec.default_dtype
    if args.vlm_folder:
        return LocalVLM(args.vlm_folder, device=device, dtype=dtype)
    from .pipeline.components import load_text_encoder, load_tokenizer, load_vlm_image_processor

    base = args.pretrained_model_path
    if args.tiny:
        from .tiny import trained_tiny_bundle

        base = str(trained_tiny_bundle().base)
    path = Path(base).expanduser()
    looks_local = base.startswith((".", "/", "~")) or (path.parent != Path(".") and path.parent.is_dir())
    if looks_local and not path.exists():  # a local path, not a hub repo id
        raise TagMoEError(f"the base model folder '{base}' does not exist")
    try:
        return TextEncoderVLM(load_text_encoder(base, dtype, device, args.local_files_only),
                              load_tokenizer(base, args.local_files_only),
                              load_vlm_image_processor(base, args.local_files_only))
    except (OSError, ValueError) as exc:  # a missing folder or repo, a folder that is not a model
        raise TagMoEError(f"cannot load the text encoder of '{base}': {' '.join(str(exc).split())[:300]}") from exc


def refine(args) -> int:
    """``tagmoe refine``: print the refined instruction (one line) and, with ``--tags``, the proposed tags."""
    from .intent.refine import refine_instruction

    if args.max_new_tokens < 1:
        raise TagMoEError("--max-new-tokens must be at least 1")
    image = _open_image(args.image)
    backend = _refine_backend(args)
    result = refine_instruction(backend, args.prompt, image, seed=args.seed, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, with_tags=args.tags)
    print(" ".join(result.instruction.split()))  # warnings went to the log (stderr)
    if result.tags is not None:
        print(result.tags.tags.to_text())
    return 0


# -- convert: any checkpoint layout to one .safetensors (or .gguf) for models/diffusion_models ----------------------
def _add_convert(sub) -> None:
    from .model.convert import OUTPUT_DTYPES
    from .model.gguf_format import QUANT_TYPES

    parser = sub.add_parser("convert", help="write TAG-MoE weights (any layout) as one .safetensors or .gguf file",
                            usage="%(prog)s SRC OUT.safetensors [--dtype DTYPE] [--overwrite]\n"
                                  "       %(prog)s SRC OUT.gguf [--quant TYPE] [--overwrite]\n"
                                  "       %(prog)s --tiny OUT.safetensors|OUT.gguf [...]",
                            description="Convert TAG-MoE weights in any layout the library reads (a file, a folder, "
                                        "a sharded *.index.json, .bin/.pt, the per-expert layout ComfyUI saves) to "
                                        "ONE .safetensors file in the release key layout, with the transformer "
                                        "config in its header: what ComfyUI's models/diffusion_models takes; or to "
                                        "ONE quantized .gguf (ComfyUI keys, one Linear per expert) for low-VRAM "
                                        "cards. Streamed: the weights are never all in memory.")
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="SRC (a file, folder, *.index.json or hub repo id) then OUT.safetensors or OUT.gguf; "
                             "with --tiny only OUT")
    parser.add_argument("--dtype", default=None, choices=list(OUTPUT_DTYPES),
                        help="for .safetensors: bf16 (default); fp8_e4m3fn halves the file (matrices in float8, the "
                             "rest in bf16)")
    parser.add_argument("--quant", default=None, type=str.upper, choices=list(QUANT_TYPES),
                        help="for .gguf: the GGML type of the big matrices (default Q8_0); routers, vectors and "
                             "small tensors stay F32, the input/output projections BF16")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    parser.add_argument("--tiny", action="store_true", help="convert the embedded tiny model's TAG-MoE weights")
    _flag(parser, "local_files_only", action="store_true", help="never download a hub SRC; use the local cache")


def convert(args) -> int:
    """``tagmoe convert SRC OUT.safetensors|OUT.gguf``: progress on stderr, the summary on stdout."""
    from tqdm.auto import tqdm

    from .model.convert import convert_checkpoint
    from .model.gguf_convert import convert_to_gguf

    want = 1 if args.tiny else 2
    if len(args.paths) != want:
        raise TagMoEError("convert takes SRC and OUT.safetensors (or OUT.gguf)" if want == 2 else
                          "convert --tiny takes only OUT.safetensors or OUT.gguf (the source is the tiny model)")
    if args.tiny:
        from .tiny import trained_tiny_bundle

        src, out = str(trained_tiny_bundle().tagmoe), args.paths[0]
    else:
        src, out = args.paths
    gguf = str(out).lower().endswith(".gguf")
    if gguf and args.dtype is not None:
        from .model.gguf_format import QUANT_TYPES

        raise TagMoEError(f"--dtype is for .safetensors outputs; a .gguf takes --quant ({', '.join(QUANT_TYPES)})")
    if not gguf and args.quant is not None:
        raise TagMoEError(f"--quant writes a .gguf file; '{out}' is not one (name it OUT.gguf)")
    bars: list = []

    def on_progress(tensors: int, tensors_total: int, done: int, total: int) -> None:
        if not bars:
            bars.append(tqdm(total=total, desc="converting", unit="B", unit_scale=True, unit_divisor=1024,
                             leave=False))
        bars[0].set_postfix_str(f"{tensors}/{tensors_total} tensors", refresh=False)
        bars[0].update(done - bars[0].n)  # redraws at most every tqdm.mininterval

    try:
        if gguf:
            report = convert_to_gguf(src, out, args.quant or "Q8_0", overwrite=args.overwrite, progress=on_progress,
                                     local_files_only=args.local_files_only)
        else:
            report = convert_checkpoint(src, out, args.dtype or "bf16", overwrite=args.overwrite,
                                        progress=on_progress, local_files_only=args.local_files_only)
    finally:
        for bar in bars:
            bar.close()
    print(report.summary())
    return 0


# -- train: the paper's objective on a data folder ---------------------------------------------------------
def _add_train(sub) -> None:
    parser = sub.add_parser("train", help="train TAG-MoE on a data folder (samples.jsonl beside the images)",
                            description="Train TAG-MoE with the paper's objective, L_flow + lambda_lbl * L_lbl + "
                                        "lambda_align * L_align, on a folder holding samples.jsonl (one JSON object "
                                        "a line: target, instruction, optional input and tags). Checkpoints go to "
                                        "OUTPUT/checkpoint-NNNNNN/ in the release's layout: pass one as "
                                        "--transformer_model_path to edit with it.")
    parser.add_argument("--data", required=True, metavar="DIR", help="the data folder (with samples.jsonl)")
    parser.add_argument("--output", required=True, metavar="DIR", help="where checkpoints and train_log.jsonl go")
    src = parser.add_argument_group("model")
    src.add_argument("--tiny", action="store_true", help="start from the embedded tiny model")
    _flag(src, "pretrained_model_path", metavar="BASE", help="base Qwen-Image: a diffusers folder")
    _flag(src, "transformer_model_path", metavar="TAGMOE", help="TAG-MoE weights to start from")
    what = parser.add_argument_group("what trains")
    what.add_argument("--train", default="moe", choices=["whole", "moe", "lora"],
                      help="the whole transformer, the MoE layers + tag heads (default), or LoRA + tag heads")
    _flag(what, "lora_modules", default=None, metavar="NAMES",
          help="comma-separated Linear modules for LoRA (names, suffixes or globs; default: every attention "
               "projection)")
    _flag(what, "lora_rank", type=int, default=8)
    _flag(what, "lora_alpha", type=float, default=8.0)
    _flag(what, "freeze_tag_embedding", action="store_true", help="keep tag_embedding (s) as the checkpoint has it")
    run = parser.add_argument_group("run")
    run.add_argument("--steps", type=int, default=100, help="optimizer steps in all (default: 100)")
    run.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (default: 1e-4)")
    run.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"],
                     help="adamw (default), or muon: Muon for the weight matrices inside the transformer blocks "
                          "(--train whole), AdamW for the rest")
    _flag(run, "muon_lr", type=float, default=0.0, help="the Muon matrices' learning rate (default 0: --lr)")
    _flag(run, "batch_size", type=int, default=1, help="samples a step (of one size and kind; default: 1)")
    _flag(run, "lambda_lbl", type=float, default=0.01, help="weight of the load-balancing loss (default: 0.01)")
    _flag(run, "lambda_align", type=float, default=0.1, help="weight of the alignment loss (default: 0.1)")
    _flag(run, "text_dropout", type=float, default=0.0, help="share of prompts replaced by the empty one")
    _flag(run, "weight_decay", type=float, default=0.0)
    _flag(run, "max_grad_norm", type=float, default=1.0, help="gradient clipping (0: none)")
    _flag(run, "ema_decay", type=float, default=0.0,
          help="keep a moving average of the trained weights (e.g. 0.999; reached after ~9000 steps) and save it "
               "as the checkpoints' model (default 0: the last weights)")
    run.add_argument("--seed", type=int, default=0, help="the same seed and data give the same run (default: 0)")
    run.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output")
    _flag(run, "save_every", type=int, default=0, help="save a checkpoint every N steps (default: only at the end)")
    _flag(run, "device", default="auto", help="'auto', 'cpu', '0', 'cuda:1' (one device)")
    _flag(run, "dtype", default="fp32", choices=["fp32", "bf16"],
          help="of the frozen weights (trained ones are float32)")
    _flag(run, "no_bf16_autocast", action="store_true", help="on CUDA, run the forward in float32")
    _flag(run, "gradient_checkpointing", action="store_true", help="recompute block activations in backward")


def run_train(args) -> int:
    from .training.loop import TrainConfig, train
    from .training.lora import DEFAULT_LORA_MODULES

    if args.tiny and (args.pretrained_model_path or args.transformer_model_path):
        raise TagMoEError("--tiny and --pretrained_model_path/--transformer_model_path contradict each other")
    base, tagmoe = _sources(args)
    modules = DEFAULT_LORA_MODULES
    if args.lora_modules is not None:
        modules = tuple(m.strip() for m in args.lora_modules.split(",") if m.strip())
        if not modules:
            raise TagMoEError("--lora-modules names no module")
    config = TrainConfig(
        data=args.data, output=args.output, base=base, tagmoe=tagmoe, train=args.train, steps=args.steps, lr=args.lr,
        batch_size=args.batch_size, lambda_lbl=args.lambda_lbl, lambda_align=args.lambda_align, seed=args.seed,
        resume=args.resume, save_every=args.save_every, lora_rank=args.lora_rank, lora_alpha=args.lora_alpha,
        lora_modules=modules, train_tag_embedding=not args.freeze_tag_embedding, text_dropout=args.text_dropout,
        weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, ema_decay=args.ema_decay,
        optimizer=args.optimizer, muon_lr=args.muon_lr, device=args.device, dtype=args.dtype,
        bf16=False if args.no_bf16_autocast else None, gradient_checkpointing=args.gradient_checkpointing)
    result = train(config, progress=lambda report: print(report.line(), flush=True))
    if result.checkpoint is not None:
        print(f"Saved {result.checkpoint} ({result.seconds_per_step:.3f}s/step)")
    return 0


# -- synth-data: the synthetic multi-task set -------------------------------------------------------------
def _add_synth_data(sub) -> None:
    parser = sub.add_parser("synth-data", help="write the synthetic shapes task set as a data folder for train",
                            description="Write N procedurally drawn samples (recolour, add, remove, background, "
                                        "grayscale, invert, text-to-image; shapes on backgrounds) as a data folder "
                                        "tagmoe train reads (samples.jsonl + PNGs), with tasks.jsonl, each sample's "
                                        "structured description for the task-success rule. The heldout split holds "
                                        "shape-colour and colour-on-background pairs the train split never shows.")
    parser.add_argument("output", metavar="OUT", help="the folder to write")
    parser.add_argument("--count", type=int, default=1000, help="samples (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="the same seed and split give the same set (default: 0)")
    parser.add_argument("--split", default="train", choices=["train", "heldout"])
    parser.add_argument("--width", type=int, default=64, help="a multiple of 16 (default: 64)")
    parser.add_argument("--height", type=int, default=64, help="a multiple of 16 (default: 64)")
    parser.add_argument("--overwrite", action="store_true", help="replace a data folder already there")


def run_synth_data(args) -> int:
    from .training.synthetic import write_dataset

    report = write_dataset(args.output, args.count, seed=args.seed, split=args.split,
                           size=(args.width, args.height), overwrite=args.overwrite)
    print(report.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    try:
        if args.command == "tiny":
            from .tiny import ensure_tiny_bundle, trained_tiny_bundle

            if args.root is not None and not args.random:
                raise TagMoEError("--root is where --random builds the random model (the trained one is shipped)")
            bundle = ensure_tiny_bundle(args.root) if args.random else trained_tiny_bundle()
            print(f"base:   {bundle.base}\ntag-moe: {bundle.tagmoe}")
            return 0
        if args.command == "refine":
            return refine(args)
        if args.command == "convert":
            return convert(args)
        if args.command == "tags":
            return run_tags(args)
        if args.command == "train":
            return run_train(args)
        if args.command == "synth-data":
            return run_synth_data(args)
        return run(args)
    except TagMoEError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
