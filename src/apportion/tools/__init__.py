"""Tools a model's output can use, run apart from the model and charged as tool calls."""

from apportion.tools.metered import MeteredSandbox
from apportion.tools.sandbox import ProgramRun, SandboxError, SandboxLimits, run_python

__all__ = ["MeteredSandbox", "ProgramRun", "SandboxError", "SandboxLimits", "run_python"]
