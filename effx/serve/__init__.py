"""``effx serve``: any Program or artifact behind an OpenAI-compatible HTTP API, with continuous batching.

* :mod:`effx.serve.server`: open a source with the front end and run the server (uvicorn).
* :mod:`effx.serve.app`: the FastAPI app, its routes and its errors; :mod:`effx.serve.schemas` the OpenAI
  request and response bodies; :mod:`effx.serve.text` tokens to streamed text and stop strings.
* :mod:`effx.serve.engine`: the worker thread that owns the model (continuous batching, or one request at a
  time for pipelines that decide per step); :mod:`effx.serve.batch` the running batch's KV cache.
* :mod:`effx.serve.metrics`: what ``GET /metrics`` reports.

It needs the ``serve`` extra (``pip install "effx[serve]"``: FastAPI, uvicorn, prometheus-client).
"""
