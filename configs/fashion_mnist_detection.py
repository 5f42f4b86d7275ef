r"""Fashion-MNIST detection (real items on 96 px canvases, sasa_jax.data.
fashion_mnist_detection): a small attention RetinaNet that trains on a CPU (`make
detect-demo`).

ResNet-26 backbone at 1/8 width with attention in groups 3-4 (as the classification demo),
FPN P3-P5 of 64 channels and 2-layer heads, SASA (k = 3, 8 heads) in the FPN and heads;
anchors of 24-48 px at P3, since the items are 20-48 px. On these 3x3 to 12x12 maps the
attention heads learned faster with more, smaller windows: the focal loss after 1,000 of
1,500 steps was 0.41 with k = 5 and 4 heads, 0.33 with k = 3 and 4 heads, 0.28 with k = 3
and 8 heads (conv heads: 0.20; docs/detection.md).

  python -m sasa_jax.main --config=configs/fashion_mnist_detection.py --workdir=runs/detect
  python -m sasa_jax.main --config=configs/fashion_mnist_detection.py:heads=conv --workdir=...

Arguments: any create_retinanet keyword, seed, batch_size, num_epochs, dtype,
num_microbatches; each equals its flag (--config.model.heads=conv).
"""
from sasa_jax import base_config


def get_config(arg=None):
  config = base_config.get_config()
  config.task = "detection"
  config.model = base_config.retinanet_config(
      backbone_variant="conv_stem_attention", heads="attention", depth=26, num_classes=10,
      width_multiplier=0.125, kernel_size=7, num_heads=2, attention_groups=(3, 4),
      min_level=3, max_level=5, anchor_scale=3.0, fpn_width=64, head_layers=2,
      head_kernel_size=3, head_num_heads=8)
  config.dataset.update(name="fashion_mnist_detection", image_size=96, train_split="train",
                        eval_split="test", shuffle_buffer=12_000)
  config.detection.update(max_boxes=8, scale_min=0.9, scale_max=1.1, pre_nms=200,
                          max_detections=50)
  config.batch_size = 32
  config.num_epochs = 3.0
  config.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
  config.schedule.update(name="cosine", warmup_epochs=0.25, end_value=0.0)
  config.schedule.peak_value = base_config.linear_scaling(config, per_256=0.4)
  config.bn_momentum = 0.9
  config.log_every_steps = 50
  config.eval_every_steps = 1_000_000  # at the end only
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  base_config.apply_arg(config, arg)
  return config
