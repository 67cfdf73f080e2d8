"""The one KV block format used end to end (CPU pool, prefetch staging, decode GPU).

A block holds `block_tokens` consecutive tokens of ONE request for ALL layers, K and V:

    block[layer, kv, token, kv_head, head_dim]        kv: 0 = K, 1 = V

so a request's KV is a list of large contiguous blocks, and moving a request between memories
is copying whole blocks, never re-laying them out. Within a block, a token's K (or V) for one
layer is one contiguous kv_heads x head_dim row, so appending a decoded token is one write.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignedserve.common.errors import ConfigError
from alignedserve.common.model_config import DTYPES, ModelConfig


@dataclass(frozen=True)
class KVLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_tokens: int
    dtype: str  # float32 | float16 | bfloat16

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"KVLayout.dtype={self.dtype!r} not one of {list(DTYPES)}")
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"KVLayout.{name}={getattr(self, name)} must be > 0")

    @classmethod
    def for_model(cls, config: ModelConfig, block_tokens: int = 16, dtype: str | None = None):
        return cls(
            num_layers=config.num_layers,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            block_tokens=block_tokens,
            dtype=dtype or config.dtype,
        )

    @property
    def block_shape(self) -> tuple[int, int, int, int, int]:
        return (self.num_layers, 2, self.block_tokens, self.num_kv_heads, self.head_dim)

    @property
    def block_bytes(self) -> int:
        n = 1
        for d in self.block_shape:
            n *= d
        return n * DTYPES[self.dtype]

    @property
    def token_bytes(self) -> int:
        """KV bytes of one token over all layers, K and V."""
        return self.block_bytes // self.block_tokens

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.block_tokens)
