"""kcache_dist: tensor-parallel LLM serving with KCache attention (K in GPU memory, V in host memory)."""

from .config import EngineConfig, KCacheConfig, ParallelConfig
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import RequestOutputKind, SamplingParams

__all__ = ["LLM", "SamplingParams", "RequestOutputKind", "EngineConfig", "KCacheConfig", "ParallelConfig",
           "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
