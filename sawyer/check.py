"""Pre-flight check, the first code cell of every notebook: is this machine ready for this preset?

    from sawyer.check import preflight
    preflight(preset)          # prints a short table and what to do about anything missing

It reports the GPU and its memory, bf16 support and the dtype the course will compute in, whether the
preset's models should fit, the versions of sawyer and the key libraries, and whether a hub token is
present (never its value). ``python -m sawyer.check [preset]`` prints the same from a terminal.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import sys

import torch

import sawyer
from sawyer.loading import compute_dtype

#: Rough peak GPU memory (GiB) each preset needs on its largest stage (see BENCHMARKS.md for measurements).
NEEDS_GIB = {"tiny": 0.0, "t4": 12.0, "a100": 14.5}
LIBRARIES = ("torch", "transformers", "peft", "trl", "datasets", "accelerate", "bitsandbytes", "papermill")


def _version(name: str) -> str:
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "MISSING"


def gated_models(preset) -> list[str]:
    """Hub ids in the preset that need a licence click-through and a token (Meta's Llama family)."""
    ids = [preset.sft.base_model, preset.summary.policy]
    return [m for m in ids if m.startswith("meta-llama/")]


def hub_login(preset, *, echo=print) -> bool:
    """Log in to the hub only when the preset uses a gated model; returns whether it logged in.

    The token comes from the ``HF_TOKEN`` environment variable or, on Colab, the ``HF_TOKEN`` secret
    (key icon in the left bar). It is passed to ``huggingface_hub.login`` and never printed.
    """
    gated = gated_models(preset)
    if not gated:
        echo(f"preset {preset.name!r} uses no gated model: no hub login needed")
        return False
    token = os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")
    if not token:
        try:
            from google.colab import userdata  # type: ignore[import-not-found]

            token = userdata.get("HF_TOKEN")
        except Exception:  # not on Colab, or the secret is missing / not shared with this notebook
            token = None
    if not token:
        raise RuntimeError(f"{', '.join(gated)} is gated: accept its licence on its hub page, then add your token as "
                           "the HF_TOKEN secret (Colab) or environment variable; or use preset='t4', whose base "
                           "model is ungated")
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
        info["bf16"] = torch.cuda.is_bf16_supported()
        if info["gpu_memory_gib"] < NEEDS_GIB.get(preset.name, 0):
            advice.append(f"the {preset.name} preset needs about {NEEDS_GIB[preset.name]} GiB of GPU memory; this GPU "
                          f"has {info['gpu_memory_gib']}: use preset='t4' (or 'tiny' for a dry run)")
    else:
        info["gpu"] = "none (CPU)"
        info["bf16"] = False
        if preset.name != "tiny":
            advice.append(f"no GPU found but preset={preset.name!r}: on Colab choose Runtime > Change runtime type > "
                          "T4 GPU, or run preset='tiny' for the CPU dry run")
    info["compute_dtype"] = str(compute_dtype()).replace("torch.", "")
    info["fits"] = not any("GPU" in a for a in advice)
    info["hub_token"] = "present" if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN")) else "absent"
    gated = gated_models(preset)
    if gated and info["hub_token"] == "absent":
        advice.append(f"{', '.join(gated)} is gated: accept its licence on the hub and add an HF_TOKEN secret "
                      "(Colab: key icon), or use preset='t4', whose models are ungated")
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
