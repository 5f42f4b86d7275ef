r"""Fashion-MNIST (real data, 28x28): a small SASA ResNet-26 that trains on a CPU.

Attention in groups 3-4 (Table 3: conv groups 1-2 + attention groups 3-4, tied for its best
row) with a conv stem for small images: at 28 px, groups 1-2 work on 14x14 and 7x7 maps where
a 7x7 window is a third of the image, and attention there costs the demo half its step time.

  python -m sasa_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
  python -m sasa_jax.main --config=configs/fashion_mnist.py:variant=baseline --workdir=runs/fm_base
  python -m sasa_jax.main --config=configs/fashion_mnist.py:kernel_size=3,seed=1 --workdir=...

Arguments: any create_resnet keyword (depth, variant, kernel_size=7-7-5, ...), seed,
batch_size, num_epochs, dtype, num_microbatches,
batch_norm_group_size; each equals its flag
(--config.model.variant=baseline).
"""
from sasa_jax import base_config


def get_config(arg=None):
  config = base_config.get_config()
  config.model = base_config.model_config(
      depth=26, variant="conv_stem_attention", num_classes=10, width_multiplier=0.125,
      kernel_size=7, num_heads=2, attention_groups=(3, 4), small_images=True)
  config.dataset.update(name="fashion_mnist", image_size=28, train_split="train",
                        eval_split="test",
                        crop_padding=0)  # flips only: 3 epochs were too few to profit from crops
  config.batch_size = 128
  config.num_epochs = 4.0
  config.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=5e-4)
  config.schedule.update(name="cosine", warmup_epochs=0.25, end_value=0.0)
  config.schedule.peak_value = base_config.linear_scaling(config, per_256=0.4)
  config.label_smoothing = 0.1
  config.ema_decay = 0.0            # off: too few steps for a slow average to help
  config.bn_momentum = 0.9
  config.log_every_steps = 50
  config.eval_every_steps = 1_000_000  # at the end only
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  base_config.apply_arg(config, arg)
  return config
