r"""Fashion-MNIST (real data, 28x28): a small SASA ResNet-26 that trains on a CPU.

Attention in groups 2-4 (Table 3's best row) with a conv stem for small images.

  python -m sasa_jax.main --config=configs/fashion_mnist.py --workdir=runs/fmnist
  python -m sasa_jax.main --config=configs/fashion_mnist.py:variant=baseline --workdir=runs/fm_base
  python -m sasa_jax.main --config=configs/fashion_mnist.py:kernel_size=3,seed=1 --workdir=...

Arguments: any create_resnet keyword below (depth, variant, kernel_size, ...) and seed.
"""
import ml_collections

from sasa_jax.config_args import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, depth=26, variant="conv_stem_attention", attention_groups=(2, 3, 4),
                width_multiplier=0.125, kernel_size=7, num_heads=2,
                positional_encoding="relative", attention_type="qk+qr", stem_type="conv",
                impl="auto", seed=0)
  config = ml_collections.ConfigDict()
  config.model = dict(depth=a["depth"], variant=a["variant"], num_classes=10,
                      width_multiplier=a["width_multiplier"], kernel_size=a["kernel_size"],
                      num_heads=a["num_heads"], attention_groups=a["attention_groups"],
                      positional_encoding=a["positional_encoding"],
                      attention_type=a["attention_type"], stem_type=a["stem_type"],
                      small_images=True, impl=a["impl"])
  if a["variant"] == "baseline":
    config.model["attention_groups"] = ()
  if a["variant"] == "full_attention" and a["stem_type"] == "conv":
    config.model["stem_type"] = "spatially_aware"
  config.dataset = dict(name="fashion_mnist", data_dir=ml_collections.config_dict.placeholder(str), image_size=28, train_split="train",
                        eval_split="test", shuffle_buffer=16_384,
                        crop_padding=0)  # flips only: 3 epochs were too few to profit from crops
  config.batch_size = 128
  config.num_epochs = 5.0
  config.num_train_steps = -1
  config.learning_rate = 0.4        # for batch 256, scaled linearly
  config.momentum = 0.9
  config.nesterov = True
  config.warmup_epochs = 0.25
  config.weight_decay = 5e-5
  config.label_smoothing = 0.0
  config.ema_decay = 0.0            # off: too few steps for a slow average to help
  config.bn_momentum = 0.9
  config.log_every_steps = 50
  config.eval_every_steps = 1_000_000  # at the end only
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 2
  config.seed = a["seed"]
  config.dtype = "float32"
  config.profile = False
  config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)  # None: WORKDIR/compilation_cache
  return config
