"""An OpenAI-compatible HTTP server for our models, with a web playground.

Read in this order:

    schemas.py    the request and response bodies of ``/v1/completions`` (OpenAI's shapes)
    errors.py     errors in OpenAI's ``{"error": {...}}`` shape, and the handlers that make them
    limits.py     what one request may ask for (body size, prompt, max_tokens, n, queue)
    sampling.py   per-request sampling over a batch of logits (temperature, top_p, penalties, seeds)
    engine.py     next-token logits for many sequences at once (prefill a slot, decode a batch)
    scheduler.py  the worker thread: admits requests into slots and decodes them together
    text.py       token ids to text as they come: UTF-8 safe, stop strings held back and cut
    app.py        the FastAPI application: routes, auth, body limit, streaming
    static/       the playground page (plain HTML, CSS and JavaScript; no build step)

FastAPI and uvicorn come with the optional ``serve`` extra: ``pip install -e ".[serve]"``.
"""
