"""SAWYER: the helper package of the SAWYER alignment workshop (SFT -> reward model -> PPO -> evaluation).

Notebooks tell the story; this package holds the tricky parts, one module per concern
(see the file tree in README.md). Import what you need, e.g. ``from sawyer import ppo``.
"""
import logging as _logging
import os as _os

__version__ = "0.1.0"

# bitsandbytes' CPU backend tries to fetch an optional faster kernel from the hub and warns when it cannot;
# it then uses its built-in kernel, so offline the warning is expected noise for workshop attendees.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)

# Our code calls transformers' current activation-checkpointing API; peft (get_peft_model,
# prepare_model_for_kbit_training) and trl still call the old names, whose FutureWarning attendees cannot act on.
import warnings as _warnings  # noqa: E402

_warnings.filterwarnings("ignore", category=FutureWarning,
                         message=r"`(is_gradient_checkpointing|gradient_checkpointing_(enable|disable))` is deprecated")


class _PlainText(_logging.Filter):
    """transformers' LOAD REPORT hard-codes ANSI bold even when not writing to a terminal: keep the report (it says
    which weights are new, e.g. a reward model's fresh head), drop the escape codes that litter saved notebooks."""

    def filter(self, record: _logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and "\x1b[" in record.msg:
            import re

            record.msg = re.sub(r"\x1b\[[0-9;]*m", "", record.msg)
        return True


_logging.getLogger("transformers.modeling_utils").addFilter(_PlainText())

# Tests and the offline dry run set SAWYER_NETGUARD=1: any socket to a non-loopback address then
# raises, inside notebook kernels too (they import sawyer), which proves the course runs offline.
if _os.environ.get("SAWYER_NETGUARD") == "1":
    from sawyer import netguard as _netguard

    _netguard.install()

from pathlib import Path as _Path

#: The repository's ``data/`` folder: small offline samples in the exact schema of each hub dataset.
DATA_DIR = _Path(__file__).resolve().parent.parent / "data"
