"""What a checkpoint holds and how a run is rebuilt from it: training state in the
single-process layout (gathered in a parallel run), the full model, the corpus, final weights."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import parallel as par
from .._optional import require
from .checkpoint import atomic_write
from .data import TokenizedCorpus, prepare_corpus
from .model import MoETransformer
from .train_config import TrainConfig


def _training_state(model, optimizer, scheduler, step: int, parallel: par.ParallelGroups | None) -> dict:
    """The checkpoint's content, always in the single-process layout (a parallel run gathers
    its experts and their optimizer moments: collective), so any layout can resume it."""
    if parallel is None:
        model_state, optimizer_state = model.state_dict(), optimizer.state_dict()
    else:
        model_state = par.gather_state_dict(model, parallel)
        optimizer_state = par.gather_optimizer_state(optimizer, model, parallel)
    return {"step": step, "model": model_state, "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(), **_rng_states()}


def _rng_states() -> dict:
    """The torch RNG states a checkpoint holds: the CPU's, and the current GPU's once CUDA is in
    use (expert choice's token shuffle draws there)."""
    states = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_initialized():
        states["cuda_rng"] = torch.cuda.get_rng_state()
    return states


def _set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_initialized():  # a CPU resume of a GPU run needs none
        torch.cuda.set_rng_state(state["cuda_rng"])


def _load_training_state(model, optimizer, scheduler, state: dict, parallel: par.ParallelGroups | None) -> None:
    if parallel is None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
    else:
        par.load_full_state_dict(model, state["model"], parallel)
        par.load_full_optimizer_state(optimizer, model, state["optimizer"], parallel)
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_states(state)


def _full_model(model: MoETransformer, parallel: par.ParallelGroups | None) -> MoETransformer | None:
    """The single-process model with this run's weights: ``model`` itself, or for a parallel
    run a copy assembled on rank 0 from every rank's experts (collective; None elsewhere)."""
    if parallel is None:
        return model
    state = par.gather_state_dict(model, parallel)
    if parallel.data_rank != 0:
        return None
    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the run's RNG alone
        full = MoETransformer(model.config)
    full.load_state_dict(state)
    return full.to(next(model.parameters()).device).train(model.training)


def _prepare(cfg: TrainConfig, progress: bool, parallel: par.ParallelGroups | None) -> TokenizedCorpus:
    """The run's corpus; in a parallel run rank 0 builds (and caches) it first, the others then
    read the cache, so no two processes write it at once."""
    def prepare(show: bool) -> TokenizedCorpus:
        return prepare_corpus(cfg.data, vocab_size=cfg.vocab_size, cache_dir=Path(cfg.cache_dir),
                              val_fraction=cfg.val_fraction, max_train_tokens=cfg.max_train_tokens, progress=show)

    if parallel is None:
        return prepare(progress)
    corpus = prepare(progress) if parallel.data_rank == 0 else None
    par.broadcast_from_first(None, parallel)  # rank 0 is done with the cache
    return corpus if corpus is not None else prepare(False)


def _save_weights(model: torch.nn.Module, path: Path) -> None:
    """Final weights and buffers (the Loss-Free bias included) as safetensors."""
    save_model = require("safetensors.torch", "saving weights").save_model

    atomic_write(path, lambda tmp: save_model(model, str(tmp)))
