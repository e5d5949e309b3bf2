"""Each slice's kept iterate, the TV review and a retry's stop (:mod:`unrollinr.iterates`),
on models of tiny pixel images whose held-out losses the tests set."""

import math

import pytest
import torch

from unrollinr import ReconConfig
from unrollinr.iterates import BestIterates, RetryStop, TvReview
from unrollinr.model import PixelImage, UnrollINR


def _retry_stop(bars: list[float], iterations: int, warm_up: int = 0):
    """A :class:`~unrollinr.iterates.RetryStop` with patience 3 over ``iterations`` steps, for
    a model of ``len(bars)`` 4 x 4 slices, and the tracker it stops slices in."""
    slices = len(bars)
    model = UnrollINR([PixelImage(torch.ones(1, 4, 4, dtype=torch.complex64)) for _ in range(slices)], None,
                      torch.ones(slices, 1, 4, 4, dtype=torch.bool), lam=0.05, lam_s=0.35)
    return BestIterates(model), RetryStop(bars, patience=3, iterations=iterations, warm_up=warm_up)


def test_a_retry_stops_where_its_held_out_loss_falls_too_slowly_to_pass_the_bar_in_the_steps_left():
    falling = [[2.0], [1.9], [1.8], [1.7], [1.6]]  # 0.1 a step, 1.0 to beat
    for iterations, stops_at in ((10, 3), (20, None)):  # 1.7 - 6 * 0.1 > 1 after iteration 3 of 10
        tracker, stop = _retry_stop([1.0], iterations)
        stopped = []
        for iteration, losses in enumerate(falling):
            stop.stop_hopeless(iteration, torch.tensor(losses), tracker)
            stopped.append(tracker.stopped[0])
        assert stopped == [stops_at is not None and iteration >= stops_at for iteration in range(len(falling))]


def test_a_fresh_retry_whose_held_out_loss_rises_before_it_falls_is_judged_after_its_warm_up():
    rising_then_falling = [2.0, 2.1, 2.2, 2.2, 2.1, 1.9, 1.7, 1.5, 1.3, 1.1, 0.9]  # 1.0 to beat
    stopped_at = {}
    for warm_up in (0, 3):
        tracker, stop = _retry_stop([1.0], 100, warm_up)
        for iteration, loss in enumerate(rising_then_falling):
            stop.stop_hopeless(iteration, torch.tensor([loss]), tracker)
            if tracker.stopped[0]:
                stopped_at[warm_up] = iteration
                break
    assert stopped_at == {0: 3}  # no new low under 2.0 in 3 steps; with the warm-up its lows count from step 3


def test_a_retry_slice_whose_tv_weight_is_raised_gets_the_patience_from_the_raise():
    tracker, stop = _retry_stop([1.0, 1.0], 100)
    for iteration, losses in enumerate([[2.0, 2.0], [2.1, 2.1], [2.1, 2.1]]):
        stop.stop_hopeless(iteration, torch.tensor(losses), tracker)
    stop.wait_after_raise([1], 2)  # slice 1's TV weight raised at iteration 2
    stop.stop_hopeless(3, torch.tensor([2.1, 2.1]), tracker)
    assert tracker.stopped == [True, False]  # slice 0: 3 steps after its lowest, above the bar
    stop.stop_hopeless(4, torch.tensor([2.1, 2.1]), tracker)
    assert tracker.stopped == [True, False]
    stop.stop_hopeless(5, torch.tensor([2.1, 2.1]), tracker)
    assert tracker.stopped == [True, True]  # 3 steps after the raise


def test_a_retry_whose_held_out_loss_is_never_finite_stops_after_the_patience():
    tracker, stop = _retry_stop([1.0], 100)
    stopped = []
    for iteration in range(5):  # a diverged retry: NaN from the start
        stop.stop_hopeless(iteration, torch.tensor([math.nan]), tracker)
        stopped.append(tracker.stopped[0])
    assert stopped == [False, False, False, True, True]


def test_a_raise_that_predicts_the_held_out_samples_worse_goes_back_to_the_iterate_before_it():
    images = [torch.full((1, 4, 4), 1.0 + s, dtype=torch.complex64) for s in range(2)]
    model = UnrollINR([PixelImage(image) for image in images], None, torch.ones(2, 1, 4, 4, dtype=torch.bool),
                      lam=0.05, lam_s=0.35)
    tracker = BestIterates(model)
    tracker.update(0, torch.tensor([1.0, 1.0]), torch.tensor([1.5, 1.5]), patience=10)
    review = TvReview(model, ReconConfig(), torch.tensor([2.0, 2.0]), iterations=2)
    review.raise_poor_slices(1, torch.tensor([1.5, 1.5]), tracker)  # 0.75 of the zeros' loss (2.0): both raised
    assert review.before.keys() == {0, 1} and float(model.lam_s.detach()[0]) == pytest.approx(1.0)
    with torch.no_grad():
        for prior in model.priors:
            prior.image.mul_(10)
    tracker.update(2, torch.tensor([5.0, 5.0]), torch.tensor([1.4, 1.6]), patience=10)  # slice 1 predicts worse
    review.keep_the_better_prediction(tracker)
    kept = tracker.best_state
    assert torch.equal(kept["priors.0.image"], model.priors[0].image) and tracker.best_iterations[0] == 2
    assert torch.equal(torch.view_as_complex(kept["priors.1.image"]), images[1]) and tracker.best_iterations[1] == 0
    assert float(tracker.held_losses[1]) == pytest.approx(1.5)
    assert "back to iteration 0" in review.notes[1] and "back to" not in review.notes[0]


def test_a_second_raise_goes_back_to_the_best_iterate_before_either_raise():
    images = [torch.full((1, 4, 4), 1.0 + s, dtype=torch.complex64) for s in range(3)]
    model = UnrollINR([PixelImage(image) for image in images], None, torch.ones(3, 1, 4, 4, dtype=torch.bool),
                      lam=0.05, lam_s=0.35)
    config = ReconConfig()
    review = TvReview(model, config, torch.full((3,), 2.0), iterations=8)
    assert review.weights_at == {4: config.lam_s_poor, 6: config.lam_s_still_poor}
    tracker = BestIterates(model)
    tracker.update(0, torch.ones(3), torch.tensor([1.5, 1.5, 1.5]), patience=10)
    assert review.raise_poor_slices(4, torch.tensor([1.5, 1.5, 1.9]), tracker) == [0, 1]  # slice 2 is weak
    tracker.update(5, torch.ones(3), torch.tensor([1.3, 1.6, 1.0]), patience=10)
    # 0.65 and 0.8 of the zeros' loss: both still poor; slice 2, never raised, is not raised now
    assert review.raise_poor_slices(6, torch.tensor([1.3, 1.6, 1.0]), tracker) == [0, 1]
    assert float(model.lam_s.detach()[0]) == pytest.approx(config.lam_s_still_poor)
    assert float(model.lam_s.detach()[2]) == pytest.approx(config.lam_s)
    tracker.update(7, torch.ones(3), torch.tensor([1.4, 1.55, 1.0]), patience=10)
    review.keep_the_better_prediction(tracker)
    assert tracker.best_iterations[:2] == [5, 0]  # the better of the iterates before each raise
    assert [float(loss) for loss in tracker.held_losses[:2]] == pytest.approx([1.3, 1.5])
    assert "raised to 2 at iteration 6" in review.notes[0] and 2 not in review.notes


def test_a_raised_slice_that_is_weak_at_three_quarters_is_not_raised_again():
    model = UnrollINR([PixelImage(torch.ones(1, 4, 4, dtype=torch.complex64)) for _ in range(2)], None,
                      torch.ones(2, 1, 4, 4, dtype=torch.bool), lam=0.05, lam_s=0.35)
    config = ReconConfig()
    review = TvReview(model, config, torch.full((2,), 2.0), iterations=8)
    tracker = BestIterates(model)
    tracker.update(0, torch.ones(2), torch.tensor([1.5, 1.5]), patience=10)
    assert review.raise_poor_slices(4, torch.tensor([1.5, 1.5]), tracker) == [0, 1]
    # 0.7 and 0.9 of the zeros' loss: slice 1 predicts barely better than zeros, and its doubt stays visible
    assert review.raise_poor_slices(6, torch.tensor([1.4, 1.8]), tracker) == [0]
    assert [float(w) for w in model.lam_s.detach()] == pytest.approx([config.lam_s_still_poor, config.lam_s_poor])
