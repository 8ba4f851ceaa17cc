"""`infmllm-gguf serve`: an OpenAI-compatible server whose conversations stream through a bounded cache.

`api` checks request bodies (the shapes of replies are `openai_format`'s, shared with `Llama`);
`jobs` says what each route's request does (`ChatJob`, `CompletionJob`) and `runner` runs them
(`RequestRunner`: admitted, in a worker thread, replied whole or streamed); `conversations` finds
them (`ConversationStore`) over `admission` (slots and the queue), `live` (the live set, least
recently used out) and `journal` (the turn logs, the snapshots, restores); `metrics`, `middleware`
(body limit, API key), `schema` (the OpenAPI schema as the server answers) and `app`
(`create_app`: the routes) make the FastAPI application;
`static/index.html` is the web page.
"""
