"""FastAPI, served by `uvicorn --workers 2` (each worker loads the model on import)."""

from fastapi import FastAPI
from pydantic import BaseModel

import model

MODEL = model.load()
app = FastAPI()


class Query(BaseModel):
    text: str = "hello"


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/infer")
def infer(q: Query) -> dict:
    return model.answer(MODEL, q.text)
