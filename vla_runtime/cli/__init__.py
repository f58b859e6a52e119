"""Hydra entry points; configs ship as the package vla_runtime.configs (the repo's configs/)."""

CONFIG_PATH = "pkg://vla_runtime.configs"
