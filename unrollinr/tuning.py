"""Tuning the initial weights ``lam`` and ``lam_s`` as the paper did: Ray Tune with an Optuna
search over the paper's ranges, an ASHA scheduler stopping poor trials early.

The objective is the PSNR against the fully sampled reference (reported every
``report_every`` iterations, which is what lets ASHA stop a trial early), or, with
``self_supervised``, the held-out k-space loss of the returned image (the safety net's
measure, :mod:`unrollinr.safety`), which needs no reference, so that a site can tune on its
own undersampled scans; it is known only at the end of a trial. The first trial is the base
configuration, so the best found is never worse than the defaults on this objective.

Needs the ``[scale]`` extra (``ray[tune]``, ``optuna``).
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass

import numpy as np

from unrollinr.config import ReconConfig
from unrollinr.evaluate import reference_image
from unrollinr.masks import make_mask
from unrollinr.metrics import psnr
from unrollinr.recon import reconstruct_with_details

logger = logging.getLogger(__name__)

# The paper's search ranges.
SEARCH_RANGES = {"lam": (0.01, 0.10), "lam_s": (0.1, 1.0)}


@dataclass(frozen=True)
class TuneResult:
    """The best weights found, and the objective of the best and of the base config (trial 1)."""

    best: dict[str, float]
    metric: str
    best_value: float
    base_value: float
    trials: int


def _trial(params: dict[str, float], *, undersampled: np.ndarray, mask: np.ndarray, reference: np.ndarray | None,
           base: ReconConfig, threads: int, report_every: int) -> None:
    """One trial: reconstruct with ``params`` and report the objective to Ray Tune."""
    import torch
    from ray import tune

    torch.set_num_threads(threads)  # this trial's own share of the node
    config = ReconConfig.from_strings(params, base=base)
    if reference is None:
        _, result = reconstruct_with_details(undersampled, mask, config=config, progress=False)
        tune.report({"held_out_loss": result.verdicts[0].held_out_loss})
        return

    def report(iteration: int, image: np.ndarray) -> None:
        if (iteration + 1) % report_every == 0:
            tune.report({"psnr": psnr(reference, image)})

    image, _ = reconstruct_with_details(undersampled, mask, config=config, progress=False, callback=report)
    tune.report({"psnr": psnr(reference, image)})  # the image returned: best iterate, safety net


def tune_weights(kspace: np.ndarray, acceleration: float, *, trials: int, base: ReconConfig | None = None,
                 mask_kind: str = "random", seed: int = 0, self_supervised: bool = False,
                 cpus_per_trial: int = 1, address: str | None = None, report_every: int = 10) -> TuneResult:
    """Search ``lam`` and ``lam_s`` for fully sampled ``(coils, ky, kx)`` ``kspace`` under a
    ``mask_kind`` mask at ``acceleration``, with ``trials`` trials on Ray (a local Ray
    without ``address``; each trial asks for a GPU where the cluster has one, else
    ``cpus_per_trial`` CPUs)."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    base = ReconConfig() if base is None else base
    if self_supervised and base.holdout_fraction <= 0:
        raise ValueError("the self-supervised objective needs held-out samples: holdout_fraction > 0")
    mask = make_mask(mask_kind, kspace.shape[1:], acceleration, seed=seed)
    undersampled = kspace * mask
    metric, mode = ("held_out_loss", "min") if self_supervised else ("psnr", "max")
    if not ray.is_initialized():
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    trainable = tune.with_resources(
        tune.with_parameters(_trial, undersampled=undersampled, mask=mask,
                             reference=None if self_supervised else reference_image(kspace), base=base,
                             threads=cpus_per_trial, report_every=report_every),
        {"cpu": cpus_per_trial, "gpu": gpus})
    reports = math.ceil(base.training_iterations(max(kspace.shape[1:])) / report_every) + 1
    search = OptunaSearch(metric=metric, mode=mode, seed=seed,
                          points_to_evaluate=[{"lam": base.lam, "lam_s": base.lam_s}])
    scheduler = ASHAScheduler(metric=metric, mode=mode, max_t=reports, grace_period=max(1, reports // 4))
    space = {name: tune.loguniform(low, high) for name, (low, high) in SEARCH_RANGES.items()}
    with tempfile.TemporaryDirectory(prefix="unrollinr-tune-") as storage:
        tuner = tune.Tuner(trainable, param_space=space,
                           tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=trials),
                           run_config=tune.RunConfig(storage_path=storage, verbose=0))
        results = tuner.fit()
        best = results.get_best_result(metric=metric, mode=mode, scope="last")
        frame = results.get_dataframe()
    is_base = (frame["config/lam"] == base.lam) & (frame["config/lam_s"] == base.lam_s)
    chosen, reached = best.config or {}, best.metrics or {}
    values = {name: float(chosen[name]) for name in SEARCH_RANGES}
    logger.info("best of %d trials: %s (%s %.4g)", len(frame), values, metric, reached[metric])
    return TuneResult(best=values, metric=metric, best_value=float(reached[metric]),
                      base_value=float(frame.loc[is_base, metric].iloc[0]), trials=len(frame))
