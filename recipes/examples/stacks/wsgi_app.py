"""A plain WSGI app for gunicorn; with --preload the model is loaded once, in the
arbiter, and the forked workers share its pages."""

import json

import model

MODEL = model.load()


def app(environ, start_response):
    if environ["PATH_INFO"] == "/infer":
        length = int(environ.get("CONTENT_LENGTH") or 0)
        text = json.loads(environ["wsgi.input"].read(length) or b"{}").get("text", "hello")
        body = json.dumps(model.answer(MODEL, text), sort_keys=True).encode()
    else:
        body = b'{"ok": true}'
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
