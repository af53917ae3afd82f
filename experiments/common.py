"""Pieces shared by the experiment binaries: the small base LM they start from, "train it here unless it is
already there", and finished-record caching.

The small base LM is ``lm_tiny`` shrunk to the 2-CPU size of the reproduction plans in hamburger.md and
liger.md (d 64, 4 blocks, bytes of Python at T 128, batch 16): 500 steps train in ~80 s on two quiet cores.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

# The small base LM and "train it here unless it is there" live in sqattn (notebooks use them too).
from sqattn.configs.lm import small_lm as small_lm_config  # noqa: E402,F401
from sqattn.train import train_or_load  # noqa: E402,F401


def digest(obj) -> str:
    """8 hex digits naming a settings dict (a run directory per settings, never reused for others)."""
    import hashlib
    import json
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def cached_record(path: str, key: Any, compute: Callable[[], dict]) -> tuple[dict, bool]:
    """The record saved at ``path`` for settings ``key``, or ``compute()`` saved there.

    A file written with other settings is recomputed and overwritten, so a finished piece of a long run is
    reused exactly when the flags that shaped it are the same.

    Returns:
      ``(record, reused)``.
    """
    key = json.loads(json.dumps(key))     # as it reads back (tuples become lists)
    if os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError):
            saved = {}                    # a truncated file from a killed run: recompute it
        if saved.get("settings") == key and "record" in saved:
            return saved["record"], True
    record = compute()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"settings": key, "record": record}, f, indent=2)
    os.replace(tmp, path)
    return record, False


def quiet_logging() -> None:
    """Progress bars and results only: sqattn and absl loggers at WARNING."""
    import logging
    from absl import logging as absl_logging
    logging.getLogger("sqattn").setLevel(logging.WARNING)
    absl_logging.set_verbosity(absl_logging.WARNING)
