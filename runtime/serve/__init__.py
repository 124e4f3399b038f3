"""``edgecap serve``: the HTTP service (native, OpenAI- and Ollama-compatible routes) over one
Captioner, its micro-batcher, its limits and its security."""
