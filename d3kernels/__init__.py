"""d3kernels: fused kernels and an engine for Position-Aware Depth Decay Decoding (D³)."""
from d3kernels.chat import Conversation, Turn
from d3kernels.config import PRESETS, LlamaConfig
from d3kernels.engine import Engine, EngineStats, Request
from d3kernels.generation import GenerationOutput, StreamedToken, generate, generate_stream
from d3kernels.kv_cache import KVCache
from d3kernels.model import LlamaD3
from d3kernels.schedule import DepthSchedule
from d3kernels.stats import GenerationStats

__all__ = ["Conversation", "DepthSchedule", "Engine", "EngineStats", "GenerationOutput",
           "GenerationStats", "KVCache", "LlamaConfig", "LlamaD3", "PRESETS", "Request",
           "StreamedToken", "Turn", "generate", "generate_stream"]
