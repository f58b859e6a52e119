"""Headless CPU rendering for MuJoCo: EGL (surfaceless) first, OSMesa as the fallback.

MuJoCo reads MUJOCO_GL when its GL module is first imported, so this runs before anything imports
mujoco's renderer (vla_runtime.sim does it on import).
"""

from __future__ import annotations

import ctypes.util
import os

_APT_HINT = "apt-get install -y libegl1 libegl-mesa0 libgl1-mesa-dri (EGL) or libosmesa6 (OSMesa)"


def configure_headless_gl() -> str:
    """Pick a headless GL backend unless the user already chose one; returns the backend name."""
    if os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    if ctypes.util.find_library("EGL"):
        os.environ["MUJOCO_GL"] = "egl"
        os.environ.setdefault("EGL_PLATFORM", "surfaceless")
        # PyOpenGL must agree with MuJoCo, or it binds GLX and fails without a display.
        os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    elif ctypes.util.find_library("OSMesa"):
        os.environ["MUJOCO_GL"] = "osmesa"
        os.environ.setdefault("PYOPENGL_PLATFORM", "osmesa")
    else:
        raise RuntimeError(f"No headless OpenGL library found for MuJoCo rendering. Install one: {_APT_HINT}")
    return os.environ["MUJOCO_GL"]
