"""Reconstruction configuration: one frozen, validated dataclass.

The same field names are used everywhere a user sets them: keyword arguments in Python,
``<property name=... value=.../>`` entries in a Gadgetron chain, the server's JSON
parameters and JSON settings files (:meth:`ReconConfig.load`). :meth:`ReconConfig.from_strings`
is the single mapping from text to fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REGULARIZERS = ("inr", "pixel", "none")
ENCODINGS = ("HashGrid", "DenseGrid")
ENCODING_BACKENDS = ("auto", "torch", "tcnn")
MLP_PRECISIONS = ("auto", "float32", "bfloat16")
DC_SOLVERS = ("auto", "exact", "cg")
# hash_log2_size None: the table size rule of auto_log2_table_size
AUTO_MIN_LOG2 = 14
AUTO_CELLS_PER_ENTRY = 4
# iterations None: the rule of auto_iterations
AUTO_ITERATIONS = 200
AUTO_ITERATIONS_LARGE = 300
AUTO_LARGE_IMAGE = 256
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


@dataclass(frozen=True)
class ReconConfig:
    """Everything that decides an UnrollINR reconstruction.

    Prior (``z``):
        ``regularizer``: ``"inr"`` (grid encoding + MLP), ``"pixel"`` (a learnable pixel
        image, the control) or ``"none"`` (no prior: SENSE with Tikhonov weight ``lam``,
        the "w/o R" ablation; CG-SENSE with ``dc_solver="cg"``).
        ``encoding``: ``"HashGrid"`` (Instant-NGP) or ``"DenseGrid"`` (one dense level
        at full resolution, a DINER-like table), with the tiny-cuda-nn grid settings
        ``hash_*``. ``encoding_backend`` ``"torch"`` (the default) runs the PyTorch grid;
        ``"tcnn"`` tiny-cuda-nn's fused grid (CUDA only, built from source; it has not yet
        been run against the PyTorch grid on a GPU here); ``"auto"`` takes tcnn on CUDA
        where it imports and logs which it took. ``hash_finest_resolution`` None means the image size: the per-level
        scale is chosen so that the finest level matches it. ``hash_log2_size`` None picks
        the smallest table, at least ``2^14``, that holds the finest level with at most
        4 of its cells per entry (:func:`auto_log2_table_size`). ``mlp_precision`` ``"auto"``
        runs the MLP in bfloat16 where that is native (CUDA, CPUs with AVX512-BF16), else
        float32.
    Unrolled step:
        ``data_consistency`` off gives the "w/o DC" ablation (the INR image is the
        output). ``lam`` is the initial DC weight, ``lam_s`` the initial TV weight
        (``tv`` off: "w/o TV"). TV is normalised by ``||x0||_1``. The defaults (0.05,
        0.35) were chosen on ``brain_8ch_256`` at R = 6, 8, 10 (bench/HISTORY.md); the
        paper's presets are :meth:`retrospective` (0.01, 0.5) and :meth:`prospective`
        (0.05, 2.0). ``dc_solver`` ``"exact"`` solves the DC system exactly, column by
        column, from one eigendecomposition per scan (whole-line masks only; it keeps up
        to ``x * y * y`` complex values per slice, 53 MB at 256 x 256 with ESPIRiT's
        cropped maps); ``"cg"`` runs CG; ``"auto"`` is exact where the mask allows it,
        else CG. Each CG solve in training runs ``cg_training_iterations`` iterations,
        warm-started (``cg_warm_start``) from the previous step's solution, and inference
        runs ``cg_iterations`` (bench/HISTORY.md compares the training setting).
    Loss (``tv_second_order=0, tv_log_scale=0, coil_l1=False`` is the paper's):
        ``tv_second_order`` mixes second-order differences into the TV term (0: first
        order only, 1: second order only); ``tv_log_scale`` > 0 penalises each difference
        ``d`` by ``e log(1 + |d| / e)`` instead of ``|d|``, with ``e`` relative to the
        zero-filled image's maximum; ``coil_l1`` sums each k-space sample's coil-vector
        norm in the l1 term instead of each coil's entry (:mod:`unrollinr.loss`).
    Training:
        Adam at ``lr`` for the prior and ``lr_lam``/``lr_lam_s`` for the log-weights,
        at most ``iterations`` steps (then the refinement, under "Safety net"); None picks
        them by image size, 200 up to 256 x 256 and 300 above (:func:`auto_iterations`).
        The iterate with the lowest loss at the initial TV weight ``lam_s`` is kept (the
        learned weight only falls, and the loss with it, so the loss itself would keep
        "improving" while TV fades and the image fills with noise). ``patience`` steps
        without improvement stop a slice.
    Safety net (:mod:`unrollinr.safety`):
        ``holdout_fraction`` of the measured phase-encode lines outside the ACS (of the
        samples, for 2D masks; at least one) is held out of training. At the end each
        slice returns UnrollINR's image, SENSE's, or the zero-filled root-sum-of-squares,
        whichever predicts the held-out samples best; the final DC step uses every sample.
        0 turns the net off. Once the held-out samples have chosen the iterate and judged
        it, the slices that return UnrollINR's image (and did not stop early) train
        ``refine_fraction`` times as many steps more on every sample, the held-out ones
        too, from the iterate chosen; the step with the lowest objective (above) on every
        sample is kept. A prior trained without the held-out lines misses what they alone measure,
        and how much depends on which lines were drawn (bench/HISTORY.md).
    Image support:
        ``zero_outside_maps`` zeroes ``z`` where the coil maps vanish (no data constrain
        the image there); off, the prior fills those pixels smoothly.
    Coil maps:
        ESPIRiT on the whole ACS rectangle, with ``espirit_*`` settings; ``espirit_crop``
        zeroes the maps in the background, and holes inside the support are filled. The
        signal subspace threshold ``espirit_thresh`` 0.01 (0.03 before) keeps a small
        structure apart from the object inside the maps; a wider subspace raises the
        eigenvalues, so the crop that marks the object's edge rises with it, to 0.95
        (both measured on every set of ``bench/robust.py``: bench/HISTORY.md).
        ``espirit_sets`` 2 adds ESPIRiT's second set of maps where its eigenvalue passes
        the crop (soft SENSE: wrapped or cut fields of view; one coil has one set); the prior
        proposes one image per set, and the output is their root-sum-of-squares with the
        first set's phase.
    Retries (:mod:`unrollinr.safety`, :func:`unrollinr.recon.reconstruct_with_details`):
        A slice whose UnrollINR image the safety net rejects or finds weak is, with
        ``retry_wider_maps`` on, reconstructed again with maps cropped at
        ``espirit_retry_crop`` from a wider signal subspace (``espirit_retry_thresh``: an
        object cut or wrapped by the field of view splits its signal between two
        eigenvectors near the cut, where the first eigenvalue then misses the crop, and a
        tight subspace leaves the wrapped object's maps under the crop on the object
        itself). Every other slice tries the wider maps too, from its prior weights, for
        ``wider_maps_iterations`` steps (at most the first run's; None: as many), with CG
        data consistency where ``dc_solver`` is ``"auto"`` (the exact solve's decomposition
        of the wider maps' two full sets would cost more than so short a run): maps from few
        ACS lines can leave the object's edge out, which equispaced lines fold onto the
        object coherently (``bench/robust.py``'s uniform masks: bench/HISTORY.md).
        Then the TV weight is tried again, on the kept run's k-space and maps, from its prior
        weights (fresh optimiser state), for ``retry_iterations`` steps (at most the first
        run's; None: as many): ``retry_lam_s_good`` (where below ``lam_s``) where
        UnrollINR's image predicts the held-out samples well (the data leave little to the
        prior, and TV only smooths detail away); ``lam_s_poor`` where the image kept
        predicts them poorly and its run did not raise the weight (below), and also where it
        predicts them neither poorly nor well, though there the smoother image must predict
        them clearly better (:data:`~unrollinr.safety.SMOOTHER_MUST_BEAT`). Each retry is
        kept if its returned image predicts the held-out samples better, so a retry stops,
        while its held-out loss is above the kept run's, once that loss has not reached a new
        low for ``retry_patience`` steps, or has not fallen fast enough over the last
        ``retry_patience`` to pass the kept run's in the steps left (counted from its own TV
        review, below, where that raised the weight, and, in a retry trained afresh, from
        step ``retry_patience``: its warm-up). A slice still doubtful then returns,
        with ``calibrationless_fallback`` on, the root-sum-of-squares of its coil images
        reconstructed without maps under joint TV of weight ``calibrationless_weight``
        (relative to the zero-filled image's maximum), where that predicts the held-out
        samples clearly better (:mod:`unrollinr.calibrationless`).
    TV review (within the run, no retry):
        Halfway through training, a slice whose image predicts the held-out samples poorly,
        but better than barely (weak: its maps in doubt), continues with the TV weight
        ``lam_s_poor`` (where above ``lam_s``): its outer k-space is barely explained, and a
        piecewise-smooth object gains from stronger TV (:func:`unrollinr.training.fit`). At
        three quarters, a slice so raised that still predicts them poorly, and not weakly,
        continues with ``lam_s_still_poor`` (where above ``lam_s_poor``). It goes back to its
        best iterate before a raise if that one predicted them better.
        ``coil_compression`` compresses to that many virtual coils first (None: off).
    Sections (:data:`SECTIONS`): the settings above fall in ``prior``, ``dc``, ``loss``,
    ``training`` and ``maps``; chain properties, ``--set`` and JSON settings accept
    ``"dc.lam"`` as well as ``"lam"``. For the settings in :data:`AUTOMATIC`, None means
    automatic (``coil_compression``: off); ``0``, ``"auto"`` and ``"none"`` mean the same.
    """

    regularizer: str = "inr"
    encoding: str = "HashGrid"
    encoding_backend: str = "torch"
    hash_levels: int = 16
    hash_features: int = 2
    hash_log2_size: int | None = None
    hash_base_resolution: int = 16
    hash_finest_resolution: int | None = None
    hidden_layers: int = 2
    hidden_width: int = 64
    mlp_precision: str = "auto"

    data_consistency: bool = True
    lam: float = 0.05
    lam_s: float = 0.35
    tv: bool = True
    tv_second_order: float = 0.5
    tv_log_scale: float = 0.1
    coil_l1: bool = True
    lam_s_poor: float = 1.0
    lam_s_still_poor: float = 2.0
    retry_lam_s_good: float = 0.1
    dc_solver: str = "auto"
    cg_iterations: int = 20
    cg_training_iterations: int = 5
    cg_tolerance: float = 0.0
    cg_warm_start: bool = True
    zero_outside_maps: bool = False

    iterations: int | None = None
    lr: float = 1e-2
    lr_lam: float = 1e-3
    lr_lam_s: float = 1e-3
    holdout_fraction: float = 0.05
    refine_fraction: float = 0.1
    patience: int = 100
    retry_iterations: int | None = None
    retry_patience: int = 20
    calibrationless_fallback: bool = True
    calibrationless_weight: float = 0.01
    seed: int = 0

    espirit_calib_width: int = 24
    espirit_kernel_width: int = 6
    espirit_thresh: float = 0.01
    espirit_crop: float = 0.95
    espirit_sets: int = 2
    retry_wider_maps: bool = True
    wider_maps_iterations: int | None = 50
    espirit_retry_crop: float = 0.5
    espirit_retry_thresh: float = 0.001
    coil_compression: int | None = None

    def __post_init__(self) -> None:
        for name in AUTOMATIC:  # 0, the older spelling of "automatic" (or "off"), is None
            if getattr(self, name) == 0:
                object.__setattr__(self, name, None)
        _check_choice("regularizer", self.regularizer, REGULARIZERS)
        _check_choice("encoding", self.encoding, ENCODINGS)
        _check_choice("encoding_backend", self.encoding_backend, ENCODING_BACKENDS)
        _check_choice("mlp_precision", self.mlp_precision, MLP_PRECISIONS)
        _check_choice("dc_solver", self.dc_solver, DC_SOLVERS)
        for name in ("hash_levels", "hash_features", "hash_base_resolution",
                     "hidden_width", "cg_iterations", "cg_training_iterations", "patience", "retry_patience",
                     "espirit_kernel_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in (*AUTOMATIC, "hidden_layers", "espirit_calib_width", "cg_tolerance", "lr_lam", "lr_lam_s",
                     "espirit_thresh", "espirit_retry_thresh", "tv_log_scale"):
            if getattr(self, name) is not None and getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        for name in ("lam", "lam_s", "lam_s_poor", "lam_s_still_poor", "retry_lam_s_good", "lr",
                     "calibrationless_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.espirit_sets not in (1, 2):
            raise ValueError(f"espirit_sets must be 1 or 2, got {self.espirit_sets}")
        if self.hash_features not in (1, 2, 4, 8):
            raise ValueError(f"hash_features must be 1, 2, 4 or 8 (tiny-cuda-nn), got {self.hash_features}")
        if not 0 <= self.tv_second_order <= 1:
            raise ValueError(f"tv_second_order must be in [0, 1], got {self.tv_second_order}")
        if not 0 <= self.holdout_fraction < 0.5:
            raise ValueError(f"holdout_fraction must be in [0, 0.5), got {self.holdout_fraction}")
        if not 0 <= self.refine_fraction <= 1:
            raise ValueError(f"refine_fraction must be in [0, 1], got {self.refine_fraction}")
        for name in ("espirit_crop", "espirit_retry_crop"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.tv and not self.zero_outside_maps and self.regularizer != "none":
            raise ValueError("without TV nothing constrains the prior outside the coil maps: "
                             "set zero_outside_maps=True when tv is off")
        if not self.data_consistency and self.regularizer == "none":
            raise ValueError("regularizer 'none' needs data_consistency: nothing would be reconstructed")

    @classmethod
    def retrospective(cls, **overrides: Any) -> ReconConfig:
        """The paper's retrospective preset (``lam`` 0.01, ``lam_s`` 0.5)."""
        return cls(**{"lam": 0.01, "lam_s": 0.5, **overrides})

    @classmethod
    def prospective(cls, **overrides: Any) -> ReconConfig:
        """The paper's prospective preset (``lam`` 0.05, ``lam_s`` 2.0)."""
        return cls(**{"lam": 0.05, "lam_s": 2.0, **overrides})

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ReconConfig:
        """A preset by name: ``"default"``, ``"retrospective"`` or ``"prospective"``."""
        presets: dict[str, Callable[..., ReconConfig]] = {"default": cls, "retrospective": cls.retrospective,
                                                           "prospective": cls.prospective}
        if name not in presets:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(presets)}")
        return presets[name](**overrides)

    @classmethod
    def from_strings(cls, values: Mapping[str, Any], *, base: ReconConfig | None = None) -> ReconConfig:
        """Build a config from text (or already typed) values, e.g. chain properties.

        A ``preset`` key sets the preset's initial weights (``lam``, ``lam_s``) on top of
        ``base`` (default: the default config); explicit values win over both. Unknown
        names and unparsable values raise ``ValueError`` naming the offending key.
        """
        values = {_flat_name(name): value for name, value in values.items()}
        preset = values.pop("preset", None)
        base = cls() if base is None else base
        if preset is not None:
            weights = cls.preset(str(preset))
            base = dataclasses.replace(base, lam=weights.lam, lam_s=weights.lam_s)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise ValueError(f"unknown reconstruction setting(s) {unknown}; known: {sorted(fields)}")
        typed = {name: parse_setting(name, value, _KINDS[name], automatic=name in AUTOMATIC)
                 for name, value in values.items()}
        return dataclasses.replace(base, **typed)

    @classmethod
    def load(cls, path: str | Path, *, base: ReconConfig | None = None) -> ReconConfig:
        """A config from a JSON file of setting names and values, such as the one
        ``unrollinr tune`` writes; settings it does not name keep ``base``'s values."""
        return cls.from_strings(load_settings(path), base=base)

    def training_iterations(self, image_size: int) -> int:
        """Adam steps for images whose larger side is ``image_size``."""
        return self.iterations or auto_iterations(image_size)

    def refine_steps(self, iterations: int) -> int:
        """The steps on every sample after a run of ``iterations`` steps with samples held
        out: ``refine_fraction`` as many."""
        return round(self.refine_fraction * iterations)

    def retry_steps(self, image_size: int) -> int:
        """Adam steps of a TV retry from a run's prior weights: ``retry_iterations``, at
        most the run's own (:meth:`training_iterations`; None: as many)."""
        return self._at_most_the_runs(self.retry_iterations, image_size)

    def wider_maps_steps(self, image_size: int) -> int:
        """Adam steps of the wider maps' retry from a run's prior weights:
        ``wider_maps_iterations``, at most the run's own (None: as many)."""
        return self._at_most_the_runs(self.wider_maps_iterations, image_size)

    def _at_most_the_runs(self, steps: int | None, image_size: int) -> int:
        """``steps``, at most :meth:`training_iterations` (None: as many)."""
        run = self.training_iterations(image_size)
        return run if steps is None else min(steps, run)

    def grid_config(self, image_size: int) -> dict[str, Any]:
        """The tiny-cuda-nn encoding config for images whose larger side is ``image_size``."""
        finest = self.hash_finest_resolution or image_size
        if self.encoding == "DenseGrid":
            return {"otype": "DenseGrid", "n_levels": 1, "n_features_per_level": self.hash_features,
                    "base_resolution": finest, "per_level_scale": 1.0}
        levels = self.hash_levels
        scale = (finest / self.hash_base_resolution) ** (1 / (levels - 1)) if levels > 1 else 1.0
        return {"otype": "HashGrid", "n_levels": levels, "n_features_per_level": self.hash_features,
                "log2_hashmap_size": self.hash_log2_size or auto_log2_table_size(finest),
                "base_resolution": self.hash_base_resolution,
                "per_level_scale": max(scale, 1.0)}


def load_settings(path: str | Path) -> dict[str, Any]:
    """The ``name -> value`` object of a JSON settings file; ``ValueError`` if it is not one."""
    try:
        values = json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not JSON: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a JSON object of setting names and values")
    return values


def auto_log2_table_size(finest_resolution: int) -> int:
    """``log2`` of the hash table for a finest level of ``finest_resolution``^2 cells: at
    most ``AUTO_CELLS_PER_ENTRY`` cells share an entry, and at least ``2^AUTO_MIN_LOG2``
    entries: 2^14 up to 256 x 256, 2^15 up to 362 x 362, 2^16 up to 512 x 512 (the
    measurements behind the rule are in ``bench/HISTORY.md``).
    """
    cells = finest_resolution**2
    return max(AUTO_MIN_LOG2, math.ceil(math.log2(cells / AUTO_CELLS_PER_ENTRY)))


def auto_iterations(image_size: int) -> int:
    """Adam steps for images whose larger side is ``image_size``: ``AUTO_ITERATIONS`` up to
    ``AUTO_LARGE_IMAGE``, ``AUTO_ITERATIONS_LARGE`` above (the measurements behind the
    rule are in ``bench/HISTORY.md``).
    """
    return AUTO_ITERATIONS_LARGE if image_size > AUTO_LARGE_IMAGE else AUTO_ITERATIONS


# Settings whose None means "automatic" (or, for coil_compression, "off"); 0 is accepted for it.
AUTOMATIC = ("hash_log2_size", "hash_finest_resolution", "iterations", "retry_iterations", "wider_maps_iterations",
             "coil_compression")

# The sections the settings fall in, in the order of ReconConfig's fields. Chain properties,
# --set and JSON settings name a setting flat ("lam") or with its section ("dc.lam").
SECTIONS = {
    "prior": ("regularizer", "encoding", "encoding_backend", "hash_levels", "hash_features", "hash_log2_size",
              "hash_base_resolution", "hash_finest_resolution", "hidden_layers", "hidden_width", "mlp_precision"),
    "dc": ("data_consistency", "lam", "dc_solver", "cg_iterations", "cg_training_iterations", "cg_tolerance",
           "cg_warm_start", "zero_outside_maps"),
    "loss": ("lam_s", "tv", "tv_second_order", "tv_log_scale", "coil_l1", "lam_s_poor", "lam_s_still_poor",
             "retry_lam_s_good"),
    "training": ("iterations", "lr", "lr_lam", "lr_lam_s", "holdout_fraction", "refine_fraction", "patience",
                 "retry_iterations", "retry_patience", "calibrationless_fallback", "calibrationless_weight", "seed"),
    "maps": ("espirit_calib_width", "espirit_kernel_width", "espirit_thresh", "espirit_crop", "espirit_sets",
             "retry_wider_maps", "wider_maps_iterations", "espirit_retry_crop", "espirit_retry_thresh",
             "coil_compression"),
}
_SECTION_OF = {name: section for section, names in SECTIONS.items() for name in names}


def _flat_name(name: str) -> str:
    """``"dc.lam"`` to ``"lam"``; a flat name (or ``preset``) as it is; a setting named
    under the wrong section is a ``ValueError``."""
    section, dot, field = name.partition(".")
    if not dot:
        return name
    if _SECTION_OF.get(field) != section:
        raise ValueError(f"unknown reconstruction setting {name!r}: sections are {sorted(SECTIONS)}, "
                         f"e.g. 'dc.lam', 'training.iterations'")
    return field


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def parse_setting(name: str, value: Any, kind: type, *, automatic: bool = False) -> Any:
    """Setting ``name``'s text (or already typed) ``value`` as a ``kind`` (``bool``, ``int``,
    ``float`` or ``str``); with ``automatic``, ``None``, ``""``, ``"auto"``, ``"none"`` and
    ``"off"`` give ``None``. A value that does not parse raises ``ValueError`` naming it."""
    if value is None and automatic:
        return None
    if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    text = str(value).strip()
    if automatic and text.lower() in ("", "auto", "none", "off"):
        return None
    try:
        if kind is bool:
            if text.lower() in _TRUE:
                return True
            if text.lower() in _FALSE:
                return False
            raise ValueError(text)
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        raise ValueError(f"setting {name!r} expects {kind.__name__}, got {value!r}") from None
    return text


# Each setting's value type, for parsing text.
_KINDS: dict[str, type] = {field.name: (int if field.name in AUTOMATIC else type(field.default))
                           for field in dataclasses.fields(ReconConfig)}
