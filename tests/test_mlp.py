import pytest
import torch
from torch import nn

from unrollinr.mlp import relu_mlp


def _mlp(dtype: torch.dtype = torch.float32) -> nn.Sequential:
    torch.manual_seed(3)
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def _outputs_and_gradients(run, features: torch.Tensor, mlp: nn.Sequential, weights: torch.Tensor):
    features = features.clone().requires_grad_(True)
    mlp.zero_grad()
    out = run(features)
    (out * weights).sum().backward()
    return [out.detach(), features.grad] + [p.grad for p in mlp.parameters()]


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_the_mlp_function_equals_the_sequential_layers(compute_dtype):
    mlp = _mlp()
    features = torch.randn(300, 6)
    weights = torch.randn(300, 4)
    linears = [layer for layer in mlp if isinstance(layer, nn.Linear)]

    def layer_by_layer(inputs):
        with torch.autocast("cpu", dtype=compute_dtype, enabled=compute_dtype != torch.float32):
            return mlp(inputs).float()

    expected = _outputs_and_gradients(layer_by_layer, features, mlp, weights)
    actual = _outputs_and_gradients(lambda inputs: relu_mlp(inputs, linears, compute_dtype), features, mlp, weights)
    assert actual[0].dtype == torch.float32 and all(g.dtype == torch.float32 for g in actual[1:])
    # bfloat16: the same oneDNN kernels, bit for bit. float32: oneDNN's product against
    # BLAS's, whose sums may run in another order (equal on an Intel Xeon, one rounding
    # step apart on an AMD EPYC); a wrong weight or index is off by orders more.
    exact = compute_dtype == torch.bfloat16
    for got, want in zip(actual, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0 if exact else 1e-5, atol=0 if exact else 1e-6)


def test_the_mlp_gradients_match_finite_differences():
    mlp = _mlp(torch.float64)
    linears = [layer for layer in mlp if isinstance(layer, nn.Linear)]
    features = torch.rand(20, 6, dtype=torch.float64, requires_grad=True)
    # gradcheck perturbs the parameters in place, so the layers see each perturbation
    assert torch.autograd.gradcheck(lambda inputs, *_: relu_mlp(inputs, linears, torch.float64),
                                    (features, *mlp.parameters()))
