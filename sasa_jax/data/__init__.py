"""TFDS input pipelines (ImageNet, Fashion-MNIST) with per-host sharding."""
from sasa_jax.data.input_pipeline import (DATASETS, eval_dataset, eval_steps, get_builder,
                                          normalize, num_examples, to_global, train_dataset)

__all__ = ["DATASETS", "eval_dataset", "eval_steps", "get_builder", "normalize", "num_examples", "to_global",
           "train_dataset"]
