"""Named balancing methods: a router setting plus a tuple of balancer specs, as data.

A ``Method`` is what an experiment compares: ``get_method("loss_free")`` gives the balancers
and router to put in a ``MoEConfig`` (``method.moe_config(d_model=..., ...)``). ``SWEEPS``
holds the paper's ablations (Wang et al. 2024, arXiv 2408.15664): the update rate u of
Loss-Free Balancing and the coefficient alpha of the auxiliary loss.

This module sits below the MoE layer and the model: it imports ``config`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import (AuxLoss, BalancerSpec, BALANCER_SPECS, DynamicLoss, LossFree, MoEConfig, ParameterPenalty,
                     RouterConfig, ZLoss, heterogeneous_widths)


LAYER_FIELDS = ("zero_experts", "copy_experts", "constant_experts", "expert_width_ratios")


@dataclass(frozen=True, kw_only=True)
class Method:
    """A named load-balancing recipe: balancer specs and the router they run with."""

    name: str
    description: str
    balancers: tuple[BalancerSpec, ...] = ()
    router: RouterConfig = field(default_factory=RouterConfig)
    reference: str = ""
    layer: dict = field(default_factory=dict)  # MoEConfig fields the method sets (MoE++ experts)

    @property
    def leaks_future(self) -> bool:
        """True when the router reads later tokens (expert choice): in a causal LM its loss and
        perplexity are not comparable with the other methods."""
        return self.router.method == "expert_choice"

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"Method.name={self.name!r} must be a non-empty string")
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"Method.router must be a RouterConfig, got {type(self.router).__name__}")
        if not (isinstance(self.balancers, tuple)
                and all(isinstance(s, BALANCER_SPECS) for s in self.balancers)):
            raise ValueError(f"Method.balancers={self.balancers!r} must be a tuple of "
                             "LossFree, AuxLoss, ZLoss, DynamicLoss or ParameterPenalty specs")
        unknown = set(self.layer) - set(LAYER_FIELDS)
        if unknown:
            raise ValueError(f"Method.layer sets {sorted(unknown)}; allowed: {', '.join(LAYER_FIELDS)}")
        if self.leaks_future and any(isinstance(s, LossFree) for s in self.balancers):
            raise ValueError(f"Method {self.name!r}: LossFree does not apply to expert-choice routing, "
                             "which is balanced by construction; remove the LossFree balancer")

    def moe_config(self, **layer) -> MoEConfig:
        """A ``MoEConfig`` with this method's router and balancers; ``layer`` gives the rest
        (d_model, num_experts, top_k, expert_hidden_size, ...)."""
        fields = {**self.layer, **layer}
        ratios = fields.pop("expert_width_ratios", None)
        if ratios:  # HMoE widths around the given expert_hidden_size
            fields["expert_hidden_sizes"] = heterogeneous_widths(ratios, fields["num_experts"],
                                                                 fields.pop("expert_hidden_size"))
        return MoEConfig(router=self.router, balancers=self.balancers, **fields)


_REGISTRY: dict[str, Method] = {}


def register_method(method: Method, *, replace: bool = False) -> Method:
    """Add a method to the registry (ValueError if the name is taken, unless ``replace``)."""
    if not isinstance(method, Method):
        raise ValueError(f"register_method expects a Method, got {type(method).__name__}")
    if method.name in _REGISTRY and not replace:
        raise ValueError(f"a method named {method.name!r} is already registered; "
                         "pass replace=True to overwrite it")
    _REGISTRY[method.name] = method
    return method


def get_method(name: str) -> Method:
    """The registered method called ``name``."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def list_methods() -> list[Method]:
    """Every registered method, in registration order."""
    return list(_REGISTRY.values())


def _tag(x: float) -> str:
    """1e-3 -> "1e-3", 0 -> "0": the suffix of generated method names."""
    if x == 0:
        return "0"
    mantissa, exponent = f"{x:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


# --------------------------------------------------------------------------------------------
# Recipes
# --------------------------------------------------------------------------------------------

LOSS_FREE_PAPER = ('Wang et al. 2024, "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts", '
                   "arXiv 2408.15664")
SWITCH_PAPER = "Fedus et al. 2021, Switch Transformers, arXiv 2101.03961 (eq. 4); GShard, arXiv 2006.16668"
DEEPSEEK_V3_PAPER = "DeepSeek-AI 2024, DeepSeek-V3 Technical Report, arXiv 2412.19437 (sec. 2.1.2)"
GLOBAL_BATCH_PAPER = 'Qiu et al. 2025, "Demons in the Detail", arXiv 2501.11873'
ST_MOE_PAPER = "Zoph et al. 2022, ST-MoE, arXiv 2202.08906 (eq. 5)"
EXPERT_CHOICE_PAPER = 'Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing", arXiv 2202.09368'
TOP_P_PAPER = 'Huang et al. 2024, "Harder Tasks Need More Experts: Dynamic Routing in MoE Models", arXiv 2403.07652'
MOGE_PAPER = 'Tang et al. 2025, "Pangu Pro MoE: Mixture of Grouped Experts", arXiv 2505.21411'
MOGE_GROUPS = 2  # divides every preset's num_experts (8, 32, 64) and top_k (2, 4, 6)
MOE_PLUS_PLUS_PAPER = ('Jin et al. 2024, "MoE++: Accelerating Mixture-of-Experts Methods with Zero-Computation '
                       'Experts", arXiv 2410.07348')
# MoE++ zero-computation experts beside the preset's FFN experts (the paper pairs 1 zero, 1 copy
# and 2 constant experts with 8-16 FFN experts)
MOE_PLUS_PLUS_LAYER = {"zero_experts": 1, "copy_experts": 1, "constant_experts": 2}
HMOE_PAPER = 'Wang et al. 2024, "HMoE: Heterogeneous Mixture of Experts for Language Modeling", arXiv 2408.10681'
# HMoE widths relative to the preset's expert width, repeated over the experts: mean 1, so the
# total expert parameters are those of the homogeneous layer (quick preset: 24, 72, 120, 168)
HMOE_WIDTH_RATIOS = (0.25, 0.75, 1.25, 1.75)

def no_balance() -> Method:
    return Method(name="no_balance", description="No balancing: plain top-K over sigmoid scores "
                  "(shows routing collapse).", reference=LOSS_FREE_PAPER)


def aux_loss(coeff: float = 1e-3, scope: str = "micro_batch", name: str | None = None) -> Method:
    """Switch/GShard auxiliary loss with the paper's sigmoid gate (the paper's baseline)."""
    return Method(
        name=name or f"aux_loss_{_tag(coeff)}",
        description=f"Auxiliary loss alpha={coeff:g} over the {scope.replace('_', ' ')}, sigmoid "
                    "gate" + (" (the Loss-Free paper's baseline)" if (coeff, scope) == (1e-3, "micro_batch") else "")
                    + ("; alpha=0 routes exactly like no_balance" if coeff == 0 else "") + ".",
        balancers=(AuxLoss(coeff=coeff, scope=scope),),
        reference={"micro_batch": SWITCH_PAPER, "sequence": DEEPSEEK_V3_PAPER, "global_batch": GLOBAL_BATCH_PAPER}[scope])


def loss_free(update_rate: float = 1e-3, rule: str = "sign", name: str | None = None,
              form: str = "additive") -> Method:
    """Auxiliary-Loss-Free Balancing (Algorithm 1), sigmoid gate."""
    formula = "u*sign(mean(c)-c_i)" if rule == "sign" else "u*(mean(c)-c_i)/mean(c)"
    selection = "top-K on score * b, b from 1" if form == "multiplicative" else "top-K on score + b"
    return Method(
        name=name or f"loss_free_u{_tag(update_rate)}",
        description=f"Loss-Free Balancing, u={update_rate:g}: after each step b_i += {formula}; "
                    f"{selection}; sigmoid gate.",
        balancers=(LossFree(update_rate=update_rate, rule=rule, form=form),), reference=LOSS_FREE_PAPER)


# Training from scratch, the harness's adaptive controller holds the bias through the early
# collapse and uses a faster gain than the library default (smoothing 0.9): 8 seeds of the quick
# preset measured both (README, "The quick preset").
ADAPTIVE_START_AFTER_STEPS = 50
ADAPTIVE_SMOOTHING = 0.7


def loss_free_adaptive(name: str = "loss_free_adaptive", form: str = "additive",
                       start_after_steps: int = ADAPTIVE_START_AFTER_STEPS,
                       smoothing: float = ADAPTIVE_SMOOTHING) -> Method:
    """Loss-Free Balancing with the adaptive controller (``moe_balance.controller``), started
    after ``start_after_steps`` steps, its gain's moving averages at ``smoothing``."""
    spec = LossFree(rule="adaptive", form=form, start_after_steps=start_after_steps, smoothing=smoothing)
    return Method(
        name=name,
        description="Loss-Free Balancing, adaptive controller: each bias moves by a gain times the "
                    "step that would have balanced its expert in the last step (read off the tokens "
                    "nearest its top-K threshold), the gain high while those steps keep their sign "
                    f"and low while they are noise (moving averages at smoothing={smoothing:g}); "
                    + (f"the bias is held at its start for the first {start_after_steps} steps; "
                       if start_after_steps else "the bias moves from the first step; ")
                    + "top-K on score "
                    f"{'* b' if form == 'multiplicative' else '+ b'}; sigmoid gate.",
        balancers=(spec,), reference=LOSS_FREE_PAPER + "; controller: moe_balance.controller")


def deepseek_v3() -> Method:
    """DeepSeek-V3's recipe (arXiv 2412.19437, sec. 2.1.2): Loss-Free bias plus a tiny
    sequence-wise aux loss, sigmoid scores with the selected gates normalised and scaled."""
    return Method(
        name="deepseek_v3",
        description="DeepSeek-V3: Loss-Free u=1e-3 + sequence-wise aux loss alpha=1e-4; sigmoid "
                    "gates normalised to sum 1 over the top-K, then times 2.5, so routed outputs "
                    "carry a total gate of 2.5 instead of the sum of raw sigmoid scores (about "
                    "K/2 at init): the effective gate scale differs from the other methods. "
                    "NOTE: group-limited routing and freezing u at the end are left to the run.",
        balancers=(LossFree(update_rate=1e-3), AuxLoss(coeff=1e-4, scope="sequence")),
        router=RouterConfig(score_fn="sigmoid", normalize_weights=True, scaling_factor=2.5),
        reference=DEEPSEEK_V3_PAPER)


def expert_choice(routing_batch_size: int | None = None, name: str = "expert_choice") -> Method:
    """Expert Choice: each expert takes its top C = 2 T / E tokens (EC-CF2), softmax scores."""
    shuffled = routing_batch_size is not None
    return Method(
        name=name,
        description="Expert choice (capacity factor 2: each expert takes its best 2T/E tokens, a token "
                    "gets 0..E experts, 2 on average); softmax scores, no balancer (balanced by "
                    "construction). LEAKS FUTURE TOKENS in a causal LM: perplexity not comparable"
                    + (f"; routed in shuffled groups of {routing_batch_size} tokens (the leak diluted, "
                       "not removed)" if shuffled else "") + ".",
        router=RouterConfig(method="expert_choice", score_fn="softmax", routing_batch_size=routing_batch_size,
                            shuffle_tokens=shuffled),
        reference=EXPERT_CHOICE_PAPER + (f"; shuffling: {LOSS_FREE_PAPER}, sec. 5.2" if shuffled else ""))


def top_p(loss_free: bool = False) -> Method:
    """Dynamic top-p routing, p = 0.4, softmax scores, with the paper's dynamic (entropy) loss."""
    balance = LossFree(rule="adaptive") if loss_free else AuxLoss(coeff=1e-3)
    return Method(
        name="top_p_loss_free" if loss_free else "top_p",
        description="Dynamic top-p (p=0.4): a token takes experts in descending softmax score until "
                    "their mass reaches 0.4; dynamic loss 1e-4 (entropy); "
                    + ("Loss-Free adaptive bias (picks which experts, never how many)." if loss_free
                       else "auxiliary loss alpha=1e-3."),
        router=RouterConfig(method="top_p", score_fn="softmax", top_p=0.4),
        balancers=(balance, DynamicLoss(coeff=1e-4)),
        reference=TOP_P_PAPER + (f"; bias: {LOSS_FREE_PAPER}" if loss_free else ""))


def moge(loss_free: bool = False) -> Method:
    """Mixture of Grouped Experts: K/M experts from each of M = 2 groups, sigmoid scores."""
    return Method(
        name="moge_loss_free" if loss_free else "moge",
        description=f"Mixture of Grouped Experts: experts in {MOGE_GROUPS} equal groups, each token takes "
                    f"top_k/{MOGE_GROUPS} in every group (equal group loads by construction); sigmoid gate; "
                    + ("Loss-Free adaptive bias within groups." if loss_free else "auxiliary loss alpha=1e-3."),
        router=RouterConfig(method="grouped", num_groups=MOGE_GROUPS),
        balancers=(LossFree(rule="adaptive"),) if loss_free else (AuxLoss(coeff=1e-3),),
        reference=MOGE_PAPER + (f"; bias: {LOSS_FREE_PAPER}" if loss_free else ""))


def moe_plus_plus(loss_free: bool = False) -> Method:
    """MoE++: 1 zero, 1 copy and 2 constant experts beside the FFN experts, gating residuals."""
    if loss_free:
        balance, what = LossFree(rule="adaptive", zero_computation_share=0.2), (
            "adaptive Loss-Free bias with per-kind targets: the zero-computation experts take 20% of "
            "the assignments together, the FFN experts equal shares of the rest")
    else:
        balance, what = AuxLoss(coeff=1e-3, zero_computation_weight=0.75), (
            "heterogeneous aux loss alpha=1e-3 with tau=0.75 on the zero-computation experts")
    return Method(
        name="moe_plus_plus_loss_free" if loss_free else "moe_plus_plus",
        description="MoE++: FFN experts plus 1 zero (drop), 1 copy (identity) and 2 constant (learned "
                    f"vector) experts, top-K over all; gating residuals between MoE layers; {what}; "
                    "sigmoid gate.",
        router=RouterConfig(gating_residual=True), balancers=(balance,), layer=dict(MOE_PLUS_PLUS_LAYER),
        reference=MOE_PLUS_PLUS_PAPER + (f"; bias: {LOSS_FREE_PAPER}" if loss_free else ""))


def hmoe(loss_free: bool = False) -> Method:
    """HMoE: experts of four widths (0.25x to 1.75x the preset's), same total parameters."""
    if loss_free:
        balancers, what = (LossFree(rule="adaptive", balance="compute"),), (
            "adaptive Loss-Free bias balancing compute (targets proportional to 1 / width)")
    else:
        balancers, what = (AuxLoss(coeff=1e-3), ParameterPenalty(coeff=1e-3)), (
            "auxiliary loss alpha=1e-3 plus the parameter penalty 1e-3 (favours small experts)")
    return Method(
        name="hmoe_loss_free" if loss_free else "hmoe",
        description="HMoE: routed experts of widths 0.25, 0.75, 1.25 and 1.75 times the preset's (the same "
                    f"total), top-K over them; {what}; sigmoid gate.",
        balancers=balancers, layer={"expert_width_ratios": HMOE_WIDTH_RATIOS},
        reference=HMOE_PAPER + (f"; bias: {LOSS_FREE_PAPER}" if loss_free else ""))


def z_loss() -> Method:
    """ST-MoE: router z-loss beside the auxiliary loss."""
    return Method(name="z_loss", description="Router z-loss 1e-3 (ST-MoE) + auxiliary loss "
                  "alpha=1e-3 over the micro-batch, sigmoid gate.",
                  balancers=(ZLoss(coeff=1e-3), AuxLoss(coeff=1e-3)), reference=ST_MOE_PAPER)


for _method in (
    no_balance(),
    aux_loss(1e-3, name="aux_loss"),
    aux_loss(1e-2), aux_loss(1e-3), aux_loss(1e-4), aux_loss(0.0),
    aux_loss(1e-3, "sequence", name="seq_aux"),
    aux_loss(1e-3, "global_batch", name="global_aux"),
    loss_free(1e-3, name="loss_free"),
    loss_free(1e-2), loss_free(1e-3), loss_free(1e-4),
    loss_free(1e-3, rule="error", name="loss_free_error"),
    loss_free_adaptive(),
    loss_free_adaptive(name="loss_free_adaptive_nohold", start_after_steps=0),  # the hold's ablation
    loss_free_adaptive(name="loss_free_adaptive_s09", smoothing=0.9),  # the gain's: the library's smoothing
    loss_free(1e-3, name="loss_free_mult", form="multiplicative"),
    loss_free_adaptive(name="loss_free_adaptive_mult", form="multiplicative"),
    deepseek_v3(),
    z_loss(),
    expert_choice(),
    expert_choice(routing_batch_size=512, name="expert_choice_shuffled"),
    top_p(), top_p(loss_free=True),
    moge(), moge(loss_free=True),
    moe_plus_plus(), moe_plus_plus(loss_free=True),
    hmoe(), hmoe(loss_free=True),
):
    register_method(_method)

# The paper's softmax-gate ablation of both methods.
register_method(Method(name="aux_loss_softmax", description="Auxiliary loss alpha=1e-3 over the "
                       "micro-batch, softmax gate.", balancers=(AuxLoss(coeff=1e-3),),
                       router=RouterConfig(score_fn="softmax"), reference=LOSS_FREE_PAPER))
register_method(Method(name="loss_free_softmax", description="Loss-Free Balancing u=1e-3, sign "
                       "rule, softmax gate.", balancers=(LossFree(update_rate=1e-3),),
                       router=RouterConfig(score_fn="softmax"), reference=LOSS_FREE_PAPER))

SWEEPS: dict[str, list[Method]] = {
    # The paper's update-rate ablation: 1e-4 balances too slowly early, 1e-2 oscillates late.
    "update_rate": [get_method(f"loss_free_u{_tag(u)}") for u in (1e-4, 1e-3, 1e-2)],
    # The paper's aux-loss dilemma: more alpha, better balance, worse perplexity.
    "aux_coeff": [get_method(f"aux_loss_{_tag(a)}") for a in (1e-2, 1e-3, 1e-4, 0.0)],
    # The bias controllers side by side: the paper's sign rule at three u, its raw-error
    # ablation, and the adaptive controller with and without its 50-step hold and with the
    # library's slower gain (smoothing 0.9); the aux-loss baseline for reference.
    "controller": [get_method(n) for n in ("aux_loss", "loss_free_u1e-4", "loss_free", "loss_free_u1e-2",
                                           "loss_free_error", "loss_free_adaptive", "loss_free_adaptive_nohold",
                                           "loss_free_adaptive_s09")],
    # The paper's additive vs multiplicative bias, for the sign rule and the adaptive controller.
    "form": [get_method(n) for n in ("loss_free_u1e-3", "loss_free_mult", "loss_free_adaptive",
                                     "loss_free_adaptive_mult")],
    # The routers that balance differently, beside top-K with the aux loss and with Loss-Free.
    "routers": [get_method(n) for n in ("aux_loss", "loss_free_adaptive", "expert_choice", "top_p",
                                        "top_p_loss_free", "moge", "moge_loss_free")],
    # Experts that are not all alike: MoE++ zero-computation experts beside plain top-K.
    "experts": [get_method(n) for n in ("loss_free", "loss_free_adaptive", "moe_plus_plus",
                                        "moe_plus_plus_loss_free", "hmoe", "hmoe_loss_free")],
}
