"""Package discovery (the rest of the build is in pyproject.toml): every package under vla_runtime/, and the
repository's configs/ and checkpoints/ shipped inside it as vla_runtime.configs and vla_runtime.checkpoints, so
the installed console scripts find them (hydra: pkg://vla_runtime.configs). Nothing is listed by hand: a new
module, config group or checkpoint folder is in the wheel without an edit here (tests/test_packaging.py)."""

from setuptools import find_namespace_packages, setup

SHIPPED = {"vla_runtime.configs": "configs", "vla_runtime.checkpoints": "checkpoints"}
packages = find_namespace_packages(include=["vla_runtime", "vla_runtime.*"], exclude=["*.__pycache__"])
for name, folder in SHIPPED.items():
    packages += [name] + [f"{name}.{sub}" for sub in find_namespace_packages(folder, exclude=["*.__pycache__"])]

setup(packages=packages, package_dir=SHIPPED)
