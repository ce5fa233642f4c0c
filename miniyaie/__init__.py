"""Mini-YAIE: a small, readable, fast SGLang-style inference engine.

    from miniyaie import Engine, EngineConfig, SamplingParams
"""
from miniyaie.config import EngineConfig
from miniyaie.engine import Engine, QueueFull
from miniyaie.request import GenerationOutput, RequestOutput, SamplingParams

__all__ = ["Engine", "EngineConfig", "GenerationOutput", "QueueFull", "RequestOutput", "SamplingParams"]
