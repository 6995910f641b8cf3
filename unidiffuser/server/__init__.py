"""An OpenAI-compatible image server over the Python API, with dynamic batching and a web page.

    python serve.py --model-dir model            # then http://127.0.0.1:8000/ (docs/server.md)

Modules: main (the command: arguments, loading, warm-up, signals), state (the settings and what
the routes share), app (the routes), gate (loopback Host, same-origin POSTs, the API key, the
request counter), parsing (JSON bodies and every parameter's checks), uploads (multipart bodies,
the image's checks), responses (outputs as JSON, the error response), batcher (merging requests
into model calls in one worker thread), tasks (what a batch runs, as a table), metrics
(Prometheus text), errors (OpenAI's error object), bench (HTTP against the Python API). Nothing
here imports torch until the model is loaded.
"""
