"""A Vulkan driver for SAPIEN on machines without a GPU.

SAPIEN 3 renders only through Vulkan. Debian bookworm's own lavapipe (Mesa 22.3) is too old for it; Mesa
25's works. `scripts/setup.sh --simpler` unpacks that driver into the venv (share/vla_runtime/lavapipe)
instead of upgrading the system's Mesa, which MuJoCo's EGL rendering uses, and only where the machine has
no Vulkan driver of its own. A machine with a GPU driver keeps it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

SYSTEM_ICD_DIRS = ("/usr/share/vulkan/icd.d", "/etc/vulkan/icd.d", "/usr/local/share/vulkan/icd.d")


def bundled_icd() -> Path:
    return Path(sys.prefix) / "share" / "vla_runtime" / "lavapipe" / "lvp_icd.json"


def configure_vulkan() -> str | None:
    """Points the Vulkan loader at the bundled lavapipe when nothing else is chosen or installed; returns
    the ICD file in use (None: the loader's own search)."""
    for variable in ("VK_ICD_FILENAMES", "VK_DRIVER_FILES"):
        if os.environ.get(variable):
            return os.environ[variable]
    if any(Path(folder).is_dir() and any(Path(folder).glob("*.json")) for folder in SYSTEM_ICD_DIRS):
        return None
    if bundled_icd().is_file():
        os.environ["VK_ICD_FILENAMES"] = str(bundled_icd())
        return os.environ["VK_ICD_FILENAMES"]
    return None
