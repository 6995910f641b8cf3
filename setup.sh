#!/usr/bin/env bash
# Create .venv with everything this project needs (pinned). Usage: bash setup.sh [--dev | --compat]
set -euo pipefail
cd "$(dirname "$0")"
# ---- compat pin set (issue 11) -----------------------------------------------------------------
# bash setup.sh --compat: .venv-compat with requirements-compat.txt, the versions of NVIDIA's
# TensorRT-LLM release image (transformers 4.56, huggingface_hub<1, pillow 10.3, numpy<2).
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
