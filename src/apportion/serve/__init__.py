"""Serving apportion backends over the OpenAI protocol (``replay-serve``, the overhead benchmark's
mock server)."""

from apportion.serve.openai_app import openai_app
from apportion.serve.replay import replay_app
from apportion.serve.runner import ServedApp, serve, uvicorn_config

__all__ = ["ServedApp", "openai_app", "replay_app", "serve", "uvicorn_config"]
