r"""COCO (coco/2017 from a prepared TFDS data_dir): RetinaNet of the SASA paper's Table 2.

The paper's recipe (App. A.3): 150 epochs, batch 64, learning rate warmed up from 0 to 0.12
over 1 epoch then cosine, multiscale jitter, images cropped/padded to 640 x 640, horizontal
flips. Not in the paper (our choices): SGD with Nesterov momentum 0.9, weight decay 1e-4 on
kernels, scale jitter 0.8-1.25 of the longer side, BatchNorm momentum 0.99, bfloat16
activations, training from scratch (the backbone is not initialised from ImageNet), the
RetinaNet reference's loss settings (focal alpha 0.25, gamma 2, Huber delta 0.1, box weight
50) and post-processing (1000 candidates, 100 detections, score >= 0.05, NMS IoU 0.5).

Table 2 rows (heads + FPN / backbone):
  conv / baseline:
    python -m sasa_jax.main --config=configs/coco_retinanet.py:backbone_variant=baseline,heads=conv \
        --workdir=gs://BUCKET/sasa/retina_conv_base --config.dataset.data_dir=gs://BUCKET/tfds
  conv / conv-stem + attention:  :backbone_variant=conv_stem_attention,heads=conv
  conv / full attention:         :backbone_variant=full_attention,heads=conv
  attention / conv-stem + attn:  :backbone_variant=conv_stem_attention,heads=attention
  attention / full attention:    :backbone_variant=full_attention,heads=attention
Every run under gs://BUCKET/sasa in its row, next to the paper's AP:
  python -m sasa_jax.tools.compare_paper gs://BUCKET/sasa
Arguments: any create_retinanet keyword (depth, head_kernel_size, p6_input, aspect_ratios=
0.5-1.0-2.0, ...), seed, batch_size, num_epochs, dtype, num_microbatches,
batch_norm_group_size; each equals its flag
(--config.model.heads=conv). On a TPU slice or a SLURM cluster: docs/scaling_out.md.
"""
from sasa_jax import base_config


def get_config(arg=None):
  config = base_config.get_config()
  config.task = "detection"
  config.model = base_config.retinanet_config(
      backbone_variant="full_attention", heads="attention", depth=50, num_classes=80)
  config.dataset.update(name="coco/2017", image_size=640, train_split="train",
                        eval_split="validation", shuffle_buffer=4_096)
  config.detection.update(max_boxes=100, scale_min=0.8, scale_max=1.25)
  config.batch_size = 64
  config.num_epochs = 150.0
  config.optimizer.update(name="sgd", momentum=0.9, nesterov=True, weight_decay=1e-4)
  config.schedule.update(name="cosine", warmup_epochs=1.0, end_value=0.0)
  config.schedule.peak_value = base_config.linear_scaling(config, per_256=0.48)  # 0.12 at 64
  config.bn_momentum = 0.99
  config.dtype = "bfloat16"
  config.eval_every_steps = 20_000
  config.checkpoint_every_steps = 2_000
  base_config.apply_arg(config, arg)
  return config
