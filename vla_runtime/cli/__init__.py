"""Hydra entry points; configs ship as the package vla_runtime.configs (the repo's configs/)."""

CONFIG_MODULE = "vla_runtime.configs"
CONFIG_PATH = f"pkg://{CONFIG_MODULE}"
