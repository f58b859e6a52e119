#!/usr/bin/env bash
# Set up vla_runtime on a fresh Debian machine: rendering libraries (apt, only those missing), a venv
# in .venv, torch, then the project. `--dev` installs it editable with the test tools and every extra.
#   bash scripts/setup.sh           # users: the project as a package
#   bash scripts/setup.sh --ros     # users: plus ROS 2 (rclpy wheels, MCAP): vla-robot, the control node
#   bash scripts/setup.sh --libero  # users: plus the LIBERO simulator and its assets (~650 MB): sim=libero
#   bash scripts/setup.sh --dev     # developers and CI: editable, plus pytest, ruff, ROS 2 and LIBERO
set -euo pipefail
cd "$(dirname "$0")/.."

rendering_packages=(libegl1 libegl-mesa0 libgl1-mesa-dri libosmesa6)
missing=()
for package in "${rendering_packages[@]}"; do
    dpkg -s "$package" >/dev/null 2>&1 || missing+=("$package")
done
if [ ${#missing[@]} -gt 0 ]; then
    sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
    echo "Installing rendering libraries: ${missing[*]}"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: this machine has a CPU build of 2.13.0 on disk, and the project's own range would
# otherwise let pip fetch a multi-GB CUDA build. A venv that already has a torch (yours, with CUDA)
# keeps it.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
case "${1:-}" in
    --dev) .venv/bin/python -m pip install -q -e ".[dev,ros,libero]" ;;
    --ros) .venv/bin/python -m pip install -q ".[ros]" ;;
    --libero) .venv/bin/python -m pip install -q ".[libero]" ;;
    "") .venv/bin/python -m pip install -q . ;;
    *) echo "usage: bash scripts/setup.sh [--dev | --ros | --libero]" >&2; exit 2 ;;
esac
