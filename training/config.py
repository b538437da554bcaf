"""``TrainConfig``: every training option, typed, bounded and documented in one place.

The CLI (``loraplex train``) builds its options from these fields, so a new field appears in ``--help``
without touching the command. Cross-field rules live in ``_consistent``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from adapters_store.names import validate_name
from adapters_store.preparation import MAX_TEXT_LENGTH, MIN_TEXT_LENGTH

Strategy = Literal["head", "lora", "ia3", "partial", "full"]
TrainTask = Literal[
    "text-classification", "image-classification", "audio-classification", "feature-extraction"
]
DomainMethod = Literal["none", "dann", "mmd", "self-training"]
PoolingChoice = Literal["auto", "mean", "cls", "pooler"]
STRATEGIES: tuple[str, ...] = ("head", "lora", "ia3", "partial", "full")


class TrainConfig(BaseModel):
    """What to train, on which data, and how. ``training.train(config)`` runs it and registers the bundle."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, validate_assignment=True)

    # --- where: store, base, names ------------------------------------------------------------------
    store: Any = Field(description="store URL/path (open_store) or an AdapterStore object")
    base: str = Field(description="registered base model name to train on")
    tenant: str = Field(description="tenant that owns the new adapter")
    name: str = Field(description="adapter name; the store assigns the next version")
    strategy: Strategy = Field(default="head", description="head | lora | ia3 | partial | full")
    task: TrainTask = Field(
        default="text-classification",
        description="what the adapter predicts; feature-extraction = an embedding adapter (lora/ia3) trained "
        "through a temporary head on the labels, which is not saved",
    )

    # --- data ----------------------------------------------------------------------------------------
    train_file: Path | None = Field(
        default=None,
        description="labelled training data: CSV/TSV/JSONL with a text and a label column, or an image "
        "folder with one sub-folder per class",
    )
    val_file: Path | None = Field(default=None, description="validation CSV/JSONL or folder; else split")
    text_column: str = Field(default="text", min_length=1, description="column holding the text")
    label_column: str = Field(default="label", min_length=1, description="column holding the label")
    val_fraction: float = Field(default=0.2, gt=0.0, lt=0.9, description="stratified validation share")
    target_file: Path | None = Field(
        default=None,
        description="unlabelled target-domain data for --domain-adaptation: a table that needs only the "
        "text column (or an image folder); unused (with a warning) when domain adaptation is none",
    )

    # --- optimisation ----------------------------------------------------------------------------------
    epochs: int = Field(default=5, ge=1, le=1000, description="maximum passes over the training data")
    lr: float = Field(default=1e-3, gt=0.0, le=1.0, description="learning rate of the head / adapter")
    weight_decay: float = Field(default=0.01, ge=0.0, le=1.0, description="AdamW weight decay")
    batch_size: int = Field(default=16, ge=1, le=4096, description="examples per forward pass")
    grad_accum_steps: int = Field(default=1, ge=1, le=1024, description="batches per optimizer step")
    max_seq_len: int = Field(
        default=128,
        ge=MIN_TEXT_LENGTH,
        le=MAX_TEXT_LENGTH,
        description="tokens kept per text; recorded in the bundle, and serving truncates each text of this "
        "adapter the same way (capped by the server's LORAPLEX_MAX_TOKENS)",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1, description="seeds data split, init and shuffling")
    patience: int = Field(default=0, ge=0, le=1000, description="early stop after N epochs w/o gain; 0=off")
    restore_best: bool = Field(default=True, description="keep the best validation epoch, not the last")
    monitor: Literal["macro_f1", "accuracy"] = Field(default="macro_f1", description="validation metric")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        le=256,
        description="torch CPU threads; default auto: the cores other processes leave idle (at least 1)",
    )
    progress: bool | None = Field(
        default=None, description="progress bar per epoch; default: only when stderr is a terminal"
    )
    min_val_accuracy: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="refuse to register (nothing is stored) when the validation accuracy ends below this",
    )

    # --- head ------------------------------------------------------------------------------------------
    pooling: PoolingChoice = Field(default="auto", description="auto: pooler for BERT lora/ia3, else mean")
    head_hidden: int | None = Field(
        default=None, ge=1, le=65536, description="hidden layer width of the head"
    )
    head_activation: Literal["relu", "tanh", "gelu"] = Field(default="relu", description="hidden activation")
    feature_cache_dir: Path | None = Field(default=None, description="reuse backbone features across runs")

    # --- lora / ia3 ------------------------------------------------------------------------------------
    lora_r: int = Field(default=8, ge=1, le=1024, description="LoRA rank")
    lora_alpha: float = Field(default=16.0, gt=0.0, le=4096.0, description="LoRA scaling numerator")
    lora_dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the LoRA input")
    target_modules: list[str] | None = Field(
        default=None, description="modules to adapt (lora/ia3); None: the architecture's default"
    )

    # --- partial / full ------------------------------------------------------------------------------
    top_k: int = Field(default=2, ge=1, le=1024, description="partial: how many top blocks to train")
    backbone_lr: float | None = Field(default=None, gt=0.0, le=1.0, description="top block lr; None=lr")
    layer_lr_decay: float = Field(default=1.0, gt=0.0, le=1.0, description="lr x decay per block down")
    unfreeze_every: int = Field(
        default=0,
        ge=0,
        le=1000,
        description="head only first, then one more block every N epochs; restore_best then only considers "
        "epochs that trained blocks",
    )

    # --- domain adaptation ---------------------------------------------------------------------------
    domain_adaptation: DomainMethod = Field(default="none", description="none | dann | mmd | self-training")
    da_weight: float = Field(default=0.5, ge=0.0, le=100.0, description="weight of the DANN / MMD loss")
    pseudo_label_threshold: float = Field(default=0.9, gt=0.0, lt=1.0, description="self-training confidence")
    self_training_rounds: int = Field(default=2, ge=1, le=50, description="pseudo-labelling iterations")

    @field_validator("base", "tenant", "name")
    @classmethod
    def _names(cls, v: str, info) -> str:
        return validate_name(v, info.field_name)

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        from training.errors import TrainConfigError

        if self.task == "feature-extraction" and self.strategy not in ("lora", "ia3"):
            raise TrainConfigError(
                "task feature-extraction trains an embedding adapter: use strategy lora or ia3"
            )

        if self.domain_adaptation != "none" and self.strategy not in ("head", "lora"):
            raise TrainConfigError(
                f"domain adaptation works with strategy head or lora, not {self.strategy!r}"
            )
        if self.strategy in ("lora", "ia3") and self.task == "audio-classification":
            raise TrainConfigError(
                f"strategy {self.strategy!r} supports text and image classification; use head"
            )
        if self.layer_lr_decay < 1.0 and self.strategy not in ("partial", "full"):
            raise TrainConfigError("layer_lr_decay applies to strategy partial or full")
        if self.unfreeze_every and self.strategy not in ("partial", "full"):
            raise TrainConfigError("unfreeze_every applies to strategy partial or full")
        if self.unfreeze_every and self.epochs <= self.unfreeze_every:
            raise TrainConfigError(
                f"unfreeze_every={self.unfreeze_every} with epochs={self.epochs} never trains a block: "
                f"give more than {self.unfreeze_every} epochs"
            )
        return self

    @property
    def effective_backbone_lr(self) -> float:
        return self.backbone_lr if self.backbone_lr is not None else self.lr
