"""Model registry: the paper's architectures (LeNet-5, VGG-mini, ResNet-mini), LiRA's shadow models (cnn32-3-max,
WideResNet-28-2) and logistic regression.

All models are plain ``nn.Module`` s built from out-of-place ops, so they work with
``torch.func.functional_call`` and ``torch.func.vmap`` over parameters (per-sample gradients).
Models containing BatchNorm (``vgg_mini``, ``resnet_mini``, ``wrn28_2``) update running statistics in
place in train mode; vmap them in eval mode or after ``torch.func.replace_all_batch_norm_modules_``.
"""

from rayforge.models.registry import build_model, is_code_reference, model_names, param_count, register_model

# Importing the model modules registers them.
from rayforge.models import cnn32, lenet5, logreg, resnet_mini, vgg_mini, wrn  # noqa: E402,F401

__all__ = ["build_model", "is_code_reference", "model_names", "param_count", "register_model"]
