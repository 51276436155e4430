"""The Hugging Face settings of the user's environment: the token (HF_TOKEN, else the token
file where huggingface_hub keeps it). Read without importing huggingface_hub or syncbit's
sources: the CLI sends it with `pull` and `dataset add` and starts ~0.08 s sooner. Standard
library only.
"""

from __future__ import annotations

import os


def token_from_env() -> str | None:
    """HF_TOKEN, else the token file as huggingface_hub finds it (read now, not at import)."""
    for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        value = os.environ.get(var, "").strip()
        if value:
            return value
    path = os.environ.get("HF_TOKEN_PATH")
    if not path:
        home = os.environ.get("HF_HOME") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
            "huggingface",
        )
        path = os.path.join(os.path.expanduser(os.path.expandvars(home)), "token")
    try:
        with open(os.path.expanduser(path), encoding="utf-8") as f:
            value = f.read().strip()
    except OSError:
        return None
    return value or None


__all__ = ["token_from_env"]
