#!/usr/bin/env bash
# Create .venv with everything this project needs (pinned). Usage: bash setup.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")"
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
