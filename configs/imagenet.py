r"""ImageNet (imagenet2012 from a prepared TFDS data_dir): the paper's recipe (App. A.2).

130 epochs, Nesterov momentum 0.9, learning rate 1.6 at batch 4096 (0.1 per 256, scaled
linearly), 10 warm-up epochs then cosine, BN decay 0.9999, EMA of weights 0.9999, 224 px
Inception crop + flip. Not in the paper (our choices): weight decay 1e-4 on kernels,
label smoothing 0.1, bfloat16 activations.

Table 1 rows (depth 26/38/50 x variant):
  python -m sasa_jax.main --config=configs/imagenet.py:depth=50,variant=full_attention \
      --workdir=gs://BUCKET/sasa/r50_full --config.dataset.data_dir=gs://BUCKET/tfds
Ablations (ResNet-50 conv-stem + attention unless stated), held-out 4% of train for 3 and 5:
  Table 3: :variant=conv_stem_attention,attention_groups=2-3-4,holdout=true
  Table 4: :variant=conv_stem_attention,kernel_size=5
  Table 5: :variant=conv_stem_attention,positional_encoding=absolute,holdout=true
  Table 6: :variant=conv_stem_attention,attention_type=qr
  Table 7: :variant=full_attention,stem_type=conv_values
On a TPU pod slice, see launch/ and the README's "Scaling out".
"""
import ml_collections

from sasa_jax.config_args import parse_arg


def get_config(arg=None):
  a = parse_arg(arg, depth=50, variant="full_attention", attention_groups=None, kernel_size=7,
                num_heads=8, positional_encoding="relative", attention_type="qk+qr",
                stem_type=None, width_multiplier=1.0, impl="auto", holdout=False, seed=0,
                batch_size=4096)
  config = ml_collections.ConfigDict()
  groups = a["attention_groups"]
  config.model = dict(depth=a["depth"], variant=a["variant"], num_classes=1000,
                      width_multiplier=a["width_multiplier"], kernel_size=a["kernel_size"],
                      num_heads=a["num_heads"], positional_encoding=a["positional_encoding"],
                      attention_type=a["attention_type"], impl=a["impl"])
  if groups is not None:
    config.model["attention_groups"] = (() if groups.lower() in ("", "none")
                                        else tuple(int(g) for g in groups.split("-")))
  if a["stem_type"] is not None:
    config.model["stem_type"] = a["stem_type"]
  config.dataset = dict(
      name="imagenet2012", data_dir=ml_collections.config_dict.placeholder(str), image_size=224,
      train_split="train[:96%]" if a["holdout"] else "train",
      eval_split="train[96%:]" if a["holdout"] else "validation", shuffle_buffer=16_384)
  config.batch_size = a["batch_size"]
  config.num_epochs = 130.0
  config.num_train_steps = -1
  config.learning_rate = 0.1        # per 256 examples: 1.6 at batch 4096
  config.momentum = 0.9
  config.nesterov = True
  config.warmup_epochs = 10.0
  config.weight_decay = 1e-4
  config.label_smoothing = 0.1
  config.ema_decay = 0.9999
  config.bn_momentum = 0.9999
  config.log_every_steps = 100
  config.eval_every_steps = 5_000
  config.checkpoint_every_steps = 1_000
  config.keep_checkpoints = 3
  config.seed = a["seed"]
  config.dtype = "bfloat16"
  config.profile = False
  config.compilation_cache_dir = ml_collections.config_dict.placeholder(str)  # None: WORKDIR/compilation_cache
  return config
