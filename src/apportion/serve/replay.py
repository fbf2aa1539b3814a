"""A sample bank served as an OpenAI-compatible model (`apportion replay-serve`).

Each question's recorded samples are served without replacement in a seeded order, with their
real token counts and log-probabilities (see ``apportion.lm.replay``): a client, or apportion
itself over HTTP, then runs on recorded samples exactly as on the live model. Requests match a
question on their last user message (or raw prompt text); the bank's stored prompts
(``BankEntry.prompt``) show what to send. The samples were drawn once, under the bank's own
sampling settings: a request's temperature, top_p, max_tokens, stop and seed select nothing and
re-sample nothing. A question asked for more samples than were recorded gets a 410.
"""

from __future__ import annotations

from pathlib import Path

from starlette.applications import Starlette

from apportion.banks import SampleBank, open_bank
from apportion.lm.replay import ReplayBackend
from apportion.serve.openai_app import openai_app


def replay_app(bank: str | Path | SampleBank, *, seed: int = 0, model: str | None = None) -> Starlette:
    """The OpenAI app over ``ReplayBackend(bank, seed=seed)``, named ``model`` (default: the bank's
    recorded model name, else "bank")."""
    loaded = bank if isinstance(bank, SampleBank) else open_bank(bank)
    backend = ReplayBackend(loaded, seed=seed, model=model)
    return openai_app(backend)
