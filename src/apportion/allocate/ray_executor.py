"""A batch's rounds on a Ray cluster: each prompt's round is a Ray task running ``remote.run_job``.

Ray is optional (``pip install 'apportion[ray]'``). The accounting is ``RemoteExecutor``'s: the
driver holds each round's allowance before the task is sent and settles it with what the worker
spent, so results and spend are those of the local executor. A task is never retried: a retry
would spend again what its first attempt may already have spent.
"""

from __future__ import annotations

import asyncio
from typing import Any

from apportion.allocate.executors import JobNotSent, RemoteExecutor, brief
from apportion.allocate.remote import Job, Reply, run_job
from apportion.errors import ConfigError


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError("--executor ray needs Ray: pip install 'apportion[ray]' (or pip install ray)") from None
    return ray


class RayExecutor(RemoteExecutor):
    """Jobs as Ray tasks. Joins the Ray instance this process already started; otherwise connects
    to ``address`` (None: a cluster named by $RAY_ADDRESS, else a new local instance), and
    ``close`` shuts down only what it started."""

    def __init__(self, address: str | None = None, *, cpus_per_job: float = 1.0) -> None:
        self._ray = import_ray()
        self._started = False
        if not self._ray.is_initialized():
            try:
                self._ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, ValueError, RuntimeError) as exc:
                raise ConfigError(f"cannot connect to Ray at {address or 'a new local instance'}: {exc}") from None
            self._started = True
        self._task = self._ray.remote(num_cpus=cpus_per_job, max_retries=0)(run_job)
        super().__init__(self._send)

    async def _send(self, job: Job) -> Reply:
        try:
            ref = self._task.remote(job)
        except Exception as exc:  # not serialisable, or no cluster: the task never started
            raise JobNotSent(f"could not send the job to Ray: {brief(exc)}") from exc
        try:
            reply: Reply = await ref
        except asyncio.CancelledError:
            self._ray.cancel(ref, force=True)  # do not let it spend on after the driver gave up on it
            raise
        return reply

    def close(self) -> None:
        if self._started and self._ray.is_initialized():
            self._ray.shutdown()
        self._started = False
