"""The comparison point for small steps: a bare FastAPI async endpoint, served by the same uvicorn setup as
``optserve serve`` (same protocol class, same log level), that reads the body and answers a body of the same size."""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import Response

from optserve.service.bodies import HTTP_PROTOCOL

app = FastAPI()
ANSWER = b"\0" * int(sys.argv[2]) if len(sys.argv) > 2 else b""


@app.post("/bare")
async def bare(request: Request) -> Response:
    await request.body()
    return Response(ANSWER, media_type="application/x-safetensors")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", http=HTTP_PROTOCOL)
