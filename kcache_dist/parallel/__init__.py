"""Process groups and collectives: the only code that reads launcher environment or touches
torch.distributed. Model layers call `tp_rank()`, `tp_size()` and the collectives below."""

from .state import tp_rank, tp_size, world_size
from .collectives import tp_all_reduce, tp_gather_last_dim

__all__ = ["tp_rank", "tp_size", "world_size", "tp_all_reduce", "tp_gather_last_dim"]
