"""Mixtral (`mixtral`): Llama attention, every layer a mixture of experts without a shared expert; the config names
the expert count `num_local_experts` and each expert's width `intermediate_size` (there is no dense MLP). The
router always renormalises its top-k weights. See moe.py for the structures."""
from .moe import MoEAdapter


class MixtralAdapter(MoEAdapter):
    model_types = ("mixtral",)
    experts_key = "num_local_experts"
    expert_width_key = "intermediate_size"
    dense_width_key = None
