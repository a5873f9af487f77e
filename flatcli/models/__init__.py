"""The model zoo: the architectures of "Flatness is a False Friend" (Granziol 2020).

Build a model by name; every model takes images (B, C, H, W) of any of the data sets
(digits 1x8x8, MNIST 1x28x28, CIFAR 3x32x32) and returns logits (B, num_classes).

>>> import torch
>>> model = build_model("mlp", input_shape=(1, 8, 8), num_classes=10, width=32)
>>> model(torch.zeros(5, 1, 8, 8)).shape
torch.Size([5, 10])
>>> resolve_kwargs("mlp", width=32)   # what a checkpoint records to rebuild the model
{'width': 32, 'depth': 1}
"""

# Importing the model modules registers them, in this order.
from flatcli.models import linear, mlp, cnn, vgg, preresnet, wrn  # noqa: F401  (isort: skip)
from flatcli.models.registry import (
    MODELS,
    LayerInfo,
    ModelSpec,
    build_model,
    layer_fan_ins,
    model_names,
    register,
    resolve_kwargs,
)

__all__ = [
    # registry
    "MODELS",
    "ModelSpec",
    "build_model",
    "model_names",
    "register",
    "resolve_kwargs",
    # rank bound
    "LayerInfo",
    "layer_fan_ins",
]
