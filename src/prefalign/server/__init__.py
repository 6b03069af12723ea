"""``prefalign serve``: an OpenAI-compatible chat API with per-request preferences.

>>> from prefalign import Aligner
>>> from prefalign.server import create_app
>>> app = create_app(Aligner.from_pretrained(), api_key=None, max_batch=16)
>>> # uvicorn.run(app, host="127.0.0.1", port=8000)

See ``docs/server.md``.
"""

from __future__ import annotations

from .app import ServerConfig, create_app, default_model_id
from .errors import APIError
from .scheduler import Job, QueueFullError, Scheduler

__all__ = ["APIError", "Job", "QueueFullError", "Scheduler", "ServerConfig", "create_app", "default_model_id"]
