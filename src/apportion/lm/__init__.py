"""Backends behind one async protocol, and the metered view algorithms call them through."""

from apportion.lm.base import Backend, Capabilities, Completion, Message, Prompt, Sample, SamplingParams
from apportion.lm.llama_embedded import EmbeddedOptions, LlamaEmbeddedBackend, default_model_path
from apportion.lm.metered import MeteredLM
from apportion.lm.openai_http import HTTPOptions, OpenAIHTTPBackend
from apportion.lm.scripted import Reply, ScriptedBackend

__all__ = ["Backend", "Capabilities", "Completion", "EmbeddedOptions", "HTTPOptions", "LlamaEmbeddedBackend",
           "Message", "MeteredLM", "OpenAIHTTPBackend", "Prompt", "Reply", "Sample", "SamplingParams",
           "ScriptedBackend", "default_model_path"]
