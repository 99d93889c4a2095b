"""FastAPI serving sentence embeddings from a transformers model (AutoTokenizer and
AutoModel, mean pooling), for `uvicorn --workers N`: each worker loads the model from
$MODEL_DIR when it imports this module, and encodes once before it serves."""

import hashlib
import os
import struct

import torch
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import AutoModel, AutoTokenizer

torch.set_num_threads(1)
MODEL_DIR = os.environ["MODEL_DIR"]
tokenizer = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
model = AutoModel.from_pretrained(MODEL_DIR, local_files_only=True).eval()


def embed(text: str) -> list[float]:
    with torch.inference_mode():
        batch = tokenizer([text], padding=True, truncation=True, return_tensors="pt")
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1)
        return torch.nn.functional.normalize(pooled, dim=1)[0].tolist()


embed("A first sentence, to warm the tokenizer and the kernels.")
app = FastAPI()


class Query(BaseModel):
    text: str = "hello"


@app.get("/healthz")
def healthz() -> dict:
    return {"ok": True}


@app.post("/infer")
def infer(q: Query) -> dict:
    vector = embed(q.text)
    return {"answer": hashlib.sha256(struct.pack(f"{len(vector)}f", *vector)).hexdigest()[:32], "dim": len(vector),
            "first": round(vector[0], 6)}
