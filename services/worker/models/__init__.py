"""Model families, written with Hugging Face parameter names so checkpoints load by name."""

from alignedserve.worker.models.llama import LlamaForCausalLM
from alignedserve.worker.models.opt import OPTForCausalLM

FAMILIES = {"llama": LlamaForCausalLM, "opt": OPTForCausalLM}

__all__ = ["FAMILIES", "LlamaForCausalLM", "OPTForCausalLM"]
