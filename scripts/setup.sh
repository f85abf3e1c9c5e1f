#!/usr/bin/env bash
# One-time set-up, safe to re-run: FFmpeg's shared libraries, a .venv, torch + torchvision from this
# machine's disk, then video-r2 with its test extra. A second run finds the stamp and returns in seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
# The torch/torchvision pair that pip finds on this machine's disk (see README "Installing").
TORCH_SPEC=${TORCH_SPEC:-"torch==2.14.1 torchvision==0.29.1"}
STAMP="$VENV/.video-r2-installed"

# 1. FFmpeg's shared libraries, which torchcodec loads at import time.
if ! ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so'; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup] installing FFmpeg's libraries with apt-get (about 20 s)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "[setup] FFmpeg's shared libraries are missing and this is not root with apt-get." >&2
    echo "        Install FFmpeg 4-7 (e.g. 'sudo apt-get install ffmpeg' or 'conda install ffmpeg') and re-run." >&2
    exit 1
  fi
fi

# 2. The virtual environment, rebuilt only when pyproject.toml changed since the last install.
if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
echo "[setup] installing $TORCH_SPEC and video-r2[test] into $VENV (about 2 minutes the first time)"
# shellcheck disable=SC2086
"$VENV/bin/pip" install -q --disable-pip-version-check $TORCH_SPEC -e ".[test]"
touch "$STAMP"
echo "[setup] done: $VENV is ready"
