"""`fleetmind client serve`: the site's OpenAI-compatible endpoint, which serves the active
version (embedded, or through an upstream such as vLLM), swaps in each new version without
a restart, and captures every completed conversation as a session in the site's store.

    settings.py   ServeConfig, validated once
    protocol.py   the Chat Completions wire format: requests, errors, responses
    active.py     which version a request gets; which adapters may be unloaded
    engine.py     the embedded engine (transformers + PEFT adapters)
    proxy.py      the proxy engine (an upstream OpenAI-compatible server)
    capture.py    conversations into the session store, off the response path
    metrics.py    Prometheus metrics
    app.py        the FastAPI app
    runner.py     uvicorn, in the foreground or on a background thread
    cli.py        `client serve`, `client sessions`, `client forget`
"""
