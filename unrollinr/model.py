"""The UnrollINR network: a prior image ``z`` followed by one CG data-consistency step."""

from __future__ import annotations

import math

import torch
from torch import nn

from unrollinr.cg import DataConsistency
from unrollinr.config import ReconConfig
from unrollinr.hashgrid import make_grid_encoding
from unrollinr.mlp import relu_mlp


def pixel_coordinates(shape: tuple[int, int], device: torch.device | None = None) -> torch.Tensor:
    """Pixel centres of a ``(y, x)`` grid as ``(y * x, 2)`` coordinates ``(x, y)`` in (0, 1)."""
    n_y, n_x = shape
    ys = (torch.arange(n_y, dtype=torch.float32, device=device) + 0.5) / n_y
    xs = (torch.arange(n_x, dtype=torch.float32, device=device) + 0.5) / n_x
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([grid_x.reshape(-1), grid_y.reshape(-1)], dim=-1)


def _mlp(n_inputs: int, hidden_layers: int, width: int, n_outputs: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    size = n_inputs
    for _ in range(hidden_layers):
        layers += [nn.Linear(size, width), nn.ReLU(inplace=True)]  # no copy of each (pixels, width) activation
        size = width
    layers.append(nn.Linear(size, n_outputs))
    return nn.Sequential(*layers)


def bfloat16_is_fast(device: torch.device) -> bool:
    """Whether bfloat16 matrix products run natively: CUDA, or a CPU with AVX512-BF16/AMX."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def mlp_dtype(config: ReconConfig, device: torch.device) -> torch.dtype:
    """The MLP's compute precision for ``config.mlp_precision`` on ``device``."""
    if config.mlp_precision == "float32":
        return torch.float32
    if config.mlp_precision == "bfloat16" or bfloat16_is_fast(device):
        return torch.bfloat16
    return torch.float32


class INRImage(nn.Module):
    """``z = f_theta(phi(v))`` for one slice: grid encoding and MLP over the pixel centres.

    ``shape`` is ``(sets, y, x)``: the MLP has a complex output per set of coil maps, all
    from one encoding. ``forward()`` returns the complex images ``(sets, y, x)``. The MLP
    (``mlp``, an ``nn.Sequential`` of ``Linear`` and ``ReLU``) computes in
    ``compute_dtype`` through :func:`unrollinr.mlp.relu_mlp` (weights, the encoding and
    the output stay float32).

    ``mlp_sets`` (at least ``sets``; by default ``sets``) is how many sets the MLP has
    outputs for; only the first ``sets`` are read. A slice whose last sets of maps are
    empty is left without them, yet its prior starts as, and shares its weights with,
    that of the slice with all of them (a retry on other maps may need them).
    """

    coords: torch.Tensor

    def __init__(self, shape: tuple[int, int, int], config: ReconConfig, device: torch.device, seed: int, *,
                 mlp_sets: int | None = None) -> None:
        super().__init__()
        self.shape = shape
        n_sets, n_y, n_x = shape
        self.mlp_sets = n_sets if mlp_sets is None else mlp_sets
        if self.mlp_sets < n_sets:
            raise ValueError(f"mlp_sets {mlp_sets} is below the {n_sets} sets of the images")
        self.compute_dtype = mlp_dtype(config, device)
        self.encoding = make_grid_encoding(config.grid_config(max(n_y, n_x)), device, seed=seed,
                                           backend=config.encoding_backend)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation; the caller's CPU RNG state is kept
            torch.manual_seed(seed)
            mlp = _mlp(self.encoding.n_output_dims, config.hidden_layers, config.hidden_width, 2 * self.mlp_sets)
        self.mlp = mlp.to(device)
        self.register_buffer("coords", pixel_coordinates((n_y, n_x), device))

    def forward(self) -> torch.Tensor:
        """The prior images ``(sets, y, x)``, complex64."""
        features = self.encoding(self.coords)
        layers = [layer for layer in self.mlp if isinstance(layer, nn.Linear)]
        out = relu_mlp(features, layers, self.compute_dtype)
        n_sets, n_y, n_x = self.shape
        pairs = out.reshape(n_y, n_x, self.mlp_sets, 2)[:, :, :n_sets].permute(2, 0, 1, 3)
        return torch.view_as_complex(pairs.contiguous())


class PixelImage(nn.Module):
    """A learnable pixel image per set of maps, the control for what the INR adds. Starts at
    ``initial`` ``(sets, y, x)``.

    ``image_sets`` (at least ``sets``; by default ``sets``) is how many sets it holds images
    for, the others starting at zero; only the first ``sets`` are read (as
    :class:`INRImage`'s ``mlp_sets``: a retry on maps with more sets starts from its weights).
    """

    def __init__(self, initial: torch.Tensor, *, image_sets: int | None = None) -> None:
        super().__init__()
        self.n_sets = initial.shape[0]
        image_sets = self.n_sets if image_sets is None else image_sets
        if image_sets < self.n_sets:
            raise ValueError(f"image_sets {image_sets} is below the {self.n_sets} sets of the images")
        images = torch.zeros((image_sets, *initial.shape[1:]), dtype=initial.dtype, device=initial.device)
        images[:self.n_sets] = initial.detach()
        self.image = nn.Parameter(torch.view_as_real(images))

    def forward(self) -> torch.Tensor:
        """The prior images ``(sets, y, x)``, complex."""
        return torch.view_as_complex(self.image[:self.n_sets])


class UnrollINR(nn.Module):
    """One unrolled iteration per slice: prior ``z``, then ``x = DC(z, lambda)``.

    Parameters
    ----------
    priors
        One prior module per slice, each returning ``(sets, y, x)``; ``None`` for no prior
        (then ``z = 0`` and the DC step is SENSE with Tikhonov weight ``lambda``).
    dc
        The data-consistency step, or ``None`` for the "w/o DC" ablation (``x = z``).
    support
        ``(slices, sets, y, x)`` boolean: where ``z`` may be non-zero, at most where the
        set's coil maps are. Outside the maps no data constrain the image; there the first
        set's prior may fill the background smoothly, while every other set is zero (its
        maps exist only where one sensitivity vector does not explain the data).
    lam, lam_s
        Initial positive weights, learned in log space, one per slice.
    """

    support: torch.Tensor

    def __init__(self, priors: list[nn.Module] | None, dc: DataConsistency | None,
                 support: torch.Tensor, lam: float, lam_s: float) -> None:
        super().__init__()
        n_slices = support.shape[0]
        self.priors = nn.ModuleList(priors) if priors is not None else None
        self.dc = dc
        self.register_buffer("support", support)
        self.full_support = bool(support.all())
        self.log_lam = nn.Parameter(torch.full((n_slices,), math.log(lam)))
        self.log_lam_s = nn.Parameter(torch.full((n_slices,), math.log(lam_s)))

    @property
    def lam(self) -> torch.Tensor:
        """DC weights ``(slices,)``."""
        return self.log_lam.exp()

    @property
    def lam_s(self) -> torch.Tensor:
        """TV weights ``(slices,)``."""
        return self.log_lam_s.exp()

    def prior(self, like: torch.Tensor) -> torch.Tensor:
        """The prior images ``z`` ``(slices, sets, y, x)``, zero outside the support; zeros without priors."""
        if self.priors is None:
            return torch.zeros_like(like)
        images = [prior() for prior in self.priors]
        z = images[0].unsqueeze(0) if len(images) == 1 else torch.stack(images)
        return z if self.full_support else z * self.support

    def forward(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(x, z)``, both ``(slices, sets, y, x)``; ``like`` gives shape and dtype of ``z``."""
        z = self.prior(like).to(like.dtype)
        x = self.dc(z, self.lam) if self.dc is not None else z
        return x, z
