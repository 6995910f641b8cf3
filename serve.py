#!/usr/bin/env python3
"""An OpenAI-compatible image server for UniDiffuser, with dynamic batching and a web page.

    python serve.py --model-dir model                  # http://127.0.0.1:8000/ (docs/server.md)
    python serve.py --model-dir model --host 0.0.0.0 --api-key KEY --device cuda:1
"""
from unidiffuser import cli
from unidiffuser.server.main import main

if __name__ == "__main__":
    cli.run(main)
