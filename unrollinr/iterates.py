"""Which iterate each slice of a training run keeps, and how the run reviews itself.

:class:`BestIterates` keeps each slice's best iterate by its objective and stops a slice
whose objective no longer improves; :class:`TvReview` raises the TV weight of slices whose
image predicts the held-out samples poorly, and goes back where a raise did not help;
:class:`RetryStop` stops the slices of a retry that cannot be kept. The slices of a batch
are treated each on its own, so that a slice gets the same iterate alone or in any batch."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from unrollinr.config import ReconConfig
from unrollinr.model import UnrollINR
from unrollinr.safety import POOR_PREDICTION, WEAK_PREDICTION

logger = logging.getLogger(__name__)
MIN_RELATIVE_IMPROVEMENT = 1e-4


@dataclass
class SliceBest:
    """One slice's best iterate: its weights (by parameter name; the slice's entry of the
    per-slice weights), held-out loss and iteration."""

    weights: dict[str, torch.Tensor]
    held_loss: float
    iteration: int


class BestIterates:
    """Per slice: the best objective so far, its iteration, the weights that gave it and
    their held-out loss, and whether the slice has stopped (``patience`` iterations
    without improvement). A stopped slice's choice is final, whatever its later iterates
    score, so that it matches the slice trained alone. Slices ``frozen`` start stopped, with
    the model's weights at construction as their choice.

    The objective, not the held-out loss, chooses the iterate: the held-out loss of a few
    lines flattens early while the image keeps improving (bench/HISTORY.md). The held-out
    loss serves the safety net."""

    def __init__(self, model: UnrollINR, frozen: Sequence[bool] | None = None) -> None:
        self.model = model
        n_slices = model.log_lam.shape[0]
        self.best_objectives = [float("inf")] * n_slices
        self.held_losses = torch.full((n_slices,), float("nan"))
        self.best_iterations = [0] * n_slices
        self.stopped = [False] * n_slices if frozen is None else list(frozen)
        self.best_state = parameters_copy(model)

    @property
    def all_stopped(self) -> bool:
        return all(self.stopped)

    def update(self, iteration: int, objectives: torch.Tensor, held_losses: torch.Tensor | None,
               patience: int) -> None:
        """Record the current weights' iterate: its ``objectives`` and held-out losses ``(slices,)``."""
        for s, objective in enumerate(objectives.tolist()):
            if self.stopped[s]:
                continue
            if objective < self.best_objectives[s] * (1 - MIN_RELATIVE_IMPROVEMENT):
                self.best_objectives[s], self.best_iterations[s] = objective, iteration
                if held_losses is not None:
                    self.held_losses[s] = float(held_losses[s])
                self._store_slice(s)
            elif iteration - self.best_iterations[s] >= patience:
                self.stopped[s] = True

    def restart(self, s: int) -> SliceBest:
        """Forget slice ``s``'s best objective (its objective has changed) and return its
        best iterate so far; its stored weights stay until a later iterate replaces them."""
        self.best_objectives[s] = float("inf")
        prefix = f"priors.{s}."
        weights = {name: value.clone() if name.startswith(prefix) else value[s].clone()
                   for name, value in self.best_state.items()
                   if name.startswith(prefix) or not name.startswith("priors.")}
        return SliceBest(weights, float(self.held_losses[s]), self.best_iterations[s])

    def restore(self, s: int, best: SliceBest) -> None:
        """Make ``best`` slice ``s``'s kept iterate again."""
        for name, value in best.weights.items():
            if name.startswith("priors."):
                self.best_state[name] = value
            else:
                self.best_state[name][s] = value
        self.held_losses[s], self.best_iterations[s] = best.held_loss, best.iteration

    def _store_slice(self, s: int) -> None:
        """Copy slice ``s``'s weights (its prior and its entries of the per-slice weights)."""
        prefix = f"priors.{s}."
        for name, parameter in self.model.named_parameters():
            if name.startswith(prefix):
                self.best_state[name] = parameter.detach().clone()
            elif not name.startswith("priors."):
                self.best_state[name][s] = parameter.detach()[s]


class TvReview:
    """Halfway through training, each slice whose current image predicts the held-out
    samples poorly (above :data:`~unrollinr.safety.POOR_PREDICTION` times the zeros' loss)
    continues with the TV weight ``config.lam_s_poor`` (where that is above
    ``config.lam_s``): its outer k-space is barely explained, and a piecewise-smooth object
    gains from stronger TV. At three quarters, a slice so raised whose image still predicts
    them poorly continues with ``config.lam_s_still_poor`` (where that is above
    ``lam_s_poor``). A slice that predicts them barely better than zeros (above
    :data:`~unrollinr.safety.WEAK_PREDICTION` times their loss) at a review is left alone: the
    safety net doubts its coil maps, and stronger TV makes an image on wrong maps predict
    the held-out samples as well as a right one (the GE phantom's small field of view: 1.35
    with TV raised on the first maps, 1.36 on the wider maps of the retry, whose image is
    far better), which would hide the doubt. The objective that chooses a raised slice's
    iterate weighs TV by the new weight from then on (``objective_weights``, ``(slices,)``).
    At the end a raised slice whose kept iterate predicts the held-out samples worse than
    its best before a raise goes back to the better of those (brain_16ch_96 wrapped: 1.53
    against 1.41), as a retry is kept only if it predicts them better. ``notes`` says, per
    raised slice, what was done and why."""

    def __init__(self, model: UnrollINR, config: ReconConfig, zero_losses: torch.Tensor | None,
                 iterations: int) -> None:
        """``zero_losses`` ``(slices,)``: the zeros' held-out losses (``None``: no holdout, no
        review); ``iterations``: the run's training steps."""
        self.model = model
        self.weights_at: dict[int, float] = {}  # the TV weight each review raises to, by iteration
        if config.tv and zero_losses is not None and config.lam_s_poor > config.lam_s:
            self.weights_at[iterations // 2] = config.lam_s_poor
            if config.lam_s_still_poor > config.lam_s_poor and 3 * iterations // 4 > iterations // 2:
                self.weights_at[3 * iterations // 4] = config.lam_s_still_poor
        self.zero_losses = zero_losses
        self.objective_weights = torch.full_like(model.log_lam_s.detach(), config.lam_s)
        self.notes: dict[int, str] = {}
        self.before: dict[int, SliceBest] = {}

    def raise_poor_slices(self, iteration: int, held_losses: torch.Tensor, tracker: BestIterates) -> list[int]:
        """At a review's ``iteration``, raise the TV weight of the slices that have not
        stopped and predict poorly but are not weak, given the current image's held-out losses
        ``(slices,)``: at the first review any such slice, at the second those the first raised;
        ``tracker`` starts their choice of iterate afresh, and their best before a raise
        is kept aside. Returns the slices raised."""
        assert self.zero_losses is not None
        weight, first = self.weights_at[iteration], iteration == min(self.weights_at)
        raised = []
        for s, share in enumerate((held_losses / self.zero_losses).tolist()):
            eligible = share <= WEAK_PREDICTION and (first or s in self.before)  # the second: those raised
            if tracker.stopped[s] or not share > POOR_PREDICTION or not eligible:
                continue
            with torch.no_grad():
                self.model.log_lam_s[s] = math.log(weight)
            self.objective_weights[s] = weight
            before = tracker.restart(s)
            if s not in self.before or before.held_loss < self.before[s].held_loss:
                self.before[s] = before
            note = (f"TV weight raised to {weight:g} at iteration {iteration}, where the held-out loss was "
                    f"{share:.2f} of the zeros'")
            self.notes[s] = note if first else f"{self.notes[s]}; {note}"
            logger.info("slice %d of the batch: %s", s, note)
            raised.append(s)
        return raised

    def keep_the_better_prediction(self, tracker: BestIterates) -> None:
        """Put back in ``tracker`` the best iterate before a raise of each raised slice
        whose kept iterate predicts the held-out samples worse."""
        for s, before in self.before.items():
            after = float(tracker.held_losses[s])
            if after > before.held_loss:
                tracker.restore(s, before)
                self.notes[s] += (f"; back to iteration {before.iteration}, which predicted them better "
                                  f"({before.held_loss:.4f} against {after:.4f})")
                logger.info("slice %d of the batch: %s", s, self.notes[s])


class RetryStop:
    """Stops the slices of a retry that cannot be expected to be kept. A retry is kept only
    where it predicts the held-out samples better than the run it retries, whose held-out
    losses are the ``bars`` (one per slice). A slice whose lowest held-out loss is not below
    its bar stops where that lowest, falling on as fast as over the last ``patience`` steps,
    would not pass the bar by the retry's last step (of ``iterations``): where it has not
    fallen for ``patience`` steps (or no loss was finite), and where it falls too slowly (a
    loss that slows as it falls passes no sooner). A slice whose TV weight the review
    raises gets ``patience`` steps from the raise (:meth:`wait_after_raise`). Where the
    held-out loss is still falling fast enough, the retry runs on (the GE phantom's 4 coils:
    its wider maps pass the first ones' after 40 of their 50 steps, bench/HISTORY.md).

    A retry trained afresh first moves away from its first image (the data-consistency
    step's, from an untrained prior), and its held-out loss rises before it falls
    (brain_8ch_256 with the phase encoding turned: 2.02 at step 0, 2.18 at 15, under the
    bar of 1.94 from step 39): its first ``warm_up`` steps set no low, and it is judged
    from ``warm_up + patience`` on."""

    def __init__(self, bars: Sequence[float], patience: int, iterations: int, warm_up: int = 0) -> None:
        self.bars, self.patience, self.iterations, self.warm_up = list(bars), patience, iterations, warm_up
        self.patience_from = [warm_up] * len(self.bars)  # per slice: the step its patience counts from
        self.lowest_by_iteration: list[list[float]] = [[] for _ in self.bars]

    def wait_after_raise(self, slices: Sequence[int], iteration: int) -> None:
        """Give the ``slices`` whose TV weight was raised at ``iteration`` ``patience`` steps
        from there to reach a new low."""
        for s in slices:
            self.patience_from[s] = iteration

    def stop_hopeless(self, iteration: int, held_losses: torch.Tensor, tracker: BestIterates) -> None:
        """Record the held-out losses ``(slices,)`` of ``iteration`` (called at every one, from
        0) and stop, in ``tracker``, the slices that have no hope left (their kept iterates stay)."""
        for s, loss in enumerate(held_losses.tolist()):
            lowest_so_far = self.lowest_by_iteration[s]
            previous = lowest_so_far[-1] if lowest_so_far else math.inf
            lowest = loss if loss < previous and iteration >= self.warm_up else previous  # a NaN loss is no new low
            lowest_so_far.append(lowest)
            if tracker.stopped[s] or lowest < self.bars[s] or iteration - self.patience_from[s] < self.patience:
                continue
            fall_per_step = 0.0  # where no loss was finite, nothing falls
            if math.isfinite(lowest):
                fall_per_step = (lowest_so_far[iteration - self.patience] - lowest) / self.patience
            steps_left = self.iterations - 1 - iteration
            if lowest - fall_per_step * steps_left >= self.bars[s]:  # a stalled lowest too
                tracker.stopped[s] = True
                logger.info("slice %d of the batch stops at iteration %d: its held-out loss, lowest %.4f at "
                            "iteration %d, falling %.5f a step over the last %d, would not pass the %.4f to "
                            "beat in the %d steps left", s, iteration, lowest, lowest_so_far.index(lowest),
                            fall_per_step, self.patience, self.bars[s], steps_left)


def parameters_copy(model: UnrollINR) -> dict[str, torch.Tensor]:
    """A copy of the trainable weights (the buffers never change)."""
    return {name: parameter.detach().clone() for name, parameter in model.named_parameters()}
