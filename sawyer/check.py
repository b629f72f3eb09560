"""Pre-flight check, the first code cell of every notebook: is this machine ready for this preset?

    from sawyer.check import preflight
    preflight(preset)          # prints a short table and what to do about anything missing

It reports the GPU and its memory, bf16 support and the dtype the course will compute in, whether the
preset's models should fit, the versions of sawyer and the key libraries, and whether a hub token is
present (never its value), read from ``HF_TOKEN`` or, on Colab, the ``HF_TOKEN`` secret (key icon).
``python -m sawyer.check [preset]`` prints the same from a terminal.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys

import torch

import sawyer
from sawyer.loading import bf16_in_hardware, compute_dtype

#: Rough peak GPU memory (GiB) each preset needs on its largest stage (see BENCHMARKS.md for measurements).
NEEDS_GIB = {"tiny": 0.0, "cpu": 0.0, "t4": 12.0, "a100": 14.5}
#: What the notebooks import (requirements-colab.txt installs the ones Colab lacks).
LIBRARIES = ("torch", "transformers", "peft", "datasets", "accelerate", "bitsandbytes", "huggingface_hub")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"


def gated_models(preset) -> list[str]:
    """Hub ids in the preset that need a licence click-through and a token (Meta's Llama family)."""
    ids = [preset.sft.base_model, preset.summary.policy]
    return [m for m in ids if m.startswith("meta-llama/")]


def hub_token() -> tuple[str | None, str]:
    """``(token, where)``: the hub token and a one-line account of where it came from (never the token).

    Looks at ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN``, then the Colab secret ``HF_TOKEN``. On Colab the two
    failures need different fixes, so ``where`` tells them apart: no secret at all ("add the secret") versus
    a secret this notebook may not read ("switch on 'Notebook access' for it").
    """
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        if os.environ.get(var):
            return os.environ[var], f"present (environment variable {var})"
    try:
        from google.colab import userdata  # type: ignore[import-not-found]
    except ImportError:
        return None, "absent (no HF_TOKEN environment variable)"
    try:
        token = userdata.get("HF_TOKEN")
    except Exception as e:  # google.colab.userdata raises its own exception classes; tell them apart by name
        kind = type(e).__name__
        if kind == "NotebookAccessError":
            return None, ("the Colab secret HF_TOKEN exists but this notebook has no access to it: open the key "
                          "icon in the left bar and switch on 'Notebook access' for HF_TOKEN, then re-run")
        if kind == "SecretNotFoundError":
            return None, ("absent: add a Colab secret named HF_TOKEN (key icon in the left bar) holding a hub "
                          "read token, with 'Notebook access' on")
        return None, f"absent (the Colab secret HF_TOKEN could not be read: {kind})"
    if not token:
        return None, "absent: the Colab secret HF_TOKEN is empty; paste a hub read token into it"
    return token, "present (Colab secret HF_TOKEN)"


def hub_login(preset, *, echo=print) -> bool:
    """Log in to the hub only when the preset uses a gated model; returns whether it logged in.

    The token comes from the ``HF_TOKEN`` environment variable or, on Colab, the ``HF_TOKEN`` secret
    (key icon in the left bar). It is passed to ``huggingface_hub.login`` and never printed.
    """
    gated = gated_models(preset)
    if not gated:
        echo(f"preset {preset.name!r} uses no gated model: no hub login needed")
        return False
    token, where = hub_token()
    if not token:
        if "no access" in where:
            raise RuntimeError(f"{', '.join(gated)} is gated and {where}")
        raise RuntimeError(f"{', '.join(gated)} is gated: accept its licence on its hub page, then add your token as "
                           "the HF_TOKEN secret (Colab) or environment variable; or use preset='t4', whose base "
                           f"model is ungated. Token: {where}")
    from huggingface_hub import login

    login(token=token, add_to_git_credential=False)
    echo(f"logged in to the hub for {', '.join(gated)} (token not shown)")
    return True


def preflight(preset, *, echo=print) -> dict:
    """Print the checks and return them as a dict; ``advice`` lists what to do about each problem."""
    info: dict = {"preset": preset.name, "python": sys.version.split()[0], "sawyer": sawyer.__version__}
    info.update({lib: _version(lib) for lib in LIBRARIES})
    advice = []
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 1024 ** 3, 1)
        info["bf16"] = bf16_in_hardware()  # not torch.cuda.is_bf16_supported(): True on a T4 (emulated)
        if info["gpu_memory_gib"] < NEEDS_GIB.get(preset.name, 0):
            advice.append(f"the {preset.name} preset needs about {NEEDS_GIB[preset.name]} GiB of GPU memory; this GPU "
                          f"has {info['gpu_memory_gib']}: use preset='t4' (or 'tiny' for a dry run)")
    else:
        info["gpu"] = "none (CPU)"
        info["bf16"] = False
        if preset.name not in ("tiny", "cpu"):  # the two offline CPU presets
            advice.append(f"no GPU found but preset={preset.name!r}: on Colab choose Runtime > Change runtime type > "
                          "T4 GPU, or run preset='tiny' for the CPU dry run")
    info["compute_dtype"] = str(compute_dtype()).replace("torch.", "")
    info["fits"] = not any("GPU" in a for a in advice)
    token, info["hub_token"] = hub_token()
    gated = gated_models(preset)
    if gated and not token:
        advice.append(f"{', '.join(gated)} is gated: accept its licence on the hub and give this notebook your token "
                      f"({info['hub_token']}), or use preset='t4', whose models are ungated")
    missing = [lib for lib in LIBRARIES if info[lib] == "MISSING"]
    if missing:
        advice.append(f"missing libraries {missing}: run the install cell (Colab) or `make install`")
    info["advice"] = advice
    width = max(len(k) for k in info)
    for k, v in info.items():
        if k != "advice":
            echo(f"{k:<{width}}  {v}")
    echo("ready." if not advice else "\n".join(["to do:"] + [f"  - {a}" for a in advice]))
    return info


if __name__ == "__main__":
    from sawyer.presets import get_preset

    preflight(get_preset(sys.argv[1] if len(sys.argv) > 1 else "auto"))
