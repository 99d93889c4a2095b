"""An aiohttp application, served by gunicorn's aiohttp worker (the model is loaded
once, in the arbiter, with --preload)."""

from aiohttp import web

import model

MODEL = model.load()


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def infer(request: web.Request) -> web.Response:
    query = await request.json()
    return web.json_response(model.answer(MODEL, str(query.get("text", "hello"))))


app = web.Application()
app.add_routes([web.get("/healthz", healthz), web.post("/infer", infer)])
