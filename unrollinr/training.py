"""Scan-specific training of UnrollINR on one measurement, and the final inference pass."""

from __future__ import annotations

import functools
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from unrollinr.cg import DataConsistency
from unrollinr.column_solve import ColumnSolver
from unrollinr.config import ReconConfig
from unrollinr.loss import normalized_l1_l2, total_variation
from unrollinr.model import INRImage, PixelImage, UnrollINR
from unrollinr.sense import SenseOp, is_line_mask

logger = logging.getLogger(__name__)
_MIN_RELATIVE_IMPROVEMENT = 1e-4


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``image`` and ``prior`` are ``(slices, y, x)`` complex, on the scale of the k-space
    that was fitted. ``history`` holds one dict per iteration (``loss``; ``objective``, the
    loss at the initial TV weight ``config.lam_s``, which early stopping watches unless there
    is a holdout; ``holdout``; ``lam``, ``lam_s``); ``parameters`` the trained weights that
    gave ``image`` (by :meth:`torch.nn.Module.named_parameters` name), which :func:`fit` can
    start from.
    """

    image: torch.Tensor
    prior: torch.Tensor
    iterations: int
    best_iteration: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)


def holdout_mask(mask: torch.Tensor, fraction: float, protected: torch.Tensor, seed: int) -> torch.Tensor:
    """Choose measured samples to hold out of training, ZS-SSL style.

    Whole ``ky`` lines are held out when the mask is made of lines (so training keeps the
    fast line-mask path); single samples otherwise. ``protected`` ``(ky, kx)`` (the ACS
    region) is never held out.

    Parameters
    ----------
    mask
        ``(slices, ky, kx)`` boolean sampling mask.

    Returns
    -------
    ``(slices, ky, kx)`` boolean mask of the held-out samples.
    """
    generator = torch.Generator().manual_seed(seed)
    held = torch.zeros_like(mask)
    lines = is_line_mask(mask)
    for s in range(mask.shape[0]):
        if lines:
            candidates = torch.nonzero(mask[s, :, 0] & ~protected[:, 0]).flatten()
        else:
            candidates = torch.nonzero((mask[s] & ~protected).flatten()).flatten()
        count = min(len(candidates), max(1, round(fraction * len(candidates))))
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        if lines:
            held[s, chosen.to(mask.device), :] = True
        else:
            held[s].view(-1)[chosen.to(mask.device)] = True
    return held


def _split_holdout(op: SenseOp, config: ReconConfig,
                   protected: torch.Tensor | None) -> tuple[SenseOp, SenseOp | None]:
    """The operators of the training samples and of the held-out ones (``None`` without a holdout)."""
    if config.holdout_fraction == 0:
        return op, None
    if protected is None:
        raise ValueError("a holdout needs the protected (ACS) region")
    held = holdout_mask(op.mask, config.holdout_fraction, protected, config.seed)
    if not held.any():
        return op, None
    return SenseOp(op.maps, op.mask & ~held), SenseOp(op.maps, held)


def build_model(config: ReconConfig, op: SenseOp, kspace: torch.Tensor) -> UnrollINR:
    """The UnrollINR network for ``op`` and its measured ``kspace`` ``(slices, coils, ky, kx)``."""
    n_slices, n_y, n_x = op.image_shape
    device = kspace.device
    dc = None
    if config.data_consistency:
        dc = DataConsistency(op, kspace, iterations=config.cg_iterations, tolerance=config.cg_tolerance,
                             warm_start=config.cg_warm_start, column_solver=exact_solver(config, op))
    priors = None
    if config.regularizer == "inr":
        priors = [INRImage((n_y, n_x), config, device, seed=config.seed + s) for s in range(n_slices)]
    elif config.regularizer == "pixel":
        start = op.adjoint(kspace)
        priors = [PixelImage(start[s]) for s in range(n_slices)]
    support = op.maps.abs().sum(dim=1) > 0 if config.zero_outside_maps else torch.ones_like(op.mask)
    return UnrollINR(priors, dc, support, config.lam, config.lam_s).to(device)


def exact_solver(config: ReconConfig, op: SenseOp) -> ColumnSolver | None:
    """The exact DC solver that ``config.dc_solver`` asks for on ``op``; ``None`` for CG."""
    if config.dc_solver == "exact" and not op.line_mask:
        raise ValueError("dc_solver 'exact' needs a mask of whole ky lines; use 'cg' or 'auto' for this mask")
    if config.dc_solver == "cg" or not op.line_mask:
        return None
    return ColumnSolver(op)


def _optimizer(model: UnrollINR, config: ReconConfig) -> torch.optim.Optimizer:
    groups = [{"params": [model.log_lam], "lr": config.lr_lam}]
    if config.tv:
        groups.append({"params": [model.log_lam_s], "lr": config.lr_lam_s})
    if model.priors is not None:
        groups.append({"params": list(model.priors.parameters()), "lr": config.lr})
    return torch.optim.Adam(groups)


def _show_progress(progress: bool | None) -> bool:
    return sys.stderr.isatty() if progress is None else progress


def fit(op: SenseOp, kspace: torch.Tensor, config: ReconConfig, *, progress: bool | None = None,
        protected: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        initial_parameters: Mapping[str, torch.Tensor] | None = None) -> FitResult:
    """Train UnrollINR on one measurement and return the final forward pass.

    Parameters
    ----------
    op
        SENSE operator with the full sampling mask.
    kspace
        Measured k-space ``(slices, coils, ky, kx)``, zero where not sampled, normalised
        so that the zero-filled image is of order 1.
    protected
        ``(ky, kx)`` samples never held out (the ACS region); needed with a holdout.
    progress
        Show a progress bar; ``None`` shows one when stderr is a terminal.
    callback
        Called after each iteration with its number and the current image ``x``
        ``(slices, y, x)`` (detached), e.g. to track quality in benchmarks.
    initial_parameters
        Start from these weights (another fit's :attr:`FitResult.parameters`, of the same
        configuration and image shape) instead of the seeded initialisation; a subset of
        the names is allowed (e.g. the MLP's alone).
    """
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    like = torch.zeros(op.image_shape, dtype=kspace.dtype, device=kspace.device)
    if config.regularizer == "none":
        model = build_model(config, op, kspace)
        return _final_pass(model, op, kspace, config, like, start, [], 0, 0, _parameters(model))

    train_op, held_op = _split_holdout(op, config, protected)
    train_samples = train_op.samples(kspace)
    held_samples = held_op.samples(kspace) if held_op is not None else None

    model = build_model(config, train_op, kspace * train_op.mask.unsqueeze(1))
    if initial_parameters is not None:
        _load_parameters(model, initial_parameters)
    optimizer = _optimizer(model, config)
    tv_scale = op.adjoint(kspace).abs().sum(dim=(-2, -1))
    data_loss = functools.partial(normalized_l1_l2, coil_dim=train_op.sample_coil_dim if config.coil_l1 else None)
    edge_penalty = functools.partial(total_variation, second_order=config.tv_second_order,
                                     log_scale=config.tv_log_scale)
    best_score, best_iteration, best_state = float("inf"), 0, _parameters(model)
    history: list[dict[str, float]] = []
    iterations = config.training_iterations(max(op.image_shape[-2:]))
    bar = tqdm(range(iterations), desc="UnrollINR", unit="it", disable=not _show_progress(progress),
               leave=False)
    iteration = 0
    for iteration in bar:
        if model.dc is not None:
            model.dc.iterations = cg_iterations_at(config, iteration)
        optimizer.zero_grad(set_to_none=True)
        x, _ = model(like)
        data = data_loss(train_op.measure(x), train_samples)
        penalty = edge_penalty(x) / tv_scale if config.tv else torch.zeros_like(data)
        loss = data + model.lam_s * penalty
        loss.sum().backward()

        record = {"loss": float(loss.detach().sum()),
                  "objective": float((data + config.lam_s * penalty).detach().sum()),
                  "lam": float(model.lam.detach().mean()), "lam_s": float(model.lam_s.detach().mean())}
        if held_op is not None:
            with torch.no_grad():
                record["holdout"] = float(data_loss(held_op.measure(x), held_samples).sum())
        history.append(record)
        if callback is not None:
            callback(iteration, x.detach())
        score = record["holdout"] if held_op is not None else record["objective"]
        if score < best_score * (1 - _MIN_RELATIVE_IMPROVEMENT):
            best_score, best_iteration = score, iteration
            best_state = _parameters(model)  # the weights that gave x, before this step
        elif iteration - best_iteration >= config.patience:
            logger.info("early stop at iteration %d (best %d)", iteration, best_iteration)
            break
        optimizer.step()
        bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
    bar.close()
    model.load_state_dict(best_state, strict=False)
    return _final_pass(model, op, kspace, config, like, start, history, iteration + 1, best_iteration, best_state)


def cg_iterations_at(config: ReconConfig, step: int) -> int:
    """CG iterations per DC solve at training ``step`` (fewer during the warm-up)."""
    if step < config.cg_warmup_steps:
        return min(config.cg_warmup_iterations, config.cg_iterations)
    return config.cg_iterations


def _parameters(model: UnrollINR) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (the buffers never change)."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}


def _load_parameters(model: UnrollINR, parameters: Mapping[str, torch.Tensor]) -> None:
    """Copy ``parameters`` into ``model``'s weights of the same names and shapes."""
    own = dict(model.named_parameters())
    unknown = sorted(set(parameters) - set(own))
    if unknown:
        raise ValueError(f"initial parameters not in this model: {unknown}")
    with torch.no_grad():
        for name, value in parameters.items():
            if value.shape != own[name].shape:
                raise ValueError(f"initial parameter {name} has shape {tuple(value.shape)}, "
                                 f"the model's is {tuple(own[name].shape)}")
            own[name].copy_(value)


def _final_pass(model: UnrollINR, op: SenseOp, kspace: torch.Tensor, config: ReconConfig,
                like: torch.Tensor, start: float, history: list[dict[str, float]],
                iterations: int, best_iteration: int, parameters: dict[str, torch.Tensor]) -> FitResult:
    """Inference: one forward pass with every measured sample in the DC step; ``parameters``
    is the copy of the model's weights that the result reports."""
    if config.data_consistency:
        # Without a holdout training used this operator: its exact solver carries over.
        solver = model.dc.column_solver if model.dc.op is op else exact_solver(config, op)
        model.dc = DataConsistency(op, kspace, iterations=config.cg_iterations,
                                   tolerance=config.cg_tolerance, warm_start=False, column_solver=solver)
    with torch.no_grad():
        x, z = model(like)
    seconds = time.perf_counter() - start
    logger.info("UnrollINR: %d iterations (best %d) in %.1f s, lambda %.4g, lambda_s %.4g",
                iterations, best_iteration, seconds, float(model.lam.detach().mean()),
                float(model.lam_s.detach().mean()))
    return FitResult(image=x, prior=z, iterations=iterations, best_iteration=best_iteration,
                     seconds=seconds, history=history, parameters=parameters)
