"""TFDS input pipelines (ImageNet, Fashion-MNIST, COCO and its Fashion-MNIST stand-in) with
per-host sharding."""
from sasa_jax.data.input_pipeline import (DATASETS, eval_dataset, eval_steps, get_builder,
                                          ground_truth, normalize, num_examples, spec_of,
                                          to_global, train_dataset)

__all__ = ["DATASETS", "eval_dataset", "eval_steps", "get_builder", "ground_truth", "normalize",
           "num_examples", "spec_of", "to_global", "train_dataset"]
