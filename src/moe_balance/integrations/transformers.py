"""Loss-Free Balancing for HuggingFace transformers MoE models (transformers >= 5).

Shape legend: T tokens, D hidden size, E experts, K experts per token.

    model = AutoModelForCausalLM.from_pretrained(path)
    enable_loss_free(model, update_rate=1e-3)      # every MoE router: a float32 selection bias
    ... loss.backward(); optimizer.step(); update_balancers(model)   # or LossFreeCallback

In transformers 5 each MoE block's ``mlp.gate`` is a router module returning (router_logits,
top-k weights, top-k indices). ``enable_loss_free`` turns each supported router into a
subclass of its own class (so transformers still records its logits for the aux loss), whose
forward keeps the family's routing exactly (score function, top-k normalisation, group-limited
selection, scaling factor, dtypes) and selects with moe_balance's ``biased_selection``: the
bias changes which experts are chosen, never the weights. Counting uses the core layer's
contract (``observe_on_backward``): training forwards only, once per forward even under
gradient checkpointing, summed over ``process_group`` before each update.

The bias is DeepSeek-V3's ``e_score_correction_bias`` (the loaded checkpoint's bias is the
starting point) or, for the families without one, a new buffer under the same name, all
float32. NOTE: transformers 5 masks the experts outside DeepSeek-V3's best groups with -inf,
as moe_balance does, so the outputs equal the original model's for any bias; transformers 4
masked with 0, which differs whenever a biased score is negative.
"""

from __future__ import annotations

import importlib
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .._optional import require
from ..balancing import LossFreeBalancer, expert_counts, update_balancers
from ..config import LossFree
from ..metrics import max_vio
from ..moe import observe_on_backward
from ..routing import biased_selection, slots_to_mask
from ._loads import recording_loads

BIAS = "e_score_correction_bias"


@dataclass(frozen=True)
class Family:
    """How one model family routes (read from its transformers 5 router's forward)."""

    name: str
    module: str            # transformers.models.<module>
    router: str            # the router class name
    score_fn: str          # "softmax" or "sigmoid"
    float32_logits: bool   # the gate matmul runs in float32 (else in the model's dtype)
    normalize: str         # "always", or "flag": when the router's norm_topk_prob is set
    weights_in_logits_dtype: bool  # the top-k weights are cast back to the logits' dtype
    group_limited: bool    # DeepSeek-V3's n_group / topk_group selection
    sorted_topk: bool      # torch.topk(sorted=...) as the family calls it
    has_bias: bool         # the router already has e_score_correction_bias
    scaled: bool = False   # the weights are multiplied by the router's routed_scaling_factor
    norm_eps: float = 0.0  # added to the sum the top-k weights are normalised by

    @property
    def router_class(self) -> type:
        return getattr(importlib.import_module(f"transformers.models.{self.module}"), self.router)


FAMILIES = (
    Family("Mixtral", "mixtral.modeling_mixtral", "MixtralTopKRouter", "softmax", False, "always", False, False,
           True, False),
    Family("Qwen2-MoE", "qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter", "softmax", False, "flag", True,
           False, True, False),
    Family("Qwen3-MoE", "qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter", "softmax", False, "flag", True,
           False, True, False),
    Family("OLMoE", "olmoe.modeling_olmoe", "OlmoeTopKRouter", "softmax", False, "flag", True, False, True, False),
    Family("DeepSeek-V3", "deepseek_v3.modeling_deepseek_v3", "DeepseekV3TopkRouter", "sigmoid", True, "flag",
           False, True, False, True, scaled=True, norm_eps=1e-20),
)


class LossFreeRouter(nn.Module):
    """Mixed into a family's router class by ``enable_loss_free`` (never built directly).

    ``balancer``: the ``LossFreeBalancer`` whose ``expert_bias`` (E,) float32 is the selection
    bias; its state appears in the state dict as ``<router>.e_score_correction_bias`` only.
    ``recorded_loads``: (E,) int64 running count while ``record_loads`` is active, else None.
    """

    family: Family
    balancer: LossFreeBalancer
    recorded_loads: torch.Tensor | None

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        return self.balancer.expert_bias

    def forward(self, hidden_states: torch.Tensor):
        fam = self.family
        x_TD = hidden_states.reshape(-1, self.hidden_dim)
        if fam.float32_logits:
            logits_TE = F.linear(x_TD.float(), self.weight.float())
        else:
            logits_TE = F.linear(x_TD, self.weight)
        scores_TE = logits_TE.float().sigmoid() if fam.score_fn == "sigmoid" else \
            torch.softmax(logits_TE.float(), dim=-1)
        groups = dict(num_groups=self.num_group, topk_groups=self.topk_group) if fam.group_limited else {}
        bias_E = self.balancer.expert_bias
        selection_TE = biased_selection(scores_TE, bias_E, **groups)
        selected_TK = selection_TE.topk(self.top_k, dim=-1, sorted=fam.sorted_topk).indices
        weights_TK = scores_TE.gather(1, selected_TK)
        if fam.normalize == "always" or self.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + fam.norm_eps)
        if fam.scaled:
            weights_TK = weights_TK * self.routed_scaling_factor
        if fam.weights_in_logits_dtype:
            weights_TK = weights_TK.to(logits_TE.dtype)

        observed = self.training and torch.is_grad_enabled()
        if self.recorded_loads is None and not observed:
            return logits_TE, weights_TK, selected_TK
        counts_E = expert_counts(selected_TK, self.num_experts)
        if self.recorded_loads is not None:
            self.recorded_loads += counts_E.to(self.recorded_loads.device)
        if observed:
            stats = None
            if self.balancer.spec.rule == "adaptive":
                selected_TE = slots_to_mask(selected_TK, self.num_experts)
                stats = self.balancer.margin_stats(scores_TE.detach(), selection_TE.detach(), selected_TE)
            weights_TK = observe_on_backward(weights_TK, counts_E.detach(), [self.balancer], [stats],
                                             anchor=hidden_states)
        return logits_TE, weights_TK, selected_TK


def _state_dict_hook(module, state_dict, prefix, local_metadata):
    """Only the bias leaves the router, under the family's own key (DeepSeek-V3's name)."""
    for key in [k for k in state_dict if k.startswith(prefix + "balancer.")]:
        del state_dict[key]
    state_dict[prefix + BIAS] = module.balancer.expert_bias.detach().clone()
    return state_dict


def _load_hook(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
    """Take ``<router>.e_score_correction_bias`` into the balancer; the balancer's counters
    are per-run state, absent from transformers checkpoints: keep their current values."""
    if prefix + BIAS in state_dict:
        state_dict[prefix + "balancer.expert_bias"] = state_dict.pop(prefix + BIAS).float()
    for name, value in module.balancer.state_dict().items():
        state_dict.setdefault(prefix + "balancer." + name, value)


_SUBCLASSES: dict[type, type] = {}


def _loss_free_class(family: Family, base: type) -> type:
    if base not in _SUBCLASSES:
        _SUBCLASSES[base] = type(f"LossFree{base.__name__}", (LossFreeRouter, base), {"family": family})
    return _SUBCLASSES[base]


def supported_routers(model: nn.Module) -> list[tuple[str, nn.Module, Family]]:
    """(name, router, family) of every supported MoE router in ``model``, in module order."""
    classes = []
    for fam in FAMILIES:
        try:
            classes.append((fam.router_class, fam))
        except (ImportError, AttributeError):  # a transformers without this family
            continue
    found = []
    for name, module in model.named_modules():
        if isinstance(module, LossFreeRouter):
            found.append((name, module, module.family))
            continue
        for cls, fam in classes:
            if type(module) is cls:
                found.append((name, module, fam))
                break
    return found


def _family_names() -> str:
    return ", ".join(f"{f.name} ({f.router})" for f in FAMILIES)


def enable_loss_free(model: nn.Module, update_rate: float = 1e-3, *, rule: str = "sign",
                     spec: LossFree | None = None, process_group=None,
                     bias_from: str | None = None) -> nn.Module:
    """Give every MoE router of a transformers model a float32 Loss-Free bias; in place.

    update_rate / rule: the paper's update (``LossFree(update_rate, rule)``); or a whole
    ``LossFree`` ``spec`` (additive form only: these models add the bias). process_group: the
    data-parallel group whose counts make the global batch (None: this process only).
    bias_from: a directory written by ``save_pretrained`` of an enabled model: its biases are
    loaded (needed for the families transformers gives no bias, whose key plain transformers
    skips on loading; DeepSeek-V3's loads by itself).

    Raises ValueError when the model has no supported router (naming the families).
    """
    spec = spec if spec is not None else LossFree(update_rate=update_rate, rule=rule)
    if spec.form != "additive":
        raise ValueError("enable_loss_free adds the bias to the scores (form='additive'); "
                         f"got LossFree(form={spec.form!r})")
    routers = supported_routers(model)
    if not routers:
        raise ValueError(f"enable_loss_free found no supported MoE router in {type(model).__name__}; "
                         f"supported families (transformers >= 5): {_family_names()}")
    for name, router, fam in routers:
        if isinstance(router, LossFreeRouter):
            raise ValueError(f"Loss-Free is already enabled on {type(model).__name__} (router {name!r}); "
                             "call disable(model) first to change its settings")
    saved = _read_biases(bias_from, model) if bias_from is not None else {}
    for name, router, fam in routers:
        balancer = LossFreeBalancer(spec, router.num_experts).to(router.weight.device)
        balancer.process_group = process_group
        start = saved.get(f"{name}.{BIAS}")
        if start is None and fam.has_bias:
            start = router._buffers.pop(BIAS)  # the checkpoint's bias is the starting point
        if start is not None:
            if start.shape != balancer.expert_bias.shape:
                raise ValueError(f"{name}: bias of shape {tuple(start.shape)} for {router.num_experts} experts")
            balancer.expert_bias.copy_(start.float())
        router._buffers.pop(BIAS, None)
        router.__class__ = _loss_free_class(fam, type(router))
        router.balancer = balancer
        router.recorded_loads = None
        router._loss_free_hooks = (router._register_state_dict_hook(_state_dict_hook),
                                   router.register_load_state_dict_pre_hook(_load_hook))
    return model


def disable(model: nn.Module) -> dict[str, torch.Tensor]:
    """Give every router back its transformers class; returns {router name: bias}. DeepSeek-V3
    keeps the updated bias as its ``e_score_correction_bias``; the other families have nowhere
    to keep it (route with ``enable_loss_free(..., bias_from=...)`` to use it again)."""
    biases = {}
    for name, router, fam in supported_routers(model):
        if not isinstance(router, LossFreeRouter):
            continue
        bias = router.balancer.expert_bias.detach().clone()
        biases[name] = bias
        for handle in router._loss_free_hooks:
            handle.remove()
        del router._modules["balancer"]
        for attr in ("recorded_loads", "_loss_free_hooks"):
            router.__dict__.pop(attr, None)
        router.__class__ = next(b for b in type(router).__bases__ if b is not LossFreeRouter)
        if fam.has_bias:
            router.register_buffer(BIAS, bias)
    return biases


def _read_biases(path: str, model: nn.Module) -> dict[str, torch.Tensor]:
    """The biases in a save_pretrained directory, keyed by the model's own key names."""
    from pathlib import Path

    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise ValueError(f"bias_from={str(path)!r} holds no .safetensors files (a save_pretrained directory)")
    to_model_key = _checkpoint_key_renamer(model)
    biases = {}
    for f in files:
        biases.update({to_model_key(k): v for k, v in load_file(str(f)).items() if k.endswith("." + BIAS)})
    return biases


def _checkpoint_key_renamer(model: nn.Module):
    """Checkpoint key -> model key. NOTE: transformers 5 saves some families under their legacy
    names (Mixtral's ``block_sparse_moe``) and renames them when loading; the same renaming is
    applied here, with transformers' own conversion mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without checkpoint conversions: keys are as saved
        return lambda key: key
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if not isinstance(t, WeightRenaming)]
    return lambda key: rename_source_key(key, renamings, converters)[0]


def loss_free_routers(model: nn.Module) -> list[LossFreeRouter]:
    return [m for m in model.modules() if isinstance(m, LossFreeRouter)]


@contextmanager
def record_loads(model: nn.Module):
    """Count the experts chosen by every forward inside the block (training or not); yields a
    list filled on exit with each MoE layer's (E,) int64 loads."""
    routers = loss_free_routers(model)
    if not routers:
        raise ValueError("record_loads needs enable_loss_free(model) first")
    with recording_loads(routers) as loads:
        yield loads


def pending_loads(model: nn.Module) -> list[torch.Tensor]:
    """Each layer's (E,) counts observed since the last update (this rank's)."""
    return [r.balancer.pending_counts.clone() for r in loss_free_routers(model)]


class LossFreeCallback(require("transformers", "the transformers integration").TrainerCallback):
    """A ``transformers.TrainerCallback``: after every optimizer step, update every bias
    (``update_balancers``) and keep the step's MaxVio; each log line then gets
    ``maxvio_batch`` (mean over layers of the steps since the last log) and
    ``maxvio_batch/layer_<i>``.

    Add it before the loggers read the line: ``trainer.add_callback`` appends after them, so
    use ``LossFreeCallback.attach(trainer)``.
    """

    def __init__(self):
        self.updates = 0
        self._vio: list[torch.Tensor] = []

    @classmethod
    def attach(cls, trainer) -> "LossFreeCallback":
        """Insert a new callback ahead of the reporting ones and return it."""
        callback = cls()
        trainer.callback_handler.callbacks.insert(0, callback)
        return callback

    def on_step_end(self, args, state, control, model=None, **kwargs):
        loads = pending_loads(model)
        if loads and int(torch.stack(loads).sum()):
            self._vio.append(max_vio(torch.stack(loads)).cpu())
        update_balancers(model)
        self.updates += 1
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._vio:
            vio_L = torch.stack(self._vio).mean(0)
            logs["maxvio_batch"] = float(vio_L.mean())
            logs.update({f"maxvio_batch/layer_{i}": float(v) for i, v in enumerate(vio_L)})
            self._vio.clear()
        return control
