"""An OpenAI-compatible HTTP server for our models, with a web playground.

Read in this order:

    schemas.py    the request and response bodies of ``/v1/completions`` and
                  ``/v1/chat/completions`` (OpenAI's shapes)
    errors.py     errors in OpenAI's ``{"error": {...}}`` shape, and the handlers that make them
    limits.py     what one request may ask for (body size, prompt, max_tokens, n, queue)
    jobs.py       one request, for either endpoint: its settings (`gpt2.sampling.SamplingParams`),
                  its choices, its answer, whole or streamed
    completions.py  ``/v1/completions``: prompts in, ``text_completion`` bodies out
    chat_completions.py  ``/v1/chat/completions``: messages through the chat template (`gpt2.chat`)
                  in, ``chat.completion`` bodies out
    scheduler.py  the worker thread: admits requests into slots and decodes them together, by the
                  library's decode loop (`gpt2.decode.Decoder`)
    app.py        the FastAPI application: routes, auth, body limit, streaming
    static/       the playground page (plain HTML, CSS and JavaScript; no build step)

FastAPI and uvicorn come with the optional ``serve`` extra: ``pip install -e ".[serve]"``.
"""
