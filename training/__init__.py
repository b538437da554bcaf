"""loraplex training: turn a registered base plus a tenant's data into a registered adapter bundle.

>>> from training import TrainConfig, train  # doctest: +SKIP
>>> train(TrainConfig(store=".loraplex/store", base="minilm", tenant="acme", name="intent",
...                   strategy="lora", train_file="intents.csv"))  # doctest: +SKIP
"""

from training.config import TrainConfig
from training.pipeline import train, train_bundle
from training.promote import promote_full_to_base

__all__ = ["TrainConfig", "promote_full_to_base", "train", "train_bundle"]
