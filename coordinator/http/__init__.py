"""The coordinator's OpenAI-compatible HTTP API (`--http-listen`), served by the same
frontend processes as gRPC and through the same request path (Coordinator.generate):

    server.py     uvicorn on the frontend's event loop, the port shared by the workers
    app.py        the FastAPI routes: /v1/completions, /v1/chat/completions, /v1/models,
                  /health, /ready, /metrics; the API key and the body size limit
    protocol.py   the OpenAI request bodies, their checks, and GenerateRequests from them
    calls.py      one HTTP request's choices run as coordinator requests, cancelled together
    responses.py  OpenAI response bodies and server-sent-event chunks
    errors.py     OpenAI error objects and the gRPC status -> HTTP status mapping"""
