#!/usr/bin/env bash
# Create .venv with everything this project needs (pinned). Usage: bash setup.sh [--dev | --compat]
set -euo pipefail
cd "$(dirname "$0")"
# ---- compat pin set (issue 11) -----------------------------------------------------------------
# bash setup.sh --compat: .venv-compat with requirements-compat.txt, the versions of NVIDIA's
# TensorRT-LLM 1.2 release image (transformers 4.57.3, huggingface_hub<1, numpy<2).
# CI (.ci/run) runs the CPU suite under both pin sets.
if [ "${1:-}" = "--compat" ]; then
  python3 -m venv .venv-compat
  . .venv-compat/bin/activate
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-compat.txt
  python -m pip install -q --no-deps openai-clip==1.0.1
  exit 0
fi
# ---- end compat pin set -------------------------------------------------------------------------
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
if [ "${1:-}" = "--dev" ]; then
  python -m pip install -q -r requirements-dev.txt
else
  python -m pip install -q -r requirements.txt
fi
# OpenAI's CLIP package ships the BPE vocabulary the offline tokenizer is built from. Its other
# requirements (torchvision among them) are not needed: it is located, never imported.
python -m pip install -q --no-deps openai-clip==1.0.1
# --- GroupNorm plugin (issue 9) --------------------------------------------------------------
# The fast path's decoder uses plugin/'s fused GroupNorm+SiLU when the library is built; without
# it torch's ops run (on an H100 28.7 ms instead of 9 ms per 512x512 image). Needs nvcc + CMake.
NVCC="$(command -v nvcc || true)"
[ -z "$NVCC" ] && [ -x /usr/local/cuda/bin/nvcc ] && NVCC=/usr/local/cuda/bin/nvcc
if [ -n "$NVCC" ] && command -v cmake >/dev/null 2>&1; then
  if cmake -S plugin -B plugin/build -DCMAKE_CUDA_COMPILER="$NVCC" >plugin-build.log 2>&1 \
     && cmake --build plugin/build -j >>plugin-build.log 2>&1; then
    echo "built plugin/build/libunidiffuser_plugins.so (fused GroupNorm for the decoder)"
    rm -f plugin-build.log
  else
    echo "warning: the GroupNorm plugin did not build (see plugin-build.log); the decoder will use torch's GroupNorm, ~3x slower"
  fi
else
  echo "skipping the GroupNorm plugin (needs nvcc and cmake): on a GPU the decoder then uses torch's GroupNorm (28.7 ms instead of 9 ms per 512x512 image on an H100); build it later with: cmake -S plugin -B plugin/build && cmake --build plugin/build"
fi
# --- end GroupNorm plugin ------------------------------------------------------------------------
