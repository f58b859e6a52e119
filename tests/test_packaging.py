"""The wheel a user installs (`pip install .`, what scripts/setup.sh runs) holds every module, config and shipped
checkpoint of the repository, and building it prints no warning about undeclared packages."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Repository folder -> where its files sit inside the wheel.
SHIPPED = {"vla_runtime": "vla_runtime", "configs": "vla_runtime/configs", "checkpoints": "vla_runtime/checkpoints"}


def tracked_files(*paths: str) -> list[str]:
    listing = subprocess.run(["git", "ls-files", *paths], cwd=REPO, capture_output=True, text=True)
    if listing.returncode != 0:
        pytest.skip("not a git checkout: the tracked files are unknown")
    return listing.stdout.split()


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> tuple[set[str], str]:
    """(the names inside the wheel, the build's log), built from a copy of the tracked files alone, so that neither
    an old build/ folder nor an untracked file can hide a missing one."""
    source = tmp_path_factory.mktemp("source")
    for name in tracked_files():
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation",
                            "-w", str(out), str(source)], capture_output=True, text=True)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (path,) = out.glob("vla_runtime-*.whl")
    return set(zipfile.ZipFile(path).namelist()), build.stdout + build.stderr


def test_every_module_config_and_checkpoint_file_is_in_the_wheel(wheel):
    names, _ = wheel
    expected = []
    for name in tracked_files(*SHIPPED):
        folder, rest = name.split("/", 1)
        expected.append(f"{SHIPPED[folder]}/{rest}")
    missing = [name for name in expected if name not in names]
    assert not missing, f"not in the wheel: {missing}"
    assert any(name.endswith(".py") for name in expected) and any(name.endswith(".safetensors") for name in expected)
    assert not [name for name in names if name.startswith(("tests/", "benchmarks/", "scripts/"))]


def test_the_build_warns_about_no_undeclared_package(wheel):
    _, log = wheel
    assert "Package would be ignored" not in log and "absent from the `packages` configuration" not in log
