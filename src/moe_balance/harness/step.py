"""One optimizer step: forward and backward over the micro-batches, the reduction across ranks,
the finiteness check (stop or skip), the optimizer and balancer updates, and the step's record."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .. import parallel as par
from ..balancing import discard_pending_counts, update_balancers
from ..metrics import coefficient_of_variation, dead_experts, max_vio
from .evaluation import compute_metrics, kind_metrics
from .model import MoETransformer
from .train_config import TrainConfig, _autocast


class NonFiniteTraining(FloatingPointError):
    """A training step produced NaN or inf (``TrainConfig.nonfinite="stop"``, or too many
    consecutive skipped steps); the message names the step, and the layer when a router saw it."""


class DistributedFailure(RuntimeError):
    """A parallel run's step failed on this rank: mostly a collective that lost another rank
    (it died, or hung past the process group's timeout); the message names step and rank."""


class _RankStats:
    """Expert-parallel routing metrics gathered by forward hooks on the MoE layers during
    training forwards: ranks per token (device-limited routing's count), the fraction of FFN
    assignments that leave their token's rank, and bytes sent by the all-to-alls."""

    def __init__(self, model: MoETransformer, parallel: par.ParallelGroups):
        self.parallel = parallel
        self.ranks_E = par.expert_ranks(model.config.moe.num_experts, parallel.ep_size)
        self.totals = torch.zeros(5, dtype=torch.float64)  # ranks, tokens, crossing, FFN assignments, bytes
        self.hooks = [layer.register_forward_hook(self._record) for layer in model.moe_layers]

    def _record(self, layer, args, out) -> None:
        if not (layer.training and torch.is_grad_enabled()):
            return
        # host sync, in expert-parallel runs only, whose all-to-all has synchronised this forward
        # already (its split sizes): the routing metrics are counted on the host
        selected_TK = out.decision.selected.detach().cpu()
        if out.decision.token_mask is not None:
            selected_TK = selected_TK[out.decision.token_mask.cpu()]
        crossing, assignments = par.crossing_assignments(selected_TK, self.ranks_E, self.parallel.ep_rank)
        self.totals += torch.tensor([float(par.ranks_per_token(selected_TK, self.ranks_E).sum()),
                                     selected_TK.shape[0], crossing, assignments,
                                     2.0 * layer.experts.last_sent_bytes])  # 2: the backward sends as much

    def collect(self) -> dict:
        """This step's metrics over every rank (collective), then reset."""
        totals = self.totals.clone()
        dist.all_reduce(totals, group=self.parallel.data)
        self.totals.zero_()
        ranks, tokens, crossing, assignments, sent = totals.tolist()
        return {"ranks_per_token": ranks / max(tokens, 1), "cross_rank_fraction": crossing / max(assignments, 1),
                "all_to_all_bytes": sent}

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()


def _train_step(model, optimizer, scheduler, sampler, cfg: TrainConfig, step: int,
                parallel: par.ParallelGroups | None = None, routing: _RankStats | None = None) -> dict:
    """One optimizer step over ``grad_accum`` micro-batches, then the balancer update.

    In a parallel run each rank trains on its share of every micro-batch; gradients, losses
    and loads are then those of the whole global batch (``parallel.sync_gradients``), and the
    record's ``maxvio_batch`` is over the computation batch (paper section 5.1).

    A NaN or inf loss, gradient norm or router logit stops training (``cfg.nonfinite="stop"``)
    or skips the step (``"skip"``): gradients and the balancers' pending counts are discarded,
    the optimizer and the biases are untouched, the learning-rate schedule still advances (the
    rate at step s stays the schedule's value at s), and the record says ``"skipped": true``.
    """
    loads_LE = kinds_L4 = None
    device = next(model.parameters()).device
    # float64 on the device: the micro-batches' losses are summed without a host sync
    sums = {key: torch.zeros((), dtype=torch.float64, device=device) for key in ("loss", "lm_loss", "aux_loss")}
    lr = optimizer.param_groups[0]["lr"]
    problem = None
    try:
        for micro in range(cfg.grad_accum):
            tokens_BS1, _ = sampler.batch((step - 1) * cfg.grad_accum + micro)
            if parallel is not None:  # this rank's equal share of the global batch
                tokens_BS1 = tokens_BS1.chunk(parallel.data_size)[parallel.data_rank]
            tokens_BS1 = tokens_BS1.to(device, non_blocking=True)
            with _autocast(cfg, device.type):
                out = model(tokens_BS1[:, :-1], tokens_BS1[:, 1:])
            (out.loss / cfg.grad_accum).backward()
            for key in sums:
                sums[key] += getattr(out, key).detach().double() / cfg.grad_accum
            loads = torch.stack(out.layer_loads)
            loads_LE = loads if loads_LE is None else loads_LE + loads
            kinds = torch.stack(out.layer_kind_loads)
            kinds_L4 = kinds if kinds_L4 is None else kinds_L4 + kinds
    except FloatingPointError as err:  # the router's check_finite, with the layer it happened in
        problem = str(err)
        grad_norm = float("nan")
    else:
        # host sync, once per optimizer step after the backward: the finiteness check and the log
        # read the gradient norm and the losses
        means = torch.stack(list(sums.values()))
        if parallel is None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        else:
            par.sync_gradients(model, parallel)
            grad_norm = float(par.clip_grad_norm(model, cfg.grad_clip, parallel))
            means = par.sum_over_ranks(means, parallel) / parallel.data_size
            loads_LE, kinds_L4 = par.sum_over_ranks(loads_LE, parallel), par.sum_over_ranks(kinds_L4, parallel)
        sums = dict(zip(sums, means.tolist()))
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            problem = f"loss {sums['loss']}, gradient norm {grad_norm}"
    if problem is not None:
        optimizer.zero_grad(set_to_none=True)
        discard_pending_counts(model)
        if cfg.nonfinite == "stop":
            raise NonFiniteTraining(f"step {step}: {problem}; lower --lr, or pass --nonfinite skip "
                                    "to skip such steps")
        scheduler.step()
        return {"step": step, "skipped": True, "nonfinite": problem, "lr": lr, "loss": None,
                "lm_loss": None, "aux_loss": None, "maxvio_batch": None}
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    update_balancers(model)  # after the step: the bias only ever sees past loads

    vio_L = max_vio(loads_LE)
    tokens = cfg.grad_accum * cfg.batch_size * cfg.seq_len  # training windows have no padding
    record = {"step": step, **sums, "lr": lr, "grad_norm": grad_norm,
              "experts_per_token": float(kinds_L4.sum()) / (kinds_L4.shape[0] * tokens),
              **kind_metrics(kinds_L4, model.config.moe, tokens),
              **({"maxvio_compute": compute_metrics(loads_LE, kinds_L4, model.config.moe, tokens)["maxvio_compute"]}
                 if model.config.moe.expert_hidden_sizes is not None else {}),
              "maxvio_batch": float(vio_L.mean()), "maxvio_batch_layers": vio_L.tolist(),
              "cv": float(coefficient_of_variation(loads_LE).mean()),
              "dead_experts": int(dead_experts(loads_LE).sum())}
    if routing is not None:
        record.update(**routing.collect(), **par.device_loads(loads_LE, parallel.ep_size))
    biases = _loss_free_biases(model)
    if biases is not None:
        record["bias"] = biases
        record["bias_min"] = min(min(b) for b in biases)
        record["bias_max"] = max(max(b) for b in biases)
    return record


def _loss_free_biases(model: MoETransformer) -> list[list[float]] | None:
    biases = [layer.expert_bias for layer in model.moe_layers]
    if any(b is None for b in biases):
        return None
    return [b.tolist() for b in biases]
