"""The OpenAI-compatible HTTP API and /metrics of a frontend: `openai` (request bodies and response objects),
`app` (the routes, over `Frontend.generate`), `server` (uvicorn on the frontend actor's loop)."""
