"""A real ComfyUI server for the ``comfyui``-marked tests, with the pack and the tiny model.

``main.py --cpu`` (on the hiddenswitch fork, its ``comfyui`` entry point: see ``server_command``) on a
free loopback port with a fresh base directory holding the pack (linked), the tiny model in
models/diffusers (with a full-size random Qwen-Image VAE, which ComfyUI's VAE loader can build), the
TAG-MoE weights in models/tagmoe and models/diffusion_models, the same VAE in ComfyUI's key layout in
models/vae, a small LoRA in models/loras and example images in input/; and the trained tiny model the
package ships (``tiny.trained_tiny_bundle``) as Qwen-Image-shapes / TAG-MoE-shapes with its VAE as
qwen_image_vae_shapes.safetensors (widened to the shape ComfyUI 0.3.x builds).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from node_harness import REPO

COMFYUI_DIR = os.environ.get("COMFYUI_DIR")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _full_size_vae_bundle(tiny_bundle, root: Path) -> tuple[Path, Path]:
    """The tiny base with a full-size (random) Qwen-Image VAE, which ComfyUI's VAE loader can
    build (it fixes the architecture), plus the same weights in ComfyUI's key layout."""
    import torch
    from tagmoe_core.model.vae_keys import diffusers_qwen_vae_to_comfy
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file

    base = root / "Qwen-Image"
    shutil.copytree(tiny_bundle.base, base, ignore=shutil.ignore_patterns("vae"))
    torch.manual_seed(0)
    vae = AutoencoderKLQwenImage().to(torch.bfloat16)
    vae.save_pretrained(base / "vae")
    comfy_vae = root / "qwen_image_vae.safetensors"
    save_file({k: v.contiguous() for k, v in diffusers_qwen_vae_to_comfy(vae.state_dict()).items()}, comfy_vae)
    return base, comfy_vae


TRAINED_BASE, TRAINED_WEIGHTS, TRAINED_VAE = "Qwen-Image-shapes", "TAG-MoE-shapes", "qwen_image_vae_shapes.safetensors"
TRAINED_GGUF = "TAG-MoE-shapes-Q4_0.gguf"  # the trained transformer quantized, in models/diffusion_models


def _trained_comfy_vae(path: Path) -> Path:
    """The shipped trained tiny VAE in ComfyUI's key layout, widened to width 96 (what ComfyUI 0.3.x
    builds whatever the file holds; newer ComfyUI reads the width from the file, so one file serves
    both), stored in fp16 like the shipped weights (the widening's rescaled norms and queries round)."""
    import torch
    from diffusers import AutoencoderKLQwenImage
    from safetensors.torch import save_file
    from tagmoe_core.model.vae_widen import comfy_state_dict
    from tagmoe_core.tiny import trained_tiny_bundle

    small = AutoencoderKLQwenImage.from_pretrained(trained_tiny_bundle().base / "vae", torch_dtype=torch.float32)
    save_file(comfy_state_dict(small, 96, torch.float16), path)
    return path


def is_hiddenswitch_fork(comfyui_dir=COMFYUI_DIR) -> bool:
    """The hiddenswitch fork of ComfyUI (an installable ``comfy`` package, its server in
    ``comfy/cmd/main.py``) rather than Comfy-Org's tree (``main.py`` with top-level ``nodes.py``)."""
    return bool(comfyui_dir) and (Path(comfyui_dir) / "comfy" / "cmd" / "main.py").is_file()


def server_command(port: int, home: Path) -> tuple[list[str], str, dict]:
    """The command, working directory and environment that start ComfyUI (``COMFYUI_DIR``) on ``port``
    with ``home`` as its base directory (models/, custom_nodes/, input/, output/, user/).

    Comfy-Org's tree: ``main.py`` in ``COMFYUI_DIR``. The hiddenswitch fork: its root main.py replaces
    the base paths with its own folder after parsing ``--base-directory`` (the pack in
    ``home/custom_nodes`` would not load), so this runs its installed ``comfyui`` script instead,
    ``comfy.cmd.main:entrypoint``, which keeps them, with ``comfy`` imported from ``COMFYUI_DIR``. It
    runs in ``home``, since the fork also creates its input/output/temp/user folders relative to the
    working directory; its database goes in ``home`` too, not the user's data folder. It logs each
    custom node's import time (and "IMPORT FAILED") at DEBUG, where Comfy-Org's prints them, so it
    logs at DEBUG."""
    common = ["--cpu", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(home),
              "--disable-auto-launch", "--preview-method", "latent2rgb"]
    if not is_hiddenswitch_fork():
        return [sys.executable, "main.py", *common], COMFYUI_DIR, dict(os.environ)
    path = os.pathsep.join(p for p in (str(Path(COMFYUI_DIR).resolve()), os.environ.get("PYTHONPATH")) if p)
    command = [sys.executable, "-c", "from comfy.cmd.main import entrypoint; entrypoint()", *common,
               "--database-url", f"sqlite:///{home / 'user' / 'comfy.db'}", "--logging-level", "DEBUG"]
    return command, str(home), {**os.environ, "PYTHONPATH": path}


def start_server(tiny_bundle, tmp_path_factory):
    import requests

    root = tmp_path_factory.mktemp("comfy")
    base_model, comfy_vae = _full_size_vae_bundle(tiny_bundle, root / "src")
    home = root / "base"
    for sub in ("custom_nodes", "models/diffusers", "models/tagmoe", "models/diffusion_models", "models/vae",
                "models/loras", "input", "output", "user"):
        (home / sub).mkdir(parents=True, exist_ok=True)
    (home / "custom_nodes" / "comfyui-tagmoe").symlink_to(REPO)
    (home / "models/diffusers/Qwen-Image").symlink_to(base_model)
    (home / "models/tagmoe/TAG-MoE").symlink_to(tiny_bundle.tagmoe)
    (home / "models/diffusion_models/TAG-MoE").symlink_to(tiny_bundle.tagmoe)
    (home / "models/vae/qwen_image_vae.safetensors").symlink_to(comfy_vae)
    write_test_lora(home / "models/loras" / LORA_NAME)
    from tagmoe_core.tiny import trained_tiny_bundle

    trained = trained_tiny_bundle()
    (home / "models/diffusers" / TRAINED_BASE).symlink_to(trained.base)
    (home / "models/diffusion_models" / TRAINED_WEIGHTS).symlink_to(trained.tagmoe)
    from tagmoe_core.model.gguf_convert import convert_to_gguf

    for quant in ("Q4_0", "Q4_K"):  # a legacy type and a K-quant (on the trained model's 512-wide matrices)
        convert_to_gguf(trained.tagmoe, home / "models/diffusion_models" / TRAINED_GGUF.replace("Q4_0", quant), quant)
    (home / "models/vae" / TRAINED_VAE).symlink_to(_trained_comfy_vae(root / "src" / TRAINED_VAE))
    # a returning user: newer frontends open the template browser on a first visit, late, over the graph
    (home / "user/default").mkdir(parents=True, exist_ok=True)
    (home / "user/default/comfy.settings.json").write_text(json.dumps({"Comfy.TutorialCompleted": True}))
    from tagmoe_core.demo import demo_image

    demo_image().save(home / "input" / "example.png")
    rgba = demo_image().convert("RGBA")
    alpha = Image.new("L", rgba.size, 255)
    alpha.paste(0, (100, 40, 160, 150))  # LoadImage's MASK = 1 - alpha: the figure is the region
    rgba.putalpha(alpha)
    rgba.save(home / "input" / "region_example.png")

    port = _free_port()
    log = open(root / "comfyui.log", "w")
    command, cwd, env = server_command(port, home)
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if process.poll() is not None:
                pytest.fail(f"ComfyUI exited:\n{(root / 'comfyui.log').read_text()[-4000:]}")
            try:
                reply = requests.get(f"{url}/object_info/TagMoESampler", timeout=2)
            except requests.ConnectionError:
                time.sleep(1)
                continue
            if reply.ok and "TagMoESampler" in reply.json():
                break
            # ComfyUI imports the custom nodes before it listens: up without them is a failed import
            pytest.fail(f"ComfyUI is up without the pack's nodes:\n{(root / 'comfyui.log').read_text()[-4000:]}")
        else:
            pytest.fail("ComfyUI did not start within 300 s")
        yield {"url": url, "home": home, "log": root / "comfyui.log", "base": base_model}
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def offline_page(browser, **options):
    """A Playwright page for ComfyUI's frontend on a machine without internet. The hiddenswitch fork's
    own Eval Python extension (comfy_extras/eval_web/eval_python.js) loads the Ace editor from a CDN
    and awaits it at the top level with no error handler, so offline the frontend never finishes its
    setup (no ``window.app``): the page gets a stand-in for that script."""
    page = browser.new_page(**options)
    page.route("**/ace-builds@*/**", lambda route: route.fulfill(
        status=200, content_type="application/javascript", body="window.ace = window.ace || {config: {set() {}}};"))
    return page


def _finished(server, prompt: dict, timeout: float) -> dict:
    """Queue ``prompt`` and wait until it has run, well or not: its ``/history`` entry."""
    import requests

    reply = requests.post(f"{server['url']}/prompt", json={"prompt": prompt, "client_id": "tagmoe-tests"}, timeout=30)
    assert reply.ok, reply.text
    prompt_id = reply.json()["prompt_id"]
    deadline = time.time() + timeout
    while time.time() < deadline:
        entry = requests.get(f"{server['url']}/history/{prompt_id}", timeout=10).json().get(prompt_id)
        status = (entry or {}).get("status") or {}
        if status.get("status_str") == "error" or status.get("completed") is not None:
            return entry
        time.sleep(0.5)
    pytest.fail(f"prompt {prompt_id} did not finish in {timeout} s")


def run_prompt(server, prompt: dict, timeout: float = 600) -> dict:
    entry = _finished(server, prompt, timeout)
    if entry["status"]["status_str"] != "success":
        messages = json.dumps(entry["status"]["messages"], indent=1)[-3000:]
        pytest.fail(f"prompt failed: {messages}\n{server['log'].read_text()[-3000:]}")
    return entry


def prompt_error(server, prompt: dict, timeout: float = 120) -> str:
    """Queue ``prompt``, which must fail while running: the exception message of its ``execution_error``
    (Comfy-Org's history gives ``["execution_error", {..., "exception_message": ...}]``, the hiddenswitch
    fork's ``"execution_error: <message>"``)."""
    status = _finished(server, prompt, timeout)["status"]
    assert status["status_str"] == "error", status
    for message in status["messages"]:
        if isinstance(message, str) and message.startswith("execution_error: "):
            return message.removeprefix("execution_error: ").strip()
        if isinstance(message, list) and message[0] == "execution_error":
            return message[1]["exception_message"].strip()
    pytest.fail(f"no execution_error in {status}")


def images_of(server, entry: dict) -> dict[str, list[Image.Image]]:
    import requests

    found = {}
    for node_id, output in entry["outputs"].items():
        for info in output.get("images", []):
            data = requests.get(f"{server['url']}/view", params=info, timeout=30).content
            found.setdefault(node_id, []).append(Image.open(io.BytesIO(data)).convert("RGB"))
    return found




def latents_of(server, entry: dict) -> dict:
    """The latents SaveLatent nodes wrote, by node id (ComfyUI's .latent files)."""
    from safetensors.torch import load_file

    found = {}
    for node_id, output in entry["outputs"].items():
        for info in output.get("latents", []):
            path = server["home"] / "output" / info.get("subfolder", "") / info["filename"]
            found[node_id] = load_file(str(path))["latent_tensor"]
    return found


def write_latent(path: Path, latent) -> None:
    """A .latent file as ComfyUI's SaveLatent writes it (LoadLatent reads it back)."""
    import torch
    from safetensors.torch import save_file

    save_file({"latent_tensor": latent.contiguous(), "latent_format_version_0": torch.tensor([])}, str(path))


LORA_NAME = "tagmoe-test-lora.safetensors"
LORA_RANK = 2


def lora_keys() -> dict[str, tuple[int, int]]:
    """Diffusers-style LoRA keys on the tiny model (inner dim 32, FFN 128): attention of a dense and a
    MoE block, the dense FFN of a dense block, one expert, and the dense FFN of a MoE block (which
    TAG-MoE does not have: these must be reported)."""
    return {
        "transformer.transformer_blocks.0.attn.to_q": (32, 32),
        "transformer.transformer_blocks.3.attn.to_k": (32, 32),
        "transformer.transformer_blocks.1.img_mlp.net.0.proj": (128, 32),
        "transformer.transformer_blocks.2.img_mlp.experts.1.w1": (128, 32),
        "transformer.transformer_blocks.2.img_mlp.net.0.proj": (128, 32),
        "transformer.transformer_blocks.2.img_mlp.net.2": (32, 128),
    }


def write_test_lora(path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(3)
    state = {}
    for stem, (out_dim, in_dim) in lora_keys().items():
        state[f"{stem}.lora_A.weight"] = torch.randn(LORA_RANK, in_dim, generator=gen) * 0.3
        state[f"{stem}.lora_B.weight"] = torch.randn(out_dim, LORA_RANK, generator=gen) * 0.3
    save_file(state, str(path))


def tree_name(comfyui_dir=COMFYUI_DIR) -> str:
    """Which ComfyUI this is, e.g. ``Comfy-Org 0.3.64`` or ``hiddenswitch 0.10.0``."""
    import re

    root = Path(comfyui_dir)
    version_file = root / "comfyui_version.py"
    if not version_file.is_file():  # the fork keeps it in its package
        version_file = root / "comfy" / "__init__.py"
    found = re.search(r'__version__\s*=\s*"([^"]+)"', version_file.read_text()) if version_file.is_file() else None
    return f"{'hiddenswitch' if is_hiddenswitch_fork(comfyui_dir) else 'Comfy-Org'} {found[1] if found else '?'}"


def same_on_every_tree(name: str, result) -> dict[str, float]:
    """Keep ``result`` (a tensor) under ``$TAGMOE_TREE_RESULTS/<tree>/<name>.pt`` and return its largest
    difference to the same result from every other ComfyUI tree kept there: run the comfyui tests on
    one tree, then on the next with the same folder, and the second run compares the two."""
    import torch

    folder = os.environ.get("TAGMOE_TREE_RESULTS")
    if not folder:
        return {}
    tree = tree_name()
    own = Path(folder) / tree.replace(" ", "-")
    own.mkdir(parents=True, exist_ok=True)
    result = torch.as_tensor(result).detach().float().cpu()
    torch.save(result, own / f"{name}.pt")
    diffs = {}
    for other in sorted(Path(folder).iterdir()):
        if other != own and (other / f"{name}.pt").is_file():
            theirs = torch.load(other / f"{name}.pt")
            same_shape = theirs.shape == result.shape
            diffs[other.name] = float((theirs - result).abs().max()) if same_shape else float("inf")
            relative = float((theirs - result).norm() / theirs.norm().clamp_min(1e-30)) if same_shape else float("inf")
            print(f"{name} on {tree} vs {other.name}: max abs difference {diffs[other.name]:.3g}, rel L2 "
                  f"{relative:.3g}")
    return diffs


def run_in_comfyui(script: str, out: Path, timeout: float = 900, **env) -> dict:
    """Run ``tests/<script>`` with ComfyUI's folder as the working directory (so ``import nodes`` is
    ComfyUI's), ``$TAGMOE_OUT`` = ``out`` and ``env``; return the ``result.json`` it writes there."""
    done = subprocess.run([sys.executable, str(Path(__file__).resolve().parent / script)], cwd=COMFYUI_DIR,
                          env={**os.environ, "TAGMOE_OUT": str(out), **env}, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    print(json.dumps(result, indent=1))
    return result
