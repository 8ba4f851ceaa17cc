"""`infmllm-gguf serve`: an OpenAI-compatible server whose conversations stream through a bounded cache.

`api` checks requests, `conversations` finds, keeps, saves and restores the conversations, `app`
is the FastAPI application; `static/index.html` is the web page.
"""
