"""The public reconstruction entry point for one 2D multi-coil slice."""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import cast

import numpy as np
import torch

from unrollinr.calibrationless import joint_tv_coil_images
from unrollinr.coils import (
    CalibrationError,
    apply_coil_matrix,
    coil_compression_matrix,
    espirit_maps,
    find_calibration_region,
)
from unrollinr.config import ReconConfig
from unrollinr.fft import fft2c
from unrollinr.loss import normalized_l1_l2
from unrollinr.safety import (
    SMOOTHER_MUST_BEAT,
    Verdict,
    calibrationless_verdict,
    factor_to_beat,
    may_fall_back_without_maps,
    replaces,
)
from unrollinr.sense import SenseOp, combine_sets, sets_in_use
from unrollinr.training import FitResult, fit

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mask_from_kspace(kspace: np.ndarray) -> np.ndarray:
    """The ``(ky, kx)`` sampling mask of zero-filled k-space ``(coils, ky, kx)``: non-zero samples."""
    return np.abs(kspace).sum(axis=0) > 0


def _validate(kspace: np.ndarray, mask: np.ndarray | None, csm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    kspace = np.asarray(kspace)
    if kspace.ndim != 3:
        raise ValueError(f"kspace must be (coils, ky, kx), got shape {kspace.shape}")
    if not np.iscomplexobj(kspace):
        raise ValueError(f"kspace must be complex, got {kspace.dtype}")
    if not np.isfinite(kspace).all():
        raise ValueError("kspace contains NaN or infinite values")
    mask = mask_from_kspace(kspace) if mask is None else np.asarray(mask)
    if mask.shape != kspace.shape[1:]:
        raise ValueError(f"mask shape {mask.shape} does not match kspace (ky, kx) {kspace.shape[1:]}")
    if mask.dtype != bool:
        raise ValueError(f"mask must be boolean, got {mask.dtype}")
    if not mask.any():
        raise ValueError("the mask samples nothing")
    if not kspace[:, mask].any():
        raise ValueError("kspace holds no signal: every measured sample is zero")
    if csm is not None and (np.ndim(csm) not in (3, 4) or np.shape(csm)[-3:] != kspace.shape):
        raise ValueError(f"csm shape {np.shape(csm)} must be (coils, ky, kx) or (sets, coils, ky, kx) "
                         f"with (coils, ky, kx) = {kspace.shape}")
    return (kspace * mask).astype(np.complex64), mask


def prepare_maps(kspace: np.ndarray, mask: np.ndarray, csm: np.ndarray | None, config: ReconConfig, *,
                 calibration: tuple[np.ndarray, np.ndarray] | None = None,
                 device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Coil compression (if configured) and ESPIRiT maps (unless given).

    Parameters
    ----------
    kspace, mask
        The imaging data ``(coils, ky, kx)`` and its ``(ky, kx)`` mask.
    calibration
        Optional separate calibration data ``(coils, ky, kx)`` and mask, e.g. separate ACS
        lines; by default the ACS region of ``kspace`` itself.
    device
        Torch device ESPIRiT computes on; ``None`` picks CUDA when available, else the CPU.

    Returns
    -------
    ``(kspace, maps)``: ``(coils, ky, kx)`` and ``(sets, coils, ky, kx)`` complex64, after
    compression; given ``(coils, ky, kx)`` maps are one set.
    """
    calib_kspace, calib_mask = (kspace, mask) if calibration is None else calibration
    if config.coil_compression and config.coil_compression < kspace.shape[0]:
        if csm is not None:
            raise ValueError("coil_compression cannot be combined with given coil maps")
        matrix = coil_compression_matrix(calib_kspace, config.coil_compression)
        kspace, calib_kspace = apply_coil_matrix(matrix, kspace), apply_coil_matrix(matrix, calib_kspace)
    if csm is None:
        csm = espirit_maps(calib_kspace, calib_mask, calib_width=config.espirit_calib_width,
                           kernel_width=config.espirit_kernel_width, thresh=config.espirit_thresh,
                           crop=config.espirit_crop, sets=min(config.espirit_sets, kspace.shape[0]),
                           device=default_device() if device is None else device)
    csm = np.asarray(csm, dtype=np.complex64)
    return kspace, csm if csm.ndim == 4 else csm[None]


def _protected_rows(mask: np.ndarray) -> np.ndarray:
    """``(ky, kx)``: the ACS rows of ``mask``, never held out; empty when there is no ACS."""
    protected = np.zeros_like(mask)
    try:
        region = find_calibration_region(mask)
    except CalibrationError:
        return protected
    protected[region.ky[0]:region.ky[1], :] = True
    return protected


def reconstruct_with_details(kspace: np.ndarray, mask: np.ndarray | None = None, *, csm: np.ndarray | None = None,
                             config: ReconConfig | None = None, device: str | torch.device | None = None,
                             progress: bool | None = None,
                             calibration: tuple[np.ndarray, np.ndarray] | None = None,
                             callback: Callable[[int, np.ndarray], None] | None = None) -> tuple[np.ndarray, FitResult]:
    """:func:`reconstruct`, also returning the :class:`FitResult` (history, timings, prior image).

    ``calibration`` optionally gives separate ACS data ``(coils, ky, kx)`` and its mask
    for the coil maps (see :func:`prepare_maps`). ``callback(iteration, image)`` sees the
    ``(ky, kx)`` image of each training iteration on the scale of the data.
    """
    config = ReconConfig() if config is None else config
    device = default_device() if device is None else torch.device(device)
    kspace, mask = _validate(kspace, mask, csm)
    data, maps = prepare_maps(kspace, mask, csm, config, calibration=calibration, device=device)
    slice_callback = None if callback is None else (lambda iteration, images: callback(iteration, images[0]))
    images, result = reconstruct_prepared(data[None], mask[None], maps[None], config, device=device,
                                          progress=progress, callback=slice_callback)
    return _retry(kspace, mask, device, _Run(images[0], result, config, data, maps), maps_given=csm is not None,
                  calibration=calibration)


def wider_maps(config: ReconConfig) -> ReconConfig:
    """``config`` with ESPIRiT maps cropped at ``espirit_retry_crop`` from the signal subspace
    of ``espirit_retry_thresh`` (where these are wider than its own)."""
    return dataclasses.replace(config, espirit_crop=min(config.espirit_crop, config.espirit_retry_crop),
                               espirit_thresh=min(config.espirit_thresh, config.espirit_retry_thresh))


@dataclasses.dataclass
class _Run:
    """One reconstruction of a slice: its ``(ky, kx)`` image, its result, its configuration,
    and the ``(coils, ky, kx)`` k-space and ``(sets, coils, ky, kx)`` maps it ran on
    (:func:`prepare_maps`)."""

    image: np.ndarray
    result: FitResult
    config: ReconConfig
    data: np.ndarray
    maps: np.ndarray

    @property
    def verdict(self) -> Verdict:
        return self.result.verdicts[0]


def _describe_changes(config: ReconConfig, retry: ReconConfig) -> str:
    """What ``retry`` changed from ``config``, e.g. ``"TV weight 1"``."""
    changes = []
    if retry.espirit_crop != config.espirit_crop or retry.espirit_thresh != config.espirit_thresh:
        changes.append(f"wider coil maps (crop {retry.espirit_crop:g}, threshold {retry.espirit_thresh:g})")
    if retry.lam_s != config.lam_s:
        changes.append(f"TV weight {retry.lam_s:g}")
    return " and ".join(changes)


def _retry_tv_weight(config: ReconConfig, verdict: Verdict) -> tuple[float, float] | None:
    """The TV weight to try again with after a run judged ``verdict``, and the factor of its
    held-out loss that the retry must beat (:func:`~unrollinr.safety.replaces`); ``None``
    for none.

    A slice that predicts the held-out samples well gets ``retry_lam_s_good``. One whose run
    did not raise the weight gets ``lam_s_poor``: where it predicts them poorly (it was weak
    halfway, its maps in doubt, and the wider maps did not beat it), to be kept if better;
    where it predicts them neither poorly nor well, and its image is not in doubt, to be kept
    only if better by :data:`~unrollinr.safety.SMOOTHER_MUST_BEAT`."""
    if verdict.good:
        return (config.retry_lam_s_good, 1.0) if config.retry_lam_s_good < config.lam_s else None
    if verdict.tv_raised or config.lam_s_poor <= config.lam_s:
        return None
    if verdict.poor:
        return config.lam_s_poor, 1.0
    return None if verdict.doubtful else (config.lam_s_poor, SMOOTHER_MUST_BEAT)


def _retry(kspace: np.ndarray, mask: np.ndarray, device: torch.device, first: _Run, *, maps_given: bool = False,
           calibration: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, FitResult]:
    """Reconstruct one slice (checked k-space ``(coils, ky, kx)`` and mask, as given) again
    where its ``first`` run calls for it, and keep the run whose returned image predicts the
    held-out samples (the same in every run) best (:func:`~unrollinr.safety.replaces`):

    1. with :func:`wider_maps`, when ``retry_wider_maps`` is on and the maps were not given
       (``maps_given``): a doubtful slice (UnrollINR's image rejected or weak), trained
       afresh; every other slice from its prior weights, for
       :meth:`~unrollinr.config.ReconConfig.wider_maps_steps`, with CG data consistency
       where the solver is ``"auto"`` (a short run does not repay the exact solve's
       decomposition of the wider maps' second set, which covers every pixel);
    2. then, on the kept run's k-space, maps and solver, from its prior weights, for
       :meth:`~unrollinr.config.ReconConfig.retry_steps`, with the TV weight of
       :func:`_retry_tv_weight`: ``retry_lam_s_good`` if its prediction is good, else
       ``lam_s_poor`` if its run did not raise the weight (a smoother image kept only if
       clearly better where the prediction was not poor).

    A slice whose first run was not checked (no samples held out, or no prior) is left as
    it is, since no retry could be judged better. A retry stops early where its held-out
    loss, above the loss it must beat, stops falling fast enough to pass it (``retry_patience``;
    :class:`~unrollinr.iterates.RetryStop`). A retry, or the calibrationless image, that
    fails (out of memory, say: the wider maps' second set doubles the images) leaves the
    slice the image it has, with a warning.
    """
    config, best, seconds = first.config, first, first.result.seconds
    if not first.verdict.checked:  # no run could be judged better
        return first.image, first.result
    image_size = max(mask.shape)

    def attempt(retry: ReconConfig, prepared: Callable[[], tuple[np.ndarray, np.ndarray]],
                initial_parameters: Mapping[str, torch.Tensor] | None = None, factor: float = 1.0) -> _Run:
        """Run ``retry`` on the k-space and maps that ``prepared()`` gives; the better of it
        and ``best`` (the retry must beat ``factor`` times its held-out loss, or
        :func:`~unrollinr.safety.factor_to_beat`'s). A retry that fails (out of memory, say)
        leaves ``best``: it is optional."""
        nonlocal seconds
        # the most the run may need to beat: whether it failed is known only at its end
        bar = factor_to_beat(best.verdict, factor) * best.verdict.held_out_loss
        try:
            data, maps = prepared()
            images, retry_result = reconstruct_prepared(data[None], mask[None], maps[None], retry, device=device,
                                                        progress=False, initial_parameters=initial_parameters,
                                                        held_out_bars=[bar])
        except Exception as error:  # noqa: BLE001 - the slice keeps the run it has
            logger.warning("retry with %s failed, the %s image kept: %s: %s", _describe_changes(config, retry),
                           best.verdict.returned, type(error).__name__, error)
            return best
        seconds += retry_result.seconds
        candidate = _Run(images[0], retry_result, retry, data, maps)
        keep = replaces(candidate.verdict, best.verdict, factor=factor)
        to_beat = factor_to_beat(best.verdict, factor, failed=candidate.verdict.failed)
        logger.info("retry with %s (%d steps, DC solver %s) returns %s, held-out loss %.4f against %.4f%s: %s",
                    _describe_changes(config, retry), retry.training_iterations(image_size), retry.dc_solver,
                    candidate.verdict.returned, candidate.verdict.held_out_loss, best.verdict.held_out_loss,
                    "" if to_beat == 1.0 else f" (to beat by the factor {to_beat:g})", "kept" if keep else "discarded")
        return candidate if keep else best

    if config.retry_wider_maps and not maps_given and wider_maps(config) != config:
        wider = wider_maps(config)
        wider_data = functools.partial(prepare_maps, kspace, mask, None, wider, calibration=calibration,
                                       device=device)
        if first.verdict.doubtful:  # the first maps are in doubt, and with them what the prior learned
            best = attempt(wider, wider_data)
        else:  # the image not in doubt: its prior carries over
            probe = dataclasses.replace(wider, iterations=config.wider_maps_steps(image_size),
                                        dc_solver="cg" if config.dc_solver == "auto" else config.dc_solver)
            best = attempt(probe, wider_data, _prior_weights(first))
    tv_retry = _retry_tv_weight(config, best.verdict)
    if tv_retry is not None:
        kept, (tv_weight, factor) = best, tv_retry
        best = attempt(dataclasses.replace(kept.config, lam_s=tv_weight, iterations=config.retry_steps(image_size)),
                       lambda: (kept.data, kept.maps), _prior_weights(kept), factor)
    if best is not first:
        best.result.verdicts = [dataclasses.replace(
            best.verdict, reason=f"with {_describe_changes(config, best.config)} after the first run's "
                                 f"{first.verdict.returned} (held-out loss {first.verdict.held_out_loss:.4f}): "
                                 f"{best.verdict.reason}")]
        best.result.seconds = seconds
    if (config.calibrationless_fallback and best.result.held_out is not None
            and may_fall_back_without_maps(best.verdict, maps_failed=first.verdict.failed)):
        try:
            _fall_back_without_maps(best, mask, best.result.held_out[0], device, maps_failed=first.verdict.failed)
        except Exception as error:  # noqa: BLE001 - the slice keeps the image it has
            logger.warning("calibrationless image failed, the %s image kept: %s: %s", best.verdict.returned,
                           type(error).__name__, error)
    return best.image, best.result


def _prior_weights(run: _Run) -> dict[str, torch.Tensor]:
    """The kept weights of ``run``'s prior, for a retry to start from."""
    return {name: value for name, value in run.result.parameters.items() if name.startswith("priors.")}


def _fall_back_without_maps(run: _Run, mask: np.ndarray, held_out: torch.Tensor, device: torch.device, *,
                            maps_failed: bool) -> None:
    """Score the calibrationless image of ``run``'s k-space (:mod:`unrollinr.calibrationless`)
    on the run's ``held_out`` samples ``(ky, kx)``, and make it the run's image and verdict
    where it replaces the run's (:func:`~unrollinr.safety.calibrationless_verdict`, told
    whether the slice's first maps failed outright: ``maps_failed``); the image returned
    then comes from every measured sample."""
    started, incumbent = time.perf_counter(), run.verdict
    kspace = torch.from_numpy(run.data).to(device)
    measured, held = torch.from_numpy(mask).to(device), held_out.to(device)
    weight, coil_dim = run.config.calibrationless_weight, 1 if run.config.coil_l1 else None
    images = joint_tv_coil_images(kspace, measured & ~held, weight=weight)
    truth = (kspace * held)[None]
    loss = float(normalized_l1_l2((fft2c(images) * held)[None], truth, coil_dim=coil_dim)[0])
    zeros = float(normalized_l1_l2(torch.zeros_like(truth), truth, coil_dim=coil_dim)[0])
    verdict = calibrationless_verdict(loss, zeros, incumbent, maps_failed=maps_failed)
    if verdict is not None:
        images = joint_tv_coil_images(kspace, measured, weight=weight)
        run.image = torch.linalg.vector_norm(images, dim=0).to(torch.complex64).cpu().numpy()
        run.result.verdicts = [verdict]
    run.result.seconds += time.perf_counter() - started
    log = logger.info if verdict is None else logger.warning
    log("calibrationless image: held-out loss %.4f against %s's %.4f: %s", loss, incumbent.returned,
        incumbent.held_out_loss, "not returned" if verdict is None else "returned")


def reconstruct_prepared(kspace: np.ndarray, masks: np.ndarray, maps: np.ndarray, config: ReconConfig,
                         device: str | torch.device | None = None, progress: bool | None = None,
                         callback: Callable[[int, np.ndarray], None] | None = None,
                         initial_parameters: Mapping[str, torch.Tensor] | None = None,
                         seeds: Sequence[int] | None = None,
                         held_out_bars: Sequence[float] | None = None) -> tuple[np.ndarray, FitResult]:
    """Train on ``(slices, coils, ky, kx)`` k-space with its ``(slices, ky, kx)`` masks and
    ``(slices, sets, coils, ky, kx)`` maps in one batch; each slice is normalised by its own
    zero-filled maximum and keeps its own prior. With several sets of maps the images of
    the sets are combined (:func:`~unrollinr.sense.combine_sets`). ``callback(iteration, images)`` sees the
    ``(slices, ky, kx)`` images of each iteration on the scale of the data;
    ``initial_parameters``, ``seeds`` (each slice's; by default ``config.seed + s``) and
    ``held_out_bars`` (a retry's) are passed to :func:`~unrollinr.training.fit`.

    Returns ``(slices, ky, kx)`` complex64 images on the scale of the data.
    """
    device = default_device() if device is None else torch.device(device)
    op = SenseOp(torch.from_numpy(maps).to(device), torch.from_numpy(masks).to(device))
    kspace_t = torch.from_numpy(kspace).to(device)
    scales = op.adjoint(kspace_t).abs().flatten(start_dim=1).amax(dim=1)
    if bool((scales == 0).any()):
        raise ValueError("the coil maps and data give an all-zero image: check the maps' support")
    protected = np.stack([_protected_rows(m) for m in masks])

    def on_data_scale(x: torch.Tensor) -> np.ndarray:
        return (combine_sets(x) * scales[:, None, None]).cpu().numpy().astype(np.complex64)

    on_iteration = None
    if callback is not None:
        def on_iteration(iteration: int, x: torch.Tensor) -> None:
            callback(iteration, on_data_scale(x))
    result = fit(op, kspace_t / scales[:, None, None, None], config, progress=progress,
                 protected=torch.from_numpy(protected).to(device), callback=on_iteration,
                 initial_parameters=initial_parameters, seeds=seeds, held_out_bars=held_out_bars)
    return on_data_scale(result.image), result


def reconstruct_slices(kspace: np.ndarray, masks: np.ndarray | None = None, *, config: ReconConfig | None = None,
                       device: str | torch.device | None = None, progress: bool | None = None) -> np.ndarray:
    """Reconstruct several slices of one exam in batched training runs: one run for the
    slices whose maps have as many sets in use (:func:`~unrollinr.sense.sets_in_use`), so
    that each slice is computed as it would be alone.

    Every slice is still scan-specific (its own prior, weights and normalisation); the
    batch shares the work shapes, which fills a GPU. Coil maps come from each slice's ACS.

    Parameters
    ----------
    kspace
        ``(slices, coils, ky, kx)`` complex, centred, zero where not sampled.
    masks
        ``(slices, ky, kx)`` boolean, or ``None`` to take the non-zero samples.

    Returns
    -------
    ``(slices, ky, kx)`` complex64 images; slice ``s`` uses prior seed ``config.seed + s``.
    """
    config = ReconConfig() if config is None else config
    device = default_device() if device is None else torch.device(device)
    data, masks, maps = prepare_slices(kspace, masks, config, device=device)
    images = np.empty((len(data), *data.shape[-2:]), dtype=np.complex64)
    for batch in _batches_by_sets_in_use(maps):
        batch_images, result = reconstruct_prepared(data[batch], masks[batch], maps[batch], config, device=device,
                                                    progress=progress, seeds=[config.seed + s for s in batch])
        for j, s in enumerate(batch):  # each slice retried as it would be alone, with its own seed
            alone = dataclasses.replace(config, seed=config.seed + s)
            slice_kspace, slice_mask = _validate(kspace[s], masks[s], None)
            images[s], _ = _retry(slice_kspace, slice_mask, device,
                                  _Run(batch_images[j], result.for_slice(j), alone, data[s], maps[s]))
    return images


def _batches_by_sets_in_use(maps: np.ndarray) -> list[list[int]]:
    """The slices of ``(slices, sets, coils, y, x)`` maps grouped by their sets in use, in order."""
    batches: dict[int, list[int]] = {}
    for s, slice_maps in enumerate(maps):
        batches.setdefault(_slice_sets_in_use(slice_maps), []).append(s)
    return list(batches.values())


def _slice_sets_in_use(maps: np.ndarray) -> int:
    """:func:`~unrollinr.sense.sets_in_use` of one slice's ``(sets, coils, y, x)`` maps."""
    return sets_in_use(torch.from_numpy(maps[None]))


def reconstruct_together(kspaces: Sequence[np.ndarray], masks: Sequence[np.ndarray],
                         calibrations: Sequence[tuple[np.ndarray, np.ndarray] | None], *,
                         config: ReconConfig | None = None,
                         device: str | torch.device | None = None) -> list[tuple[np.ndarray, FitResult] | Exception]:
    """Slices that are ready at the same time (the end of an interleaved exam), in one
    batched run per image shape and number of sets of maps in use; each slice gets what
    :func:`reconstruct_with_details` gives it alone (seed ``config.seed``, its own maps,
    safety net and retry).

    Parameters
    ----------
    kspaces, masks, calibrations
        Per slice: ``(coils, ky, kx)`` k-space, its ``(ky, kx)`` mask, and optional separate
        calibration data and mask (see :func:`prepare_maps`).

    Returns
    -------
    Per slice, ``(image, result)`` with a ``(ky, kx)`` complex64 image and the slice's
    :class:`FitResult`, or the exception that stopped that slice (the others go on).
    """
    config = ReconConfig() if config is None else config
    device = default_device() if device is None else torch.device(device)
    results: list[tuple[np.ndarray, FitResult] | Exception | None] = []
    groups: dict[tuple, list[tuple[int, _PreparedSlice]]] = {}
    for kspace, mask, calibration in zip(kspaces, masks, calibrations, strict=True):
        try:
            kspace, mask = _validate(kspace, mask, None)
            data, maps = prepare_maps(kspace, mask, None, config, calibration=calibration, device=device)
        except Exception as error:  # noqa: BLE001 - this slice's failure, reported with it
            results.append(error)
            continue
        key = (data.shape, maps.shape, _slice_sets_in_use(maps))
        groups.setdefault(key, []).append((len(results), _PreparedSlice(kspace, mask, calibration, data, maps)))
        results.append(None)
    for members in groups.values():
        parts = [part for _, part in members]
        try:
            images, batch = reconstruct_prepared(
                np.stack([p.data for p in parts]), np.stack([p.mask for p in parts]),
                np.stack([p.maps for p in parts]), config, device=device, progress=False,
                seeds=[config.seed] * len(parts))
        except Exception as error:  # noqa: BLE001 - reported for each slice of the batch
            for i, _ in members:
                results[i] = error
            continue
        for j, (i, part) in enumerate(members):
            results[i] = _retry(part.kspace, part.mask, device,
                                _Run(images[j], batch.for_slice(j), config, part.data, part.maps),
                                calibration=part.calibration)
    return cast(list[tuple[np.ndarray, FitResult] | Exception], results)  # every slot is filled by now


@dataclasses.dataclass(frozen=True)
class _PreparedSlice:
    """One slice for :func:`reconstruct_together`: its checked k-space and mask (as given,
    for a retry), its calibration, and the k-space and maps of :func:`prepare_maps`."""

    kspace: np.ndarray
    mask: np.ndarray
    calibration: tuple[np.ndarray, np.ndarray] | None
    data: np.ndarray
    maps: np.ndarray


def prepare_slices(kspace: np.ndarray, masks: np.ndarray | None, config: ReconConfig, *,
                   device: str | torch.device | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Check each slice of ``kspace`` and ``masks`` (as :func:`reconstruct_slices` takes them)
    and run :func:`prepare_maps` on it, for :func:`reconstruct_prepared`.

    Returns
    -------
    ``(kspace, masks, maps)``: ``(slices, coils, ky, kx)`` complex64 (after compression),
    ``(slices, ky, kx)`` boolean and ``(slices, sets, coils, ky, kx)`` complex64.
    """
    kspace = np.asarray(kspace)
    if kspace.ndim != 4:
        raise ValueError(f"kspace must be (slices, coils, ky, kx), got shape {kspace.shape}")
    prepared = []
    for s in range(kspace.shape[0]):
        data, mask = _validate(kspace[s], None if masks is None else masks[s], None)
        data, maps = prepare_maps(data, mask, None, config, device=device)
        prepared.append((data, mask, maps))
    data, masks, maps = (np.stack(parts) for parts in zip(*prepared, strict=True))
    return data, masks, maps


def reconstruct(kspace: np.ndarray, mask: np.ndarray | None = None, *, csm: np.ndarray | None = None,
                config: ReconConfig | None = None, device: str | torch.device | None = None) -> np.ndarray:
    """Reconstruct one undersampled multi-coil Cartesian slice with UnrollINR.

    Parameters
    ----------
    kspace
        ``(coils, ky, kx)`` complex k-space, centred (DC at ``n // 2``), zero where not sampled.
    mask
        ``(ky, kx)`` boolean sampling mask; ``None`` takes the non-zero samples.
    csm
        Optional ``(coils, ky, kx)`` coil maps, or ``(sets, coils, ky, kx)`` sets of them;
        without them ESPIRiT runs on the ACS region.
    config
        :class:`~unrollinr.config.ReconConfig`; ``None`` is the default configuration.
    device
        Torch device; ``None`` picks CUDA when available, else the CPU.

    Returns
    -------
    ``(ky, kx)`` complex64 image on the scale of the data (``sum |S|^2 = 1`` maps).
    """
    image, _ = reconstruct_with_details(kspace, mask, csm=csm, config=config, device=device)
    return image
