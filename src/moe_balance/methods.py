"""Named balancing methods: a router setting plus a tuple of balancer specs, as data.

A ``Method`` is what an experiment compares: ``get_method("loss_free")`` gives the balancers
and router to put in a ``MoEConfig`` (``method.moe_config(d_model=..., ...)``). ``SWEEPS``
holds the paper's ablations (Wang et al. 2024, arXiv 2408.15664): the update rate u of
Loss-Free Balancing and the coefficient alpha of the auxiliary loss.

This module sits below the MoE layer and the model: it imports ``config`` only.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .config import AuxLoss, BalancerSpec, BALANCER_SPECS, LossFree, MoEConfig, RouterConfig, ZLoss


@dataclass(frozen=True, kw_only=True)
class Method:
    """A named load-balancing recipe: balancer specs and the router they run with."""

    name: str
    description: str
    balancers: tuple[BalancerSpec, ...] = ()
    router: RouterConfig = field(default_factory=RouterConfig)

    def __post_init__(self) -> None:
        if not (isinstance(self.name, str) and self.name):
            raise ValueError(f"Method.name={self.name!r} must be a non-empty string")
        if not isinstance(self.router, RouterConfig):
            raise ValueError(f"Method.router must be a RouterConfig, got {type(self.router).__name__}")
        if not (isinstance(self.balancers, tuple)
                and all(isinstance(s, BALANCER_SPECS) for s in self.balancers)):
            raise ValueError(f"Method.balancers={self.balancers!r} must be a tuple of "
                             "LossFree, AuxLoss or ZLoss specs")

    def moe_config(self, **layer) -> MoEConfig:
        """A ``MoEConfig`` with this method's router and balancers; ``layer`` gives the rest
        (d_model, num_experts, top_k, expert_hidden_size, ...)."""
        return MoEConfig(router=self.router, balancers=self.balancers, **layer)


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

def no_balance() -> Method:
    return Method(name="no_balance", description="No balancing: plain top-K over sigmoid scores "
                  "(shows routing collapse).")


def aux_loss(coeff: float = 1e-3, scope: str = "micro_batch", name: str | None = None) -> Method:
    """Switch/GShard auxiliary loss with the paper's sigmoid gate (the paper's baseline)."""
    return Method(
        name=name or f"aux_loss_{_tag(coeff)}",
        description=f"Auxiliary loss alpha={coeff:g} over the {scope.replace('_', ' ')}, sigmoid "
                    "gate" + (" (the Loss-Free paper's baseline)" if (coeff, scope) == (1e-3, "micro_batch") else "")
                    + ("; alpha=0 routes exactly like no_balance" if coeff == 0 else "") + ".",
        balancers=(AuxLoss(coeff=coeff, scope=scope),))


def loss_free(update_rate: float = 1e-3, rule: str = "sign", name: str | None = None,
              form: str = "additive") -> Method:
    """Auxiliary-Loss-Free Balancing (Algorithm 1), sigmoid gate."""
    formula = "u*sign(mean(c)-c_i)" if rule == "sign" else "u*(mean(c)-c_i)/mean(c)"
    selection = "top-K on score * b, b from 1" if form == "multiplicative" else "top-K on score + b"
    return Method(
        name=name or f"loss_free_u{_tag(update_rate)}",
        description=f"Loss-Free Balancing, u={update_rate:g}: after each step b_i += {formula}; "
                    f"{selection}; sigmoid gate.",
        balancers=(LossFree(update_rate=update_rate, rule=rule, form=form),))


def loss_free_adaptive(name: str = "loss_free_adaptive", form: str = "additive") -> Method:
    """Loss-Free Balancing with the adaptive controller (``moe_balance.controller``)."""
    spec = LossFree(rule="adaptive", form=form)
    return Method(
        name=name,
        description="Loss-Free Balancing, adaptive controller: each bias moves by a gain times the "
                    "step that would have balanced its expert in the last step (read off the tokens "
                    "nearest its top-K threshold), the gain high while those steps keep their sign "
                    f"and low while they are noise; top-K on score {'* b' if form == 'multiplicative' else '+ b'}; "
                    "sigmoid gate.",
        balancers=(spec,))


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
        router=RouterConfig(score_fn="sigmoid", normalize_weights=True, scaling_factor=2.5))


def z_loss() -> Method:
    """ST-MoE: router z-loss beside the auxiliary loss."""
    return Method(name="z_loss", description="Router z-loss 1e-3 (ST-MoE) + auxiliary loss "
                  "alpha=1e-3 over the micro-batch, sigmoid gate.",
                  balancers=(ZLoss(coeff=1e-3), AuxLoss(coeff=1e-3)))


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
    loss_free(1e-3, name="loss_free_mult", form="multiplicative"),
    loss_free_adaptive(name="loss_free_adaptive_mult", form="multiplicative"),
    deepseek_v3(),
    z_loss(),
):
    register_method(_method)

# The paper's softmax-gate ablation of both methods.
register_method(Method(name="aux_loss_softmax", description="Auxiliary loss alpha=1e-3 over the "
                       "micro-batch, softmax gate.", balancers=(AuxLoss(coeff=1e-3),),
                       router=RouterConfig(score_fn="softmax")))
register_method(Method(name="loss_free_softmax", description="Loss-Free Balancing u=1e-3, sign "
                       "rule, softmax gate.", balancers=(LossFree(update_rate=1e-3),),
                       router=RouterConfig(score_fn="softmax")))

SWEEPS: dict[str, list[Method]] = {
    # The paper's update-rate ablation: 1e-4 balances too slowly early, 1e-2 oscillates late.
    "update_rate": [get_method(f"loss_free_u{_tag(u)}") for u in (1e-4, 1e-3, 1e-2)],
    # The paper's aux-loss dilemma: more alpha, better balance, worse perplexity.
    "aux_coeff": [get_method(f"aux_loss_{_tag(a)}") for a in (1e-2, 1e-3, 1e-4, 0.0)],
    # The bias controllers side by side: the paper's sign rule at three u, its raw-error
    # ablation, and the adaptive controller; the aux-loss baseline for reference.
    "controller": [get_method(n) for n in ("aux_loss", "loss_free_u1e-4", "loss_free", "loss_free_u1e-2",
                                           "loss_free_error", "loss_free_adaptive")],
    # The paper's additive vs multiplicative bias, for the sign rule and the adaptive controller.
    "form": [get_method(n) for n in ("loss_free_u1e-3", "loss_free_mult", "loss_free_adaptive",
                                     "loss_free_adaptive_mult")],
}
