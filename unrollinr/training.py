"""Scan-specific training of UnrollINR on one measurement, and the final inference pass."""

from __future__ import annotations

import dataclasses
import functools
import logging
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from unrollinr.allocator import retain_freed_memory
from unrollinr.cg import DataConsistency
from unrollinr.column_solve import ColumnSolver
from unrollinr.config import ReconConfig
from unrollinr.fft import ifft2c
from unrollinr.iterates import BestIterates, RetryStop, TvReview, parameters_copy
from unrollinr.loss import normalized_l1_l2, total_variation
from unrollinr.model import INRImage, PixelImage, UnrollINR
from unrollinr.safety import (
    SENSE,
    UNROLLINR,
    ZERO_FILLED,
    Verdict,
    judge,
    unchecked,
)
from unrollinr.sense import SenseOp, is_line_mask, sets_in_use

logger = logging.getLogger(__name__)


@dataclass
class FitResult:
    """What :func:`fit` returns.

    ``image`` and ``prior`` are ``(slices, sets, y, x)`` complex (without the fitted
    operator's empty last sets: :func:`without_empty_sets`), on the scale of the
    k-space that was fitted (the fit's image: where ``verdicts`` name the calibrationless
    fallback, :func:`~unrollinr.recon.reconstruct_with_details` returns that instead).
    ``iterations`` is the number run, the refinement on every sample included,
    ``best_iterations`` the iterate kept per slice before it, ``verdicts`` the safety net's
    choice per slice (:mod:`unrollinr.safety`). ``history`` holds one dict per iteration,
    summed over the slices (``loss``; ``objective``, the loss at the initial TV weight
    ``config.lam_s``, which early stopping watches; ``holdout``, but for the refinement's
    steps; ``lam``, ``lam_s``); ``parameters`` the weights of the kept iterate before the
    refinement, blind to the held-out samples (by :meth:`torch.nn.Module.named_parameters`
    name), which :func:`fit` can start from; ``held_out`` the ``(slices, ky, kx)`` samples
    held out of training (``None``: none).
    """

    @property
    def best_iteration(self) -> int:
        """The iterate kept, for a single slice."""
        return self.best_iterations[0]

    @property
    def returned(self) -> str:
        """What the slices returned (:mod:`unrollinr.safety`), comma-separated for a batch."""
        return ",".join(v.returned for v in self.verdicts)

    def for_slice(self, s: int) -> FitResult:
        """Slice ``s`` of a batch's result, with the weights a fit of that slice alone would
        name (its prior's as ``priors.0.*``, its entries of the per-slice weights);
        ``iterations``, ``seconds`` and ``history`` stay the batch's."""
        prefix = f"priors.{s}."
        parameters = {}
        for name, value in self.parameters.items():
            if name.startswith(prefix):
                parameters["priors.0." + name.removeprefix(prefix)] = value
            elif not name.startswith("priors."):
                parameters[name] = value[s:s + 1]
        return dataclasses.replace(self, image=self.image[s:s + 1], prior=self.prior[s:s + 1],
                                   best_iterations=[self.best_iterations[s]], verdicts=[self.verdicts[s]],
                                   parameters=parameters,
                                   held_out=None if self.held_out is None else self.held_out[s:s + 1])

    image: torch.Tensor
    prior: torch.Tensor
    iterations: int
    best_iterations: list[int]
    seconds: float
    verdicts: list[Verdict]
    history: list[dict[str, float]] = field(default_factory=list)
    parameters: dict[str, torch.Tensor] = field(default_factory=dict)
    held_out: torch.Tensor | None = None


def holdout_mask(mask: torch.Tensor, fraction: float, protected: torch.Tensor, seeds: Sequence[int]) -> torch.Tensor:
    """Choose measured samples to hold out of training, ZS-SSL style.

    Whole ``ky`` lines are held out when the mask is made of lines (so training keeps the
    fast line-mask path); single samples otherwise. ``protected`` ``(slices, ky, kx)``
    (each slice's ACS region) is never held out.

    Parameters
    ----------
    mask
        ``(slices, ky, kx)`` boolean sampling mask.

    Returns
    -------
    ``(slices, ky, kx)`` boolean mask of the held-out samples; slice ``s`` draws them with
    ``seeds[s]``, as its prior does.
    """
    held = torch.zeros_like(mask)
    lines = is_line_mask(mask)
    for s in range(mask.shape[0]):
        generator = torch.Generator().manual_seed(seeds[s])  # a slice's choice does not depend on its batch
        if lines:
            candidates = torch.nonzero(mask[s, :, 0] & ~protected[s, :, 0]).flatten()
        else:
            candidates = torch.nonzero((mask[s] & ~protected[s]).flatten()).flatten()
        count = min(len(candidates), max(1, round(fraction * len(candidates))))
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        if lines:
            held[s, chosen.to(mask.device), :] = True
        else:
            held[s].view(-1)[chosen.to(mask.device)] = True
    return held


def _split_holdout(op: SenseOp, config: ReconConfig, protected: torch.Tensor | None,
                   seeds: Sequence[int]) -> tuple[SenseOp, SenseOp | None]:
    """The operators of the training samples and of the held-out ones (``None`` without a holdout)."""
    if config.holdout_fraction == 0:
        return op, None
    if protected is None:
        raise ValueError("a holdout needs the protected (ACS) region")
    held = holdout_mask(op.mask, config.holdout_fraction, protected, seeds)
    if not held.any():
        return op, None
    return SenseOp(op.maps, op.mask & ~held), SenseOp(op.maps, held)


def slice_seeds(config: ReconConfig, n_slices: int) -> list[int]:
    """The default seed of each slice of a batch: ``config.seed + s``."""
    return [config.seed + s for s in range(n_slices)]


def without_empty_sets(op: SenseOp) -> SenseOp:
    """``op`` without its last sets of maps where these are zero in every slice (ESPIRiT's
    second set where one sensitivity vector explains every pixel). Such a set adds nothing
    to ``E x``, yet its image would double the work on images: the TV, CG's vectors."""
    n_sets = sets_in_use(op.maps)
    return op if n_sets == op.image_shape[1] else SenseOp(op.maps[:, :n_sets], op.mask)


def build_model(config: ReconConfig, op: SenseOp, kspace: torch.Tensor,
                seeds: Sequence[int] | None = None, *, prior_sets: int | None = None) -> UnrollINR:
    """The UnrollINR network for ``op`` and its measured ``kspace`` ``(slices, coils, ky, kx)``;
    slice ``s``'s prior is initialised with ``seeds[s]`` (default :func:`slice_seeds`).
    ``prior_sets`` (at least ``op``'s sets) is how many sets of maps the priors have
    images for (:class:`~unrollinr.model.INRImage`, :class:`~unrollinr.model.PixelImage`),
    by default ``op``'s."""
    n_slices, n_sets, n_y, n_x = op.image_shape
    device = kspace.device
    dc = _training_dc(config, op, kspace) if config.data_consistency else None
    priors: list[nn.Module] | None = None
    if config.regularizer == "inr":
        seeds = slice_seeds(config, n_slices) if seeds is None else seeds
        priors = [INRImage((n_sets, n_y, n_x), config, device, seed=seed, mlp_sets=prior_sets) for seed in seeds]
    elif config.regularizer == "pixel":
        start = op.adjoint(kspace)
        priors = [PixelImage(start[s], image_sets=prior_sets) for s in range(n_slices)]
    support = op.maps.abs().sum(dim=2) > 0
    if not config.zero_outside_maps:
        support[:, 0] = True  # the first set's prior fills the background smoothly
    return UnrollINR(priors, dc, support, config.lam, config.lam_s).to(device)


def _training_dc(config: ReconConfig, op: SenseOp, kspace: torch.Tensor) -> DataConsistency:
    """The DC step of training for ``op`` and its measured ``kspace`` ``(slices, coils, ky, kx)``:
    a few warm-started CG iterations, or the exact solver."""
    return DataConsistency(op, kspace, iterations=min(config.cg_training_iterations, config.cg_iterations),
                           tolerance=config.cg_tolerance, warm_start=config.cg_warm_start,
                           column_solver=exact_solver(config, op))


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


@functools.cache
def prepare_process() -> None:
    """Pay this process's one-time costs of training, once: keep the CPU memory that steps
    free for the next steps to reuse (:func:`~unrollinr.allocator.retain_freed_memory`), and
    create a throwaway optimizer (a process's first one imports torch's compiler stack,
    about 2 s on 2 CPU cores). :func:`fit` calls it; the gadget calls it when a stream
    starts, so that these costs fall while the scan runs rather than after its last line."""
    retain_freed_memory()
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])


def fit(op: SenseOp, kspace: torch.Tensor, config: ReconConfig, *, progress: bool | None = None,
        protected: torch.Tensor | None = None,
        callback: Callable[[int, torch.Tensor], None] | None = None,
        initial_parameters: Mapping[str, torch.Tensor] | None = None,
        seeds: Sequence[int] | None = None, held_out_bars: Sequence[float] | None = None) -> FitResult:
    """Train UnrollINR on one measurement and return the final forward pass.

    Each slice of a batch stops, keeps its best iterate and gets its safety-net verdict
    on its own, so a slice gets the same image alone or in any batch; training ends when
    every slice has stopped. The first call pays the process's one-time costs
    (:func:`prepare_process`). The last sets of ``op``'s maps that are zero in every slice
    are left out (:func:`without_empty_sets`): the result's images have the sets before them.

    Parameters
    ----------
    op
        SENSE operator with the full sampling mask.
    kspace
        Measured k-space ``(slices, coils, ky, kx)``, zero where not sampled, normalised
        so that the zero-filled image is of order 1.
    protected
        ``(slices, ky, kx)`` samples never held out (each slice's ACS region); needed with
        a holdout.
    progress
        Show a progress bar; ``None`` shows one when stderr is a terminal.
    callback
        Called after each iteration with its number and the current image ``x``
        ``(slices, sets, y, x)`` (detached), e.g. to track quality in benchmarks.
    initial_parameters
        Start from these weights (another fit's :attr:`FitResult.parameters`, of the same
        configuration and image shape) instead of the seeded initialisation; a subset of
        the names is allowed (e.g. the MLP's alone).
    seeds
        Each slice's seed, for its prior and its held-out samples; by default
        :func:`slice_seeds`. A slice given the same seed as alone gets the same image.
    held_out_bars
        For a retry: each slice's held-out loss to beat, that of the run it retries
        (:class:`RetryStop`; trained afresh, without ``initial_parameters``, its first
        ``retry_patience`` steps are a warm-up).
    """
    prepare_process()
    start = time.perf_counter()
    prior_sets = op.image_shape[1]
    op = without_empty_sets(op)
    like = torch.zeros(op.image_shape, dtype=kspace.dtype, device=kspace.device)
    n_slices = op.image_shape[0]
    if config.regularizer == "none":
        model = build_model(config, op, kspace)
        verdicts = [unchecked("no prior to check")] * n_slices
        return _final_pass(model, op, kspace, config, like, start, [], 0, [0] * n_slices, parameters_copy(model),
                           verdicts)

    seeds = slice_seeds(config, n_slices) if seeds is None else list(seeds)
    if len(seeds) != n_slices:
        raise ValueError(f"{len(seeds)} seeds for {n_slices} slices")
    train_op, held_op = _split_holdout(op, config, protected, seeds)
    train_samples = train_op.samples(kspace)
    held_samples = held_op.samples(kspace) if held_op is not None else None

    model = build_model(config, train_op, kspace * train_op.mask.unsqueeze(1), seeds, prior_sets=prior_sets)
    if initial_parameters is not None:
        _load_parameters(model, initial_parameters)
    optimizer = _optimizer(model, config)
    tv_scale = op.adjoint(kspace).abs().flatten(start_dim=1).sum(dim=1)
    data_loss = functools.partial(normalized_l1_l2, coil_dim=train_op.sample_coil_dim if config.coil_l1 else None)
    edge_penalty = functools.partial(total_variation, second_order=config.tv_second_order,
                                     log_scale=config.tv_log_scale)
    tracker = BestIterates(model)
    history: list[dict[str, float]] = []
    iterations = config.training_iterations(max(op.image_shape[-2:]))
    refine_steps = config.refine_steps(iterations) if held_op is not None else 0
    zero_losses = None if held_samples is None else data_loss(torch.zeros_like(held_samples), held_samples)
    review = TvReview(model, config, zero_losses, iterations)
    retry_stop = None if held_out_bars is None or held_samples is None else RetryStop(
        held_out_bars, config.retry_patience, iterations,
        warm_up=config.retry_patience if initial_parameters is None else 0)

    def losses(measured: torch.Tensor, samples: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slice, the loss of the image ``x``, whose samples ``measured`` predict ``samples``,
        and its objective (the loss at the TV weights the objective uses, detached): both ``(slices,)``."""
        data = data_loss(measured, samples)
        penalty = edge_penalty(x) / tv_scale if config.tv else torch.zeros_like(data)
        return data + model.lam_s * penalty, (data + review.objective_weights * penalty).detach()

    def record(loss: torch.Tensor, objective: torch.Tensor) -> dict[str, float]:
        return {"loss": float(loss.detach().sum()), "objective": float(objective.sum()),
                "lam": float(model.lam.detach().mean()), "lam_s": float(model.lam_s.detach().mean())}

    bar = tqdm(range(iterations), desc="UnrollINR", unit="it", disable=not _show_progress(progress),
               leave=False)
    iteration = 0
    for iteration in bar:
        optimizer.zero_grad(set_to_none=True)
        x, _ = model(like)
        encoded = train_op.encode(x)
        loss, objective = losses(train_op.measure(x, encoded), train_samples, x)
        loss.sum().backward()
        history.append(record(loss, objective))
        held_loss = None
        if held_op is not None and held_samples is not None:
            with torch.no_grad():
                shared = encoded if held_op.line_mask == train_op.line_mask else None
                held_loss = data_loss(held_op.measure(x, shared), held_samples)
            history[-1]["holdout"] = float(held_loss.sum())
        if callback is not None:
            callback(iteration, x.detach())
        tracker.update(iteration, objective, held_loss, config.patience)  # the weights that gave x, before this step
        if held_loss is not None and iteration in review.weights_at:
            raised = review.raise_poor_slices(iteration, held_loss, tracker)
            if retry_stop is not None:
                retry_stop.wait_after_raise(raised, iteration)
        if retry_stop is not None and held_loss is not None:
            retry_stop.stop_hopeless(iteration, held_loss, tracker)
        if tracker.all_stopped:
            logger.info("early stop at iteration %d (best %s)", iteration, tracker.best_iterations)
            break
        optimizer.step()
        bar.set_postfix(loss=f"{history[-1]['loss']:.4f}", refresh=False)
    bar.close()
    review.keep_the_better_prediction(tracker)
    model.load_state_dict(tracker.best_state, strict=False)
    verdicts = _verdicts(model, config, kspace * train_op.mask.unsqueeze(1), like, tracker.held_losses, held_op,
                         held_samples, zero_losses, data_loss, protected)
    verdicts = [dataclasses.replace(v, reason=f"{v.reason}; {review.notes[s]}", tv_raised=True)
                if s in review.notes else v for s, v in enumerate(verdicts)]
    iterations_run = iteration + 1
    refined = [v.returned == UNROLLINR and not stopped for v, stopped in zip(verdicts, tracker.stopped, strict=True)]
    if refine_steps and any(refined):
        # The held-out samples have chosen the iterate and judged it; they now join training.
        model.dc = _training_dc(config, op, kspace)
        refiner = BestIterates(model, frozen=[not r for r in refined])
        all_samples = op.samples(kspace)
        trained = torch.tensor(refined, device=all_samples.device)
        for step in range(refine_steps):
            optimizer.zero_grad(set_to_none=True)
            x, _ = model(like)
            loss, objective = losses(op.measure(x), all_samples, x)
            loss[trained].sum().backward()
            history.append(record(loss, objective))
            if callback is not None:
                callback(iterations_run, x.detach())
            refiner.update(iterations_run, objective, None, config.patience)
            iterations_run += 1
            if step < refine_steps - 1:
                optimizer.step()
        model.load_state_dict(refiner.best_state, strict=False)
        note = f"then {refine_steps} steps more on every sample, the held-out ones too"
        verdicts = [dataclasses.replace(v, reason=f"{v.reason}; {note}") if r else v
                    for v, r in zip(verdicts, refined, strict=True)]
        logger.info("slices %s of the batch: %s", [s for s, r in enumerate(refined) if r], note)
    result = _final_pass(model, op, kspace, config, like, start, history, iterations_run, tracker.best_iterations,
                         tracker.best_state, verdicts)
    result.held_out = None if held_op is None else held_op.mask
    return result


def _verdicts(model: UnrollINR, config: ReconConfig, train_kspace: torch.Tensor, like: torch.Tensor,
              unrollinr_scores: torch.Tensor, held_op: SenseOp | None, held_samples: torch.Tensor | None,
              zero_scores: torch.Tensor | None,
              data_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              protected: torch.Tensor | None) -> list[Verdict]:
    """The safety net's verdict per slice (:mod:`unrollinr.safety`), from the held-out samples,
    the background of UnrollINR's image (its prior where every coil map vanishes) and the
    loudness of UnrollINR's and SENSE's images where no training sample measured k-space
    outside the ``protected`` ACS rows ``(slices, ky, kx)`` (:func:`_unmeasured_loudness`).

    SENSE and UnrollINR's image are solved from the training samples ``train_kspace``
    ``(slices, coils, ky, kx)`` as inference solves them (from zero, ``cg_iterations``), not
    by the training step's warm-started solver, whose start is UnrollINR's last image.
    ``zero_scores`` ``(slices,)`` are the zeros' held-out losses."""
    n_slices = like.shape[0]
    if held_op is None or held_samples is None or zero_scores is None or protected is None:
        return [unchecked("no samples held out")] * n_slices
    if model.dc is None:
        return [unchecked("no data-consistency step")] * n_slices
    with torch.no_grad():
        train_op = model.dc.op
        solve = _inference_dc(config, train_op, train_kspace, model.dc.column_solver)
        prior = model.prior(like)
        sense = solve(torch.zeros_like(like), model.lam)
        sense_scores = data_loss(held_op.measure(sense), held_samples)
        backgrounds = _backgrounds(prior, train_op.maps, train_kspace)
        loudness, sense_loudness = (_unmeasured_loudness(image, train_op, train_kspace, protected)
                                    for image in (solve(prior.to(like.dtype), model.lam), sense))
    verdicts = judge(unrollinr_scores.to(sense_scores.device), sense_scores, zero_scores, backgrounds, loudness,
                     sense_loudness)
    for s, verdict in enumerate(verdicts):
        log = logger.info if verdict.returned == UNROLLINR else logger.warning
        log("slice %d of the batch returns %s: %s", s, verdict.returned, verdict.reason)
    return verdicts


def _region_mean(values: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """Per slice, the mean of real ``values`` ``(slices, y, x)`` over the boolean ``region``
    ``(slices, y, x)``; zero where the region is empty."""
    return (values * region).flatten(start_dim=1).sum(dim=1) / region.flatten(start_dim=1).sum(dim=1).clamp_min(1)


def _backgrounds(prior: torch.Tensor, maps: torch.Tensor, kspace: torch.Tensor) -> torch.Tensor:
    """Per slice, the mean magnitude of the prior ``(slices, sets, y, x)`` where every coil
    map of ``maps`` ``(slices, sets, coils, y, x)`` vanishes (where UnrollINR's image is the
    prior's), over that of the zero-filled root-sum-of-squares of ``kspace``
    ``(slices, coils, ky, kx)`` there, or over 1% of its mean inside the maps where that is
    more (noise-free data can leave nothing outside); NaN where the maps cover the field of view."""
    outside = maps.abs().sum(dim=(1, 2)) == 0
    zero_filled = _zero_filled_rss(kspace)
    invented = _region_mean(torch.linalg.vector_norm(prior, dim=1), outside)
    measured = torch.maximum(_region_mean(zero_filled, outside),
                             0.01 * _region_mean(zero_filled, ~outside)).clamp_min(1e-30)
    return torch.where(outside.flatten(start_dim=1).any(dim=1), invented / measured,
                       torch.full_like(invented, float("nan")))


def _unmeasured_loudness(image: torch.Tensor, op: SenseOp, kspace: torch.Tensor,
                         protected: torch.Tensor) -> torch.Tensor:
    """Per slice, the mean energy (summed over coils) of the coil k-space that ``image``
    ``(slices, sets, y, x)`` predicts through ``op`` where ``op`` measures nothing, over the
    mean energy of the measured ``kspace`` ``(slices, coils, ky, kx)``, both outside the
    ``protected`` ACS rows ``(slices, ky, kx)`` (the outer k-space that the data share with
    the prediction); NaN where either region is empty."""
    outer = ~protected
    unmeasured, measured = ~op.mask & outer, op.mask & outer
    predicted = _region_mean(op.coil_kspace(image).abs().square().sum(dim=1), unmeasured)
    data = _region_mean(kspace.abs().square().sum(dim=1), measured).clamp_min(1e-30)
    both = unmeasured.any(dim=(1, 2)) & measured.any(dim=(1, 2))
    return torch.where(both, predicted / data, torch.full_like(predicted, float("nan")))


def _zero_filled_rss(kspace: torch.Tensor) -> torch.Tensor:
    """The root-sum-of-squares of the zero-filled coil images of ``kspace``
    ``(slices, coils, ky, kx)``: real ``(slices, y, x)``."""
    return torch.linalg.vector_norm(ifft2c(kspace), dim=1)


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
                iterations: int, best_iterations: list[int], parameters: dict[str, torch.Tensor],
                verdicts: list[Verdict]) -> FitResult:
    """Inference: one forward pass with every measured sample in the DC step; ``parameters``
    is the copy of the model's weights that the result reports. Slices whose verdict is
    not UnrollINR get SENSE (the DC step with a zero prior) or the zero-filled
    root-sum-of-squares, in the first set of maps, instead."""
    if model.dc is not None:  # config.data_consistency
        # Where training ended on this operator (no holdout, or the refinement on every
        # sample), its exact solver carries over.
        solver = model.dc.column_solver if model.dc.op is op else exact_solver(config, op)
        model.dc = _inference_dc(config, op, kspace, solver)
    with torch.no_grad():
        x, z = model(like)
        if any(v.returned == SENSE for v in verdicts) and model.dc is not None:  # SENSE needs the DC step
            x = _replace(x, verdicts, SENSE, model.dc(torch.zeros_like(like), model.lam))
        if any(v.returned == ZERO_FILLED for v in verdicts):
            zero_filled = torch.zeros_like(like)
            zero_filled[:, 0] = _zero_filled_rss(kspace).to(like.dtype)
            x = _replace(x, verdicts, ZERO_FILLED, zero_filled)
    seconds = time.perf_counter() - start
    logger.info("UnrollINR: %d iterations (best %s) in %.1f s, lambda %.4g, lambda_s %.4g",
                iterations, best_iterations, seconds, float(model.lam.detach().mean()),
                float(model.lam_s.detach().mean()))
    return FitResult(image=x, prior=z, iterations=iterations, best_iterations=best_iterations,
                     seconds=seconds, verdicts=verdicts, history=history, parameters=parameters)


def _inference_dc(config: ReconConfig, op: SenseOp, kspace: torch.Tensor,
                  column_solver: ColumnSolver | None) -> DataConsistency:
    """The DC step of inference for ``op`` and its measured ``kspace`` ``(slices, coils, ky, kx)``:
    ``column_solver`` if given, else ``cg_iterations`` of CG from zero."""
    return DataConsistency(op, kspace, iterations=config.cg_iterations, tolerance=config.cg_tolerance,
                           warm_start=False, column_solver=column_solver)


def _replace(images: torch.Tensor, verdicts: list[Verdict], returned: str, replacement: torch.Tensor) -> torch.Tensor:
    """``images`` ``(slices, ...)`` with the slices whose verdict is ``returned`` taken from ``replacement``."""
    chosen = torch.tensor([v.returned == returned for v in verdicts], device=images.device)
    return torch.where(chosen.reshape(-1, *([1] * (images.ndim - 1))), replacement, images)
