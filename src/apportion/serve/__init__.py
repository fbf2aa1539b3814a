"""Serving over the OpenAI protocol: every algorithm (``apportion serve``), a backend alone
(``replay-serve``, the overhead benchmark's mock server)."""

from apportion.serve.algorithm_app import ServeOptions, algorithm_app
from apportion.serve.openai_app import openai_app
from apportion.serve.replay import replay_app
from apportion.serve.runner import ServedApp, serve, uvicorn_config

__all__ = ["ServeOptions", "ServedApp", "algorithm_app", "openai_app", "replay_app", "serve", "uvicorn_config"]
