"""The model zoo: ResNet-26/38/50 baseline and SASA variants."""
from sasa_jax.models.factory import OVERRIDES, VARIANTS, create_resnet
from sasa_jax.models.resnet import QUICK_DEPTH, STAGE_BLOCKS, BottleneckBlock, SASAResNet

__all__ = ["OVERRIDES", "QUICK_DEPTH", "STAGE_BLOCKS", "VARIANTS", "BottleneckBlock",
           "SASAResNet", "create_resnet"]
