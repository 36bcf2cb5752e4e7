"""Mixture-of-experts decoders: the Llama attention, and in place of the MLP a router over E experts (transformers 5
stores them stacked: gate_up_proj [E, 2I, H] with rows [gate (I) | up (I)] per expert, down_proj [E, H, I]).

Structures, besides heads and KV groups (names as in plans and `layer_widths`):
  experts     whole experts: router row e and slab e of both stacked tensors. The router must keep picking top-k
              among the kept experts with the same weights, which softmax over the kept logits gives exactly; a
              masked model (`mask_hooks`) sets removed experts' logits to -inf, which is what the cut model computes.
  expert_mlp  each expert's own channels, numbered e * I + j (an ExpertTensor's flat dim); every kept expert keeps
              the same count, its own best ones.
  mlp         a dense MLP, in layers that have one instead of experts (Qwen MoE `mlp_only_layers`); 0 elsewhere.
  shared_mlp  Qwen2-MoE's always-on shared expert (its own width); 0 where absent.
Importance of an expert (calibration hook on the experts module): the sum over the tokens routed to it of routing
weight x ||expert output||, i.e. how much it actually writes into the residual stream; router frequency alone
ignores how much an expert says. Channels inside experts: |W| x ||X|| over the tokens routed to that expert (X the
expert's input for gate/up rows, the routing-weighted intermediate activation for down columns), as for dense MLPs.

Checkpoints: save_pretrained writes one tensor per expert (experts.{e}.w1/w3/w2 for Mixtral, gate/up/down_proj for
Qwen), which transformers 4.57 reads directly; `load_state` stacks them back for lopper.load.
"""
from __future__ import annotations

import logging
import re
from collections import defaultdict
from functools import partial
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from .base import Adapter, ExpertTensor, Part

log = logging.getLogger("lopper")


class MoEAdapter(Adapter):
    experts_key: ClassVar[str] = "num_experts"  # config field: experts per layer
    expert_width_key: ClassVar[str] = "moe_intermediate_size"  # config field: channels per expert
    dense_width_key: ClassVar[str | None] = "intermediate_size"  # config field: dense-MLP layers' width
    shared: ClassVar[bool] = False  # Qwen2-MoE: a shared expert beside the routed ones
    # transformers' default experts kernel (torch grouped_mm) needs 16-byte strides: 8 bf16 channels
    width_multiple = 8

    def moe(self, layer: nn.Module) -> nn.Module | None:
        return layer.mlp if hasattr(layer.mlp, "experts") else None

    def mlp_in(self, layer: nn.Module) -> list[nn.Linear]:
        return [] if self.moe(layer) else super().mlp_in(layer)

    def mlp_out(self, layer: nn.Module) -> nn.Linear | None:
        return None if self.moe(layer) else super().mlp_out(layer)

    def mlp_parts(self, layer: nn.Module) -> list[Part]:
        return [] if self.moe(layer) else super().mlp_parts(layer)

    def readers(self, layer: nn.Module) -> list[nn.Linear]:
        moe, extra = self.moe(layer), []
        if moe is not None and self.shared:
            extra = [moe.shared_expert.gate_proj, moe.shared_expert.up_proj, moe.shared_expert_gate]
        return super().readers(layer) + extra

    def writers(self, layer: nn.Module) -> list[nn.Linear]:
        moe = self.moe(layer)
        if moe is None:
            return super().writers(layer)
        return [self.attention(layer).o_proj] + ([moe.shared_expert.down_proj] if self.shared else [])

    def _stacked(self, moe: nn.Module) -> tuple[ExpertTensor, ExpertTensor]:
        return ExpertTensor.of(moe.experts, "gate_up_proj", 1), ExpertTensor.of(moe.experts, "down_proj", 2)

    def hidden_parts(self) -> list[Part]:
        parts = super().hidden_parts()
        for layer in self.layers():
            moe = self.moe(layer)
            if moe is not None:
                gate_up, down = self._stacked(moe)
                parts += [Part(moe.gate, 1), Part(gate_up, 2), Part(down, 1)]
        return parts

    def extra_parts(self, layer: nn.Module) -> dict[str, list[Part]]:
        parts: dict[str, list[Part]] = {"experts": [], "expert_mlp": []} | ({"shared_mlp": []} if self.shared else {})
        moe = self.moe(layer)
        if moe is None:
            return parts
        gate_up, down = self._stacked(moe)
        per = moe.experts.down_proj.shape[2]
        parts["experts"] = [Part(moe.gate, 0), Part(gate_up, 0), Part(down, 0)]
        parts["expert_mlp"] = [Part(gate_up, 1, per_expert=per), Part(gate_up, 1, offset=per, per_expert=per),
                               Part(down, 2, per_expert=per)]
        if self.shared:
            s = moe.shared_expert
            parts["shared_mlp"] = [Part(s.gate_proj, 0), Part(s.up_proj, 0), Part(s.down_proj, 1)]
        return parts

    def layer_widths(self, layer: nn.Module) -> dict[str, int]:
        d, a, moe = self.head_dim(), self.attention(layer), self.moe(layer)
        widths = {"heads": a.q_proj.weight.shape[0] // d, "kv_heads": a.k_proj.weight.shape[0] // d,
                  "mlp": 0 if moe else layer.mlp.down_proj.weight.shape[1],
                  "experts": moe.experts.down_proj.shape[0] if moe else 0,
                  "expert_mlp": moe.experts.down_proj.shape[0] * moe.experts.down_proj.shape[2] if moe else 0}
        if self.shared:
            widths["shared_mlp"] = moe.shared_expert.down_proj.weight.shape[1] if moe else 0
        return widths

    def set_layer_attrs(self, layer: nn.Module, index: int) -> None:
        super().set_layer_attrs(layer, index)
        moe = self.moe(layer)
        if moe is not None:
            n, inner2, hidden = moe.experts.gate_up_proj.shape
            moe.experts.num_experts, moe.experts.hidden_dim, moe.experts.intermediate_dim = n, hidden, inner2 // 2
            moe.gate.num_experts, moe.gate.hidden_dim = n, hidden

    def finish(self, standard: bool) -> None:
        super().finish(standard)
        for moe in filter(None, map(self.moe, self.layers())):
            _, inner2, hidden = moe.experts.gate_up_proj.shape
            if (inner2 // 2) % 8 or hidden % 8:
                log.warning("experts of %d channels over hidden %d: transformers' default grouped_mm experts kernel "
                            "needs multiples of 8; load with experts_implementation='eager' or prune to multiples "
                            "of 8 (--round-to 8)", inner2 // 2, hidden)
                return

    # ---- masking and scoring --------------------------------------------------------------------------------------
    def mask_hooks(self, layer: nn.Module, removed: dict[str, list[int]]) -> list:
        moe = self.moe(layer)
        if moe is None or not removed.get("experts"):
            return []
        return [moe.gate.register_forward_hook(partial(_route_without, gone=torch.tensor(removed["experts"])))]

    def calibration_hooks(self, store: dict) -> list:
        return [moe.experts.register_forward_hook(partial(_expert_sums, store=store))
                for moe in map(self.moe, self.layers()) if moe is not None]

    def custom_scores(self, index: int, layer: nn.Module, key: str, store: dict, metric: str):
        moe = self.moe(layer)
        if metric not in ("activation", "fluctuation") or moe is None or id(moe.experts) not in store:
            return None
        sums = store[id(moe.experts)]
        if key == "experts":
            return sums["out"].clone()
        if key != "expert_mlp":
            return None
        gate_up, down = moe.experts.gate_up_proj.detach().float().abs(), moe.experts.down_proj.detach().float().abs()
        per = down.shape[2]
        rows = (gate_up * sums["x_sq"].sqrt()[:, None, :].to(gate_up.device)).sum(2)  # [E, 2I]
        cols = (down * sums["h_sq"].sqrt()[:, None, :].to(down.device)).sum(1)  # [E, I]
        return (rows[:, :per] + rows[:, per:] + cols).flatten().cpu()

    # ---- config and checkpoints -----------------------------------------------------------------------------------
    def config_updates(self, widths: dict[str, int], kept_layers: list[int], hidden_before: int) -> dict:
        upd = super().config_updates(widths, kept_layers, hidden_before)
        upd.pop("intermediate_size")
        if widths["mlp"] and self.dense_width_key:
            upd[self.dense_width_key] = widths["mlp"]
        if widths["experts"]:
            upd[self.experts_key] = widths["experts"]
            upd[self.expert_width_key] = widths["expert_mlp"] // widths["experts"]
        if widths.get("shared_mlp"):
            upd["shared_expert_intermediate_size"] = widths["shared_mlp"]
        if kept_layers != list(range(self.config.num_hidden_layers)) and hasattr(self.config, "mlp_only_layers"):
            # which layers are dense follows the new numbering: list them all, every other layer sparse
            upd["mlp_only_layers"] = [j for j, layer in enumerate(self.layers()) if self.moe(layer) is None]
            upd["decoder_sparse_step"] = 1
        return upd

    def load_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Stack per-expert tensors (experts.{e}.{w1|gate_proj}, {w3|up_proj}, {w2|down_proj}) into gate_up_proj
        [E, 2I, H] and down_proj [E, H, I]; Mixtral's block_sparse_moe is the model's `mlp`."""
        pattern = re.compile(r"(.*)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$")
        role = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down", "down_proj": "down"}
        out, stacks = {}, defaultdict(dict)
        for name, t in state.items():
            name = name.replace(".block_sparse_moe.", ".mlp.")
            m = pattern.match(name)
            if m:
                stacks[m.group(1)][(int(m.group(2)), role[m.group(3)])] = t
            else:
                out[name] = t
        for prefix, parts in stacks.items():
            n = 1 + max(e for e, _ in parts)
            out[f"{prefix}.experts.gate_up_proj"] = torch.stack(
                [torch.cat([parts[(e, "gate")], parts[(e, "up")]]) for e in range(n)])
            out[f"{prefix}.experts.down_proj"] = torch.stack([parts[(e, "down")] for e in range(n)])
        return out


def _route_without(router: nn.Module, args, output, gone: torch.Tensor):
    """The router's top-k routing with the `gone` experts' logits at -inf: softmax over the rest, as after the cut."""
    x = args[0].reshape(-1, router.weight.shape[1])
    logits = F.linear(x, router.weight)
    logits[:, gone.to(logits.device)] = float("-inf")
    top, idx = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float), router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):  # Mixtral always renormalises; Qwen MoE when configured
        top = top / top.sum(-1, keepdim=True)
    return logits, top.to(output[1].dtype), idx


@torch.no_grad()
def _expert_sums(experts: nn.Module, args, output, store: dict) -> None:
    """Per expert, over the tokens routed to it: sum of routing weight x ||output|| ("out" [E]), of squared inputs
    ("x_sq" [E, H]) and of squared routing-weighted intermediate activations ("h_sq" [E, I])."""
    x, index, weight = args[0].float(), args[1], args[2].float()
    n, inner2, hidden = experts.gate_up_proj.shape
    s = store.setdefault(id(experts), {"out": torch.zeros(n), "x_sq": torch.zeros(n, hidden),
                                       "h_sq": torch.zeros(n, inner2 // 2)})
    for e in index.unique().tolist():
        tok, pos = (index == e).nonzero(as_tuple=True)
        xe, g = x[tok], weight[tok, pos][:, None]
        gate, up = F.linear(xe, experts.gate_up_proj[e].float()).chunk(2, dim=-1)
        h = experts.act_fn(gate) * up * g  # [tokens, I]: what down_proj reads, scaled as the output is
        y = F.linear(h, experts.down_proj[e].float())
        s["out"][e] += y.norm(dim=-1).sum().cpu()
        s["x_sq"][e] += xe.pow(2).sum(0).cpu()
        s["h_sq"][e] += h.pow(2).sum(0).cpu()
