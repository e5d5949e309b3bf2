"""The prior's ReLU MLP as one autograd function, in a chosen compute precision.

At the INR's sizes (a 256 x 256 slice is 65 536 rows, 64 wide) every layer is bound by
memory traffic, not arithmetic. Layer by layer under autocast, each hidden layer writes its
product, then reads and writes it again for the ReLU, and autograd casts around each layer.
Here the product and its ReLU are one oneDNN call on the CPU, the weights are cast once,
and the backward pass is written out. The numbers equal those of the ``nn.Sequential``
under autocast in bfloat16, and to rounding in float32, where BLAS computes the sequential
layers' products (``tests/test_mlp.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


def _fused_linear_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether oneDNN's fused linear + ReLU (the CPU kernel behind autocast's bfloat16
    products) runs here, in ``dtype``."""
    return (device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def _linear(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, relu: bool, fused: bool) -> torch.Tensor:
    """``relu(inputs @ weight.T + bias)`` (or without the ReLU), ``(rows, out)``."""
    if fused:
        return torch.ops.mkldnn._linear_pointwise(inputs, weight, bias, "relu" if relu else "none", [], "")
    out = torch.addmm(bias, inputs, weight.t())
    return out.relu_() if relu else out


class _ReluMLP(torch.autograd.Function):
    """Hidden layers ``relu(h W^T + b)``, a linear output layer, all in ``dtype``; the
    output and the gradients come back in the parameters' and input's dtypes."""

    @staticmethod
    def forward(ctx: Any, features: torch.Tensor, dtype: torch.dtype, *parameters: torch.Tensor) -> torch.Tensor:
        weights = [weight.to(dtype) for weight in parameters[0::2]]
        biases = [bias.to(dtype) for bias in parameters[1::2]]
        fused = _fused_linear_available(features.device, dtype)
        hidden = features.to(dtype)
        layer_inputs = []
        for number, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            layer_inputs.append(hidden)
            hidden = _linear(hidden, weight, bias, relu=number < len(weights) - 1, fused=fused)
        ctx.save_for_backward(*layer_inputs, *weights)
        ctx.dtypes = (features.dtype, parameters[0].dtype)
        return hidden.to(parameters[0].dtype)

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        n_layers = len(saved) // 2
        layer_inputs, weights = saved[:n_layers], saved[n_layers:]
        input_dtype, parameter_dtype = ctx.dtypes
        grad = grad_output.to(weights[0].dtype)
        parameter_grads: list[torch.Tensor] = []
        for number in reversed(range(n_layers)):
            parameter_grads[:0] = [(grad.t() @ layer_inputs[number]).to(parameter_dtype),
                                   grad.sum(dim=0).to(parameter_dtype)]
            grad = grad @ weights[number]
            if number > 0:  # through the ReLU whose output is this layer's input
                grad = torch.ops.aten.threshold_backward(grad, layer_inputs[number], 0)
        return (grad.to(input_dtype), None, *parameter_grads)


def relu_mlp(features: torch.Tensor, layers: Sequence[nn.Linear], dtype: torch.dtype) -> torch.Tensor:
    """Apply ``Linear, ReLU, ..., Linear`` to ``features`` ``(rows, in)``, computing in
    ``dtype``; returns ``(rows, out)`` in the layers' dtype."""
    parameters = [tensor for layer in layers for tensor in (layer.weight, layer.bias)]
    return _ReluMLP.apply(features, dtype, *parameters)
