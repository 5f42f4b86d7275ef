r"""ImageNet (imagenet2012 from a prepared TFDS data_dir): the paper's recipe (App. A.2).

130 epochs, Nesterov momentum 0.9, learning rate 1.6 at batch 4096 (0.1 per 256, scaled
linearly below), 10 warm-up epochs then cosine, BN decay 0.9999, EMA of weights 0.9999,
224 px Inception crop + flip. Not in the paper (our choices): weight decay 1e-4 on kernels,
label smoothing 0.1, bfloat16 activations, the initialisation (docs/training.md).

Table 1 rows (depth 26/38/50 x variant):
  python -m sasa_jax.main --config=configs/imagenet.py:depth=50,variant=full_attention \
      --workdir=gs://BUCKET/sasa/r50_full --config.dataset.data_dir=gs://BUCKET/tfds
Ablations (ResNet-50 conv-stem + attention unless stated), held-out 4% of train for 3 and 5:
  Table 3: :variant=conv_stem_attention,attention_groups=2-3-4,holdout=true
  Table 4: :variant=conv_stem_attention,kernel_size=5
  Table 5: :variant=conv_stem_attention,positional_encoding=absolute,holdout=true
  Table 6: :variant=conv_stem_attention,attention_type=qr
  Table 7: :variant=full_attention,stem_type=conv_values
A held-out run's validation accuracy, once trained:
  python -m sasa_jax.tools.evaluate --workdir=gs://BUCKET/sasa/RUN --split=validation
Every run under gs://BUCKET/sasa in its paper row, next to the paper's number:
  python -m sasa_jax.tools.compare_paper gs://BUCKET/sasa
Arguments: any create_resnet keyword, seed, batch_size, num_epochs, dtype, num_microbatches,
batch_norm_group_size and holdout; each model argument equals its flag
(--config.model.kernel_size=5). Batch 4096 on fewer chips than its memory needs:
num_microbatches=4 runs each step as 4 batches of 1024. BatchNorm over 32 images, as over
one of 128 TPUv3 cores' shares of 4096 (the paper does not say): batch_norm_group_size=32
(docs/training.md). On a TPU slice or a SLURM cluster: docs/scaling_out.md.
"""
from sasa_jax import base_config


def get_config(arg=None):
  config = base_config.get_config()
  config.model = base_config.model_config(depth=50, variant="full_attention", num_classes=1000)
  config.batch_size = 4096
  config.num_epochs = 130.0
  config.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
  config.schedule.update(name="cosine", warmup_epochs=10.0, end_value=0.0)
  config.schedule.peak_value = base_config.linear_scaling(config, per_256=0.1)  # 1.6 at 4096
  config.label_smoothing = 0.1
  config.ema_decay = 0.9999
  config.bn_momentum = 0.9999
  config.dtype = "bfloat16"  # logging, eval and checkpoint intervals: base_config's
  extras = base_config.apply_arg(config, arg, holdout=False)
  if extras["holdout"]:
    config.dataset.update(train_split="train[:96%]", eval_split="train[96%:]")
  return config
