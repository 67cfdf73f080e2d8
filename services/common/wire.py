"""Conversions between our frozen types and protobuf messages: protobuf stops here."""

from __future__ import annotations

from alignedserve.common.kv_layout import KVLayout
from alignedserve.common.proto import common_pb2
from alignedserve.common.sampling_params import SamplingParams


def sampling_to_proto(p: SamplingParams) -> common_pb2.SamplingParams:
    msg = common_pb2.SamplingParams(
        max_tokens=p.max_tokens,
        temperature=p.temperature,
        top_p=p.top_p,
        top_k=p.top_k,
        stop_token_ids=list(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        logprobs=p.logprobs,
        is_default_max_tokens=p.is_default_max_tokens,
        min_p=p.min_p,
        logit_bias=dict(p.logit_bias),
    )
    if p.seed is not None:
        msg.seed = p.seed
    return msg


def sampling_from_proto(msg: common_pb2.SamplingParams) -> SamplingParams:
    """Validates (InvalidRequestError naming the field), like any SamplingParams."""
    return SamplingParams(
        max_tokens=msg.max_tokens,
        temperature=msg.temperature,
        top_p=msg.top_p,
        top_k=msg.top_k,
        seed=msg.seed if msg.HasField("seed") else None,
        stop_token_ids=tuple(msg.stop_token_ids),
        ignore_eos=msg.ignore_eos,
        logprobs=msg.logprobs,
        is_default_max_tokens=msg.is_default_max_tokens,
        min_p=msg.min_p,
        logit_bias=tuple(sorted(msg.logit_bias.items())),
    )


def layout_to_proto(layout: KVLayout) -> common_pb2.KVLayout:
    return common_pb2.KVLayout(
        num_layers=layout.num_layers,
        num_kv_heads=layout.num_kv_heads,
        head_dim=layout.head_dim,
        block_tokens=layout.block_tokens,
        dtype=layout.dtype,
    )


def layout_from_proto(msg: common_pb2.KVLayout) -> KVLayout:
    return KVLayout(
        num_layers=msg.num_layers,
        num_kv_heads=msg.num_kv_heads,
        head_dim=msg.head_dim,
        block_tokens=msg.block_tokens,
        dtype=msg.dtype,
    )
