"""The self-supervised safety net: which image each slice returns.

Training holds out a share of the measured k-space (ZS-SSL style). At the end, each
slice's UnrollINR iterate is scored on those held-out samples against two classic
predictions made from the same training samples: Tikhonov-regularised SENSE (the DC step
with a zero prior), and no prediction at all (zeros: what zero-filling predicts for
samples it did not measure). The slice returns the image whose prediction is best:

- ``unrollinr`` when UnrollINR predicts the held-out samples best;
- ``sense`` when SENSE does, i.e. the prior made the image worse (a diverged training),
  and SENSE predicts them, or UnrollINR's prediction is louder than the data (:func:`judge`);
- ``zero-filled`` (the root-sum-of-squares of the zero-filled coil images, which needs no
  coil maps) when both predict them worse than zeros, by more than
  :data:`ZERO_FILLED_MARGIN`: the coil maps do not explain the data, and any SENSE-type
  image would be wrong. (The margin: one held-out high-frequency line carries little
  energy, and a valid but aliased image can miss it by about as much; on a 48 x 48
  phantom at R = 3, SENSE scored 1.02 times the zeros' loss, and UnrollINR after 6
  iterations 1.03 times; on a brain cut to a 128 x 128 field of view, where the maps
  fail, 1.33 times.)

A slice still doubtful after its retries
(:func:`unrollinr.recon.reconstruct_with_details`), or whose first maps failed outright
(below), is compared with one more classic image, which needs no coil maps: its coil
images under joint total variation (:mod:`unrollinr.calibrationless`), scored on the same
held-out samples. It is returned, as ``calibrationless`` (the root-sum-of-squares of its
coil images), where it predicts them better than the incumbent by the factor
:data:`CLEARLY_BETTER`: with one or two held-out lines at the noise level, predictions a
few per cent apart differ by chance (the pulseq phantom at R 12, mask seed 1: the
calibrationless image 1.98 against UnrollINR's 2.00, and a far worse image). Where the
maps fail it wins clearly: a brain cut to a 128 x 128 field of view, 1.76 against
UnrollINR's 1.95, and to 48 x 48, 0.93 against the zeros' 2.00. Where the slice's first
maps failed outright (its first UnrollINR image predicted the held-out samples worse than
zeros, by :data:`ZERO_FILLED_MARGIN`, or its first SENSE image, which has no prior to
blame, louder than the data: :data:`NO_LOUDER_THAN_THE_DATA`, or either image invented the
k-space that nothing measured: :data:`LOUDEST_UNMEASURED`), every map-based image of it
is suspect, even a retry's that the held-out samples accepted, and being better is enough:
the first brain cut to 128 x 128 on mask seed 1 (first run 2.46 against the zeros' 2.00)
then scores 1.76 against its retried UnrollINR's 1.82, 3% better, and is the better image;
brain_16ch_96 cut to 48 x 48, mask seed 13 (first SENSE 3.78, UnrollINR 2.13), scores 0.82
against the wider maps' UnrollINR's 0.87, whose second set's prior made the cut edge three
times as bright as the reference there. None of the slices the margin protects failed so
(their first runs: 1.87-2.06, and SENSE's there 2.07; the pulseq phantom's first image on
mask seed 1 is 0.52 times as loud as the data where nothing was measured, below). The
images' PSNR: bench/RESULTS.md and bench/HISTORY.md.

UnrollINR's image is *weak* when it predicts the held-out samples barely better than
zeros (above :data:`WEAK_PREDICTION` times their loss): with held-out lines at the noise
level the three predictions then differ by chance (a phantom cut to a 64 x 64 field of
view scored UnrollINR 1.806, SENSE 1.823, zeros 2.000, and which of the first two won
changed with the thread count), so the caller may try wider coil maps as it does for a
rejected image. In ``bench/robust.py`` the phantoms' accepted images on line masks
scored 0.22-0.77 times the zeros' loss.

An image's prediction is *poor* when its held-out loss is above :data:`POOR_PREDICTION`
times the zeros': the outer k-space it should predict is barely explained, and a stronger
TV weight may do better. Training raises it halfway for such a slice, unless the slice is
weak then, and again at three quarters if it is still poor (:func:`unrollinr.training.fit`);
a weak one whose image stays poor is retried with the first raise's weight. On
``bench/robust.py``, the first runs of the slices that a TV weight of 1.0 instead of 0.35
clearly improved scored 0.68-1.01 times the zeros' loss; those it made clearly worse,
0.22-0.59 (brain_8ch_256 at R 8: 0.33).

Between the two, a stronger TV weight is tried too, but its smoother image replaces
UnrollINR's only where it predicts the held-out samples better by the factor
:data:`SMOOTHER_MUST_BEAT`: held-out lines at the noise level favour the image that
predicts less there, as they favour SENSE's (:func:`judge`). Trained with a TV weight of
1.0 instead of 0.35, such slices of the brains in ``bench/robust.py`` scored 0.90-1.17
times the default's held-out loss, with worse images even where it was lower (0.97), and
near-equal ones at 0.90-0.93; the 4-coil pulseq phantom's scored 0.84-0.89 with clearly
better objects (bench/HISTORY.md).

UnrollINR's image predicts them *well* when its held-out loss is below
:data:`GOOD_PREDICTION` times the zeros': the data leave little to the prior, and a
weaker TV weight may keep more detail (the caller may try it). On the 2D-mask case of
every set in ``bench/robust.py`` the TV weight (0.15-1.0) whose image predicted the
held-out samples best also had the best PSNR (brain_16ch_96 at R 4, which scores 0.086 of
the zeros' loss, was best at 0.15), and 0.15 scored worse than 0.35 on the line masks
where its PSNR was lower (the GE phantom at R 4, 0.22 of the zeros' loss; brain_8ch_256
at R 8 and with 4 coils; brain_16ch_96 at R 4).

Outside the coil maps' support no sample sees the image: there UnrollINR's image is its
prior's alone, and no held-out sample can check it. Its *background* is that region's mean
magnitude over the zero-filled root-sum-of-squares image's there, which holds all that the
measured samples put outside the maps (noise and aliasing). Above
:data:`BRIGHTEST_BACKGROUND` the prior has invented the background, and SENSE (zero
there) is returned instead. On ``bench/robust.py`` the returned images' background was
0.02-0.37 in all 27 cases with one; two trainings made to fail there (2 CG steps per
solve on the GE and pulseq phantoms' 2D masks: images under zero-filled, with held-out
losses of 0.72 and 1.36 that passed) scored 4.05 and 2.43. A sound image on the wider
maps of a retry, whose support leaves a thin border, scored 1.02 (the pulseq phantom at
R 8, mask seed 1: held-out loss 1.51 against SENSE's 2.00, and the better image): the
limit lies about 1.5 times from it and from the failures.

Nor does a held-out line check what the prior puts on the outer k-space that nothing
measured, and one line at the noise level cannot see a bright edge there. An image's
*loudness* is the mean energy of the coil k-space it predicts where no training sample was
measured, over that of the data where they were, both outside the ACS rows. Where
UnrollINR's or SENSE's image is louder than :data:`LOUDEST_UNMEASURED`, it invented what
was not measured, and the slice's maps failed outright (above). The image is not rejected
for it: on a cut or wrapped field of view a sound image can be as loud (the GE phantom cut
to 64 x 64 at R 3, mask seed 12: its wider maps' runs scored 8.27 and 6.82, and the
second, at 0.37 of the zeros' held-out loss, is returned, far better than zero-filling's).
On ``bench/robust.py``, mask seeds 0, 3 and 5 (425 runs), UnrollINR's images that the
held-out samples accepted scored 0.19-3.35 (the GE phantom, whose outer k-space is mostly
noise, 2.9-3.4 at R 6), weak ones up to 3.89 outside the small fields of view (the 4-coil
pulseq phantom at R 12); SENSE's 0.03-7.99. Every first run louder than the limit there
had failed on the held-out samples too. Of the first runs of small and wrapped fields of
view over more mask seeds, three louder ones passed them: brain_16ch_96 and the GE phantom
wrapped at R 3, mask seed 13 (17.6 and 10.0; their calibrationless images predict worse),
and brain_8ch_256 cut to 128 x 128 at R 6, mask seed 4 (9.41), whose image, far worse than
zero-filling's, passed the held-out line (2.18 against the zeros' 2.00). Its
calibrationless image, then compared where better is enough (1.75 against a weak retry's
1.83), is returned, and is better than zero-filling's, where the retry's was worse
(bench/HISTORY.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNROLLINR, SENSE, ZERO_FILLED, CALIBRATIONLESS = "unrollinr", "sense", "zero-filled", "calibrationless"
ZERO_FILLED_MARGIN = 1.1
CLEARLY_BETTER = 0.95
WEAK_PREDICTION = 0.85
# A prediction no louder than the data on samples it does not predict scores up to about
# this many times the zeros' loss (the square root of two, for each norm).
NO_LOUDER_THAN_THE_DATA = math.sqrt(2)
POOR_PREDICTION = 0.6
GOOD_PREDICTION = 0.2
SMOOTHER_MUST_BEAT = 0.9
BRIGHTEST_BACKGROUND = 1.5
LOUDEST_UNMEASURED = 6.0


@dataclass(frozen=True)
class Verdict:
    """What one slice returned, and why (one line, for the log and the image meta)."""

    returned: str
    reason: str
    held_out_loss: float = float("nan")  # of the image returned; NaN when unchecked
    weak: bool = False  # UnrollINR returned, but it predicts held-out samples barely better than zeros
    poor: bool = False  # the image returned predicts held-out samples poorly (above POOR_PREDICTION of zeros)
    good: bool = False  # UnrollINR returned, and it predicts held-out samples well (below GOOD_PREDICTION of zeros)
    # the maps failed outright (:func:`judge`), whatever was returned
    failed: bool = False
    tv_raised: bool = False  # the run raised the TV weight, kept or not (unrollinr.training.fit)

    @property
    def checked(self) -> bool:
        """Whether held-out samples judged the image (:func:`unchecked`: they did not)."""
        return not math.isnan(self.held_out_loss)

    @property
    def doubtful(self) -> bool:
        """Whether wider coil maps, or else the calibrationless image, may do better:
        UnrollINR's image was rejected, or is weak."""
        return self.returned != UNROLLINR or self.weak


def unchecked(reason: str) -> Verdict:
    """UnrollINR's image, returned without a check (no held-out samples)."""
    return Verdict(UNROLLINR, f"not checked: {reason}")


def judge(unrollinr_loss: torch.Tensor, sense_loss: torch.Tensor, zero_loss: torch.Tensor,
          backgrounds: torch.Tensor | None = None, loudness: torch.Tensor | None = None,
          sense_loudness: torch.Tensor | None = None) -> list[Verdict]:
    """Per slice, the image to return from the held-out losses ``(slices,)`` of each
    prediction, UnrollINR's backgrounds ``(slices,)`` (NaN where the maps cover the
    field of view; ``None``: unchecked) and the loudness ``(slices,)`` of UnrollINR's and
    SENSE's images where nothing was measured (NaN or ``None``: unchecked).

    SENSE's image replaces UnrollINR's on the held-out losses only where SENSE predicts the
    held-out samples (its loss at most :data:`WEAK_PREDICTION` of the zeros'), or where
    UnrollINR's prediction is louder than the data (:data:`NO_LOUDER_THAN_THE_DATA`), as a
    diverged prior's is. Where neither predicts them (one held-out line at the edge of
    k-space, which no image at that acceleration resolves), the prediction nearest zero
    scores best, and SENSE's, which fills little of outer k-space, wins without being the
    better image (a brain cropped to 76 x 80 at R 3, mask seed 1: UnrollINR 2.45, SENSE
    2.07, zeros 2.00, and SENSE's image far worse: bench/HISTORY.md)."""
    verdicts = []
    unknown = torch.full_like(zero_loss, float("nan"))
    backgrounds, loudness, sense_loudness = (unknown if given is None else given
                                             for given in (backgrounds, loudness, sense_loudness))
    for ours, sense, zeros, background, loud, sense_loud in zip(
            unrollinr_loss.tolist(), sense_loss.tolist(), zero_loss.tolist(), backgrounds.tolist(),
            loudness.tolist(), sense_loudness.tolist(), strict=True):
        scores = f"held-out loss UnrollINR {ours:.4f}, SENSE {sense:.4f}, zeros {zeros:.4f}"
        if not math.isnan(loud) or not math.isnan(sense_loud):
            scores += f"; unmeasured k-space {loud:.2f} times as loud as the data, SENSE's {sense_loud:.2f}"
        # An image with NaN or infinite pixels predicts nothing: no comparison may prefer it.
        ours, sense = (loss if math.isfinite(loss) else math.inf for loss in (ours, sense))
        # The maps failed outright where UnrollINR's image predicts the held-out samples worse
        # than zeros, or SENSE's, which has no prior, is louder than the data there, or either
        # image invents the k-space that no sample measured (NaN, where nothing is unmeasured
        # or nothing measured outside the ACS rows, is not loud).
        failed = (ours > ZERO_FILLED_MARGIN * zeros or sense > NO_LOUDER_THAN_THE_DATA * zeros
                  or loud > LOUDEST_UNMEASURED or sense_loud > LOUDEST_UNMEASURED)
        # SENSE's lower loss counts where SENSE predicts the samples, or UnrollINR's image is
        # louder than the data there (a diverged prior); else SENSE merely predicts less.
        sense_predicts = sense <= WEAK_PREDICTION * zeros or ours > NO_LOUDER_THAN_THE_DATA * zeros
        if min(ours, sense) > ZERO_FILLED_MARGIN * zeros:
            verdicts.append(Verdict(ZERO_FILLED, f"the coil maps do not predict held-out k-space ({scores})", zeros,
                                    poor=True, failed=failed))
        elif sense < ours and sense_predicts:
            verdicts.append(Verdict(SENSE, f"SENSE predicts held-out k-space better ({scores})", sense,
                                    poor=sense > POOR_PREDICTION * zeros, failed=failed))
        elif background > BRIGHTEST_BACKGROUND:
            verdicts.append(Verdict(SENSE, f"UnrollINR's image outside the coil maps is {background:.2f} times as "
                                           f"bright as the zero-filled image there: its prior invented it ({scores})",
                                    sense, poor=sense > POOR_PREDICTION * zeros, failed=failed))
        else:
            reason = ("UnrollINR predicts held-out k-space best" if ours <= sense else
                      "neither UnrollINR nor SENSE predicts held-out k-space, and SENSE scores better only by "
                      "predicting less: UnrollINR's image kept")
            verdicts.append(Verdict(UNROLLINR, f"{reason} ({scores})", ours,
                                    weak=ours > WEAK_PREDICTION * zeros, poor=ours > POOR_PREDICTION * zeros,
                                    good=ours < GOOD_PREDICTION * zeros, failed=failed))
    return verdicts


def replaces(candidate: Verdict, incumbent: Verdict, *, factor: float = 1.0) -> bool:
    """Whether a retry's image (its ``candidate`` verdict) replaces the ``incumbent`` one: it
    predicts the held-out samples better, by ``factor`` times the incumbent's loss where
    given (:data:`SMOOTHER_MUST_BEAT`). A weak prediction replaces the zero-filled image
    too (the GE phantom cut to 64 x 64 at R 3, mask seeds 5-9: wider maps at 0.81-0.97 of
    the zeros' loss, and images far better than zero-filling); where the first maps
    failed, the calibrationless image is then compared with the retry's
    (:func:`may_fall_back_without_maps`).

    A retry's zero-filled image never replaces another: it needs no coil maps, so it is the
    same image in every run, and the incumbent's own verdict already weighed it against its
    image with :data:`ZERO_FILLED_MARGIN` (the 4-coil pulseq phantom at R 4, mask seed 11:
    the first run's UnrollINR image, weak at 2.03 against the zeros' 2.00, was replaced by
    the zero-filled image its wider maps' run returned, since both their images scored
    above 2.2). Conversely, a retry's image replaces the zero-filled image where its own
    verdict kept it, within that margin, and found nothing failed (:attr:`Verdict.failed`):
    the retry's image passes the test a first run's passes, and the zero-filled image's
    lower loss is the margin's chance (wrapped at R 3, the GE phantom on mask seed 7 and
    brain_16ch_96 on seed 14: the wider maps' images at 2.07 and 2.18 against the zeros'
    2.00, and far better than zero-filling; bench/HISTORY.md)."""
    return (candidate.returned != ZERO_FILLED and candidate.held_out_loss
            < factor_to_beat(incumbent, factor, failed=candidate.failed) * incumbent.held_out_loss)


def factor_to_beat(incumbent: Verdict, factor: float = 1.0, *, failed: bool = False) -> float:
    """The factor of the ``incumbent``'s held-out loss that a retry's image must be below to
    replace it (:func:`replaces`): ``factor``, or :data:`ZERO_FILLED_MARGIN` for the
    zero-filled image where nothing ``failed`` in the retry's run."""
    return ZERO_FILLED_MARGIN if incumbent.returned == ZERO_FILLED and not failed else factor


def may_fall_back_without_maps(incumbent: Verdict, *, maps_failed: bool) -> bool:
    """Whether the calibrationless image is worth computing for a slice whose image has the
    ``incumbent`` verdict: it is doubtful, or the slice's first maps failed outright
    (``maps_failed``, :attr:`Verdict.failed`), so that the held-out samples that accepted a
    retry's maps are the only evidence for them (a brain cut to a 48 x 48 field of view,
    mask seed 8: a retry at 0.74 of the zeros' loss, and an image worse than
    zero-filling; the calibrationless image 0.46, and far better)."""
    return incumbent.doubtful or maps_failed


def calibrationless_verdict(loss: float, zeros: float, incumbent: Verdict, *,
                            maps_failed: bool = False) -> Verdict | None:
    """The verdict for the calibrationless image, whose held-out loss is ``loss`` (the
    zeros' is ``zeros``), where it replaces a doubtful slice's ``incumbent``: where it
    predicts the held-out samples better by the factor :data:`CLEARLY_BETTER`, or merely
    better where the slice's first maps failed outright (``maps_failed``,
    :attr:`Verdict.failed`), so that every map-based image of it is suspect. Either way it
    must predict them better than zeros by that factor: one barely better than zeros is no
    evidence that it explains the data (the 76 x 80 brain of :func:`judge`: 1.94 against the
    zeros' 2.00, and a far worse image).
    ``None`` where it does not replace the incumbent."""
    margin = 1.0 if maps_failed else CLEARLY_BETTER
    if (not may_fall_back_without_maps(incumbent, maps_failed=maps_failed)
            or not loss < margin * incumbent.held_out_loss or not loss < CLEARLY_BETTER * zeros):
        return None
    return Verdict(CALIBRATIONLESS, f"the coil images without maps predict held-out k-space better than "
                                    f"{incumbent.returned}'s image (held-out loss {loss:.4f} against "
                                    f"{incumbent.held_out_loss:.4f}, zeros {zeros:.4f}); {incumbent.returned} was: "
                                    f"{incumbent.reason}", loss, poor=loss > POOR_PREDICTION * zeros)
