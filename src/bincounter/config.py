"""Every stage's parameters, in one typed place.

Each stage takes one of these frozen models and nothing else, so the CLI (tyro), the KFP
components and the MLflow parameter log all see the same names, defaults and validation.
Unknown fields are rejected rather than silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Config(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def flat(self, prefix: str = "") -> dict[str, object]:
        """Flatten nested configs into dotted keys (for MLflow params)."""
        out: dict[str, object] = {}
        for key, value in self:
            name = f"{prefix}{key}"
            if isinstance(value, _Config):
                out.update(value.flat(f"{name}."))
            else:
                out[name] = value
        return out


PUBLIC_BUCKET = "s3://aft-vbi-pds"


class SynthConfig(_Config):
    """Synthetic bin photos in the real bucket's layout, for offline demos and tests."""

    n_images: int = Field(300, ge=1, description="How many photos to generate.")
    max_count: int = Field(5, ge=0, description="Largest number of items in one bin.")
    image_size: int = Field(224, ge=32, description="Width and height of each photo in pixels.")
    seed: int = Field(0, description="Same seed, same photos, byte for byte.")
    jpeg_quality: int = Field(90, ge=10, le=100)


class SourceConfig(_Config):
    """Where the dataset lives: an S3 URI (any endpoint) or a local folder, bucket layout."""

    uri: str = Field(PUBLIC_BUCKET, description="s3://bucket[/prefix] or a local folder.")
    endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto...).")
    profile: str | None = Field(None, description="AWS credentials profile; implies signed requests.")
    anonymous: bool = Field(True, description="Unsigned requests (the public bucket needs no account).")
    region: str = "us-east-1"

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


class IngestConfig(_Config):
    """Which photos to fetch and how hard to push the source."""

    source: SourceConfig = SourceConfig()
    ids: tuple[str, ...] = Field((), description="Exact ids to fetch ('523' and '00523' differ).")
    file_list: str | None = Field(None, description="Udacity file_list.json: {count: [metadata/<id>.json]}.")
    limit: int | None = Field(None, ge=1, description="Fetch at most this many ids (in listing order).")
    per_class: int | None = Field(None, ge=1, description="Class-balanced: at most N ids per count.")
    max_count: int | None = Field(None, ge=0, description="With per_class: counts above this are pooled.")
    workers: int = Field(32, ge=1, description="Concurrent downloads.")
    retries: int = Field(8, ge=0, description="Retries per object on throttling and 5xx.")
    connect_timeout: float = Field(5.0, gt=0)
    read_timeout: float = Field(30.0, gt=0)
    progress: bool = True


class PreprocessConfig(_Config):
    """Validate, clean, split, resize and pack into webdataset shards."""

    image_size: int = Field(224, ge=16, description="Each photo is resized once, whole (no crop), to this square size.")
    max_count: int = Field(5, ge=0, description="Largest count kept as its own class (K).")
    min_count: int = Field(0, ge=0, description="Smallest count kept (1 for the 1..5 setting, 0 for ABID's 0..5).")
    overflow: Literal["drop", "class"] = Field(
        "drop", description="Counts above K: drop them, or pool them in one 'K+1 or more' class."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    split_salt: str = Field("bincounter", description="Salt of the id hash that assigns splits.")
    on_inconsistent_quantity: Literal["keep", "drop"] = Field(
        "keep", description="EXPECTED_QUANTITY disagrees with the sum of item quantities."
    )
    max_pixels: int = Field(40_000_000, ge=1, description="Larger images are quarantined (decompression bombs).")
    shard_size: int = Field(2000, ge=1, description="Samples per webdataset tar shard.")
    jpeg_quality: int = Field(92, ge=10, le=100)
    workers: int | None = Field(None, ge=1, description="Processes for resizing; default: all cores.")
    samples_per_class_in_report: int = Field(6, ge=0)

    @model_validator(mode="after")
    def _check(self) -> "PreprocessConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for training")
        if self.min_count > self.max_count:
            raise ValueError("min_count must not exceed max_count")
        return self

    @property
    def num_classes(self) -> int:
        return self.max_count - self.min_count + 1 + (1 if self.overflow == "class" else 0)

    def class_names(self) -> list[str]:
        names = [str(c) for c in range(self.min_count, self.max_count + 1)]
        if self.overflow == "class":
            names.append(f"{self.max_count + 1}+")
        return names


Backbone = Literal[
    "efficientnet_lite0",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "vit_b_16",
    "tiny_cnn",
]


class TrainConfig(_Config):
    """Model, optimisation and engine settings."""

    backbone: Backbone = "efficientnet_lite0"
    pretrained: str = Field(
        "auto",
        description="'auto' (packaged offline weights where they exist, else none), 'none', "
        "'torchvision' (download, needs network), or a path/URI to a state_dict file.",
    )
    head: Literal["linear", "mlp"] = Field("linear", description="'mlp' is the seeds' head: dropout 0.25, FC 2048, FC 128.")
    freeze_backbone: bool = Field(False, description="Linear probe: train the head only.")
    freeze_early: int = Field(
        3, ge=0, description="Freeze the stem and this many early blocks (generic edge filters): "
        "about 1.3x faster per epoch on CPU (160 px, real photos)."
    )
    loss: Literal["ce", "ce+emd"] = Field(
        "ce", description="'ce+emd' adds an earth-mover term that knows 3 is closer to 4 than to 0 (on the real "
        "photos, with label smoothing 0.1, it scored 1-3 points below plain cross-entropy in one run)."
    )
    emd_weight: float = Field(0.5, ge=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0)
    class_weighting: Literal["none", "sqrt_inverse", "inverse"] = Field(
        "none", description="Weight the loss towards rare counts (sqrt of or plain inverse frequency)."
    )
    image_size: int = Field(
        224, ge=16, description="Training and serving input size; preprocess packs photos at 224 px, and small "
        "items need the pixels."
    )
    epochs: int = Field(8, ge=1, description="8 at 224 px: about 21 minutes on 2 CPU cores for the 3,890 real training photos.")
    batch_size: int = Field(32, ge=1)
    lr: float = Field(1e-3, gt=0)
    backbone_lr_scale: float = Field(1.0, gt=0, description="Backbone learning rate relative to the head's.")
    weight_decay: float = Field(1e-4, ge=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum / Adam beta1.")
    optimizer: Literal["adamw", "sgd"] = "adamw"
    warmup_epochs: float = Field(1.0, ge=0)
    early_stopping_patience: int = Field(5, ge=0, description="0 disables early stopping.")
    checkpoint_uri: str | None = Field(
        None, description="Also keep each epoch's checkpoint here (s3://bucket/prefix or a folder); a restart on "
        "a new machine resumes from it."
    )
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', 'mps'.")
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: Literal["auto", "on", "off"] = "auto"
    compile: bool = False
    workers: int = Field(2, ge=0, description="DataLoader worker processes.")
    seed: int = 0
    grad_clip: float = Field(5.0, ge=0, description="0 disables clipping.")
    ema_decay: float = Field(
        0.998, ge=0.0, lt=1.0, description="Validate, keep and serve an exponential moving average of the "
        "weights, updated every step with this decay; 0 disables."
    )
    rot90: bool = Field(
        False, description="Also augment with 90-degree rotations (transposes), in training and in test-time "
        "augmentation: a photo from above has no 'up'. Off by default: on the real photos it did not help "
        "within 8 epochs and doubles the test-time views."
    )
    tta: bool = Field(True, description="Average predictions over the flips (and with rot90 the transposes) of "
                      "each photo at evaluation and serving.")
    profile: bool = Field(False, description="Record a torch.profiler trace of a few steps.")
    progress: bool = True


class EvaluateConfig(_Config):
    batch_size: int = Field(64, ge=1)
    latency_samples: int = Field(32, ge=0, description="Single-image requests timed for latency.")
    device: str = "auto"


class RegisterConfig(_Config):
    model_name: str = "bincounter"
    metric: str = Field("accuracy", description="Metric the promotion gate compares.")
    greater_is_better: bool = True
    min_improvement: float = Field(0.0, ge=0.0, description="Challenger must beat the champion by this margin.")
    tracking_uri: str | None = Field(None, description="Default: $MLFLOW_TRACKING_URI, else a local SQLite store.")
    experiment: str = "bincounter"


class DeployConfig(_Config):
    target: Literal["local", "kubernetes", "kserve", "sagemaker"] = "local"
    model_uri: str = Field("models:/bincounter@champion")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    image: str = Field("ghcr.io/bincounter/bincounter:0.1.0", description="Serving image (Kubernetes, KServe, SageMaker).")
    namespace: str = "bincounter"
    replicas: int = Field(1, ge=1)
    dry_run: bool = Field(False, description="Render and validate, do not apply/create.")
    sagemaker_role_arn: str | None = None
    sagemaker_instance_type: str = "ml.m5.large"


class ServeConfig(_Config):
    """The model server (``python -m bincounter.serve``, ``bincounter serve``, the containers).

    Every field is also read from ``$BINCOUNTER_SERVE_<FIELD>`` (upper case), and the
    container conventions ``$MODEL_URI``, ``$MODEL_NAME``, ``$PORT`` and ``$LOG_LEVEL``
    (see :meth:`from_env`); command-line flags win over both.
    """

    model_uri: str = Field("models:/bincounter@champion", description="MLflow model URI (or a local model folder).")
    host: str = Field("127.0.0.1", description="Interface to listen on (0.0.0.0 in containers).")
    port: int = Field(8080, ge=0, le=65535)
    model_name: str | None = Field(None, description="Only name accepted on the KServe routes (default: any).")
    backend: Literal["auto", "onnx", "torch", "pyfunc"] = Field(
        "auto", description="Inference engine: 'auto' runs the model.onnx registered with the model in ONNX Runtime "
        "(fastest measured on CPU), else eager PyTorch; 'pyfunc' calls any MLflow model's predict."
    )
    workers: int = Field(2, ge=1, description="Inference worker processes; a crashing one fails its batch "
                         "(retried image by image) and is replaced.")
    threads_per_worker: int = Field(1, ge=1, description="Compute threads per worker process.")
    max_batch_size: int = Field(32, ge=1, description="Most images one model call runs (micro-batching).")
    max_wait_ms: float = Field(5.0, ge=0, description="How long a worker waits for more images to fill a batch.")
    max_queue: int = Field(256, ge=1, description="Images waiting for a worker; beyond it requests get 503 + Retry-After.")
    max_body_bytes: int = Field(20 * 2**20, ge=1, description="Largest image body (413 above it).")
    max_images: int = Field(64, ge=1, description="Most images in one batch, KServe or multipart request (413 above it).")
    max_pixels: int = Field(40_000_000, ge=1, description="Largest declared width x height (413 above it), "
                            "checked from the header before decoding.")
    max_drain_bytes: int = Field(256 * 2**20, ge=0, description="An over-limit body up to this size is read and "
                                 "discarded so the client gets its 413 on an open connection.")
    worker_timeout_s: float = Field(120.0, gt=0, description="A batch running longer than this: its worker is "
                                    "killed and replaced.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"
    access_log: bool = Field(True, description="One JSON line per request on stderr.")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> "ServeConfig":
        """Defaults, then ``$MODEL_URI``-style container variables, then ``$BINCOUNTER_SERVE_*``."""
        import os

        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for field, var in (("model_uri", "MODEL_URI"), ("model_name", "MODEL_NAME"), ("port", "PORT"),
                           ("log_level", "LOG_LEVEL")):
            if env.get(var):
                values[field] = env[var].lower() if field == "log_level" else env[var]
        for field in cls.model_fields:
            var = f"BINCOUNTER_SERVE_{field.upper()}"
            if env.get(var):
                values[field] = env[var]
        return cls.model_validate({**values, **overrides})


class PipelineConfig(_Config):
    """The whole pipeline: every stage's settings plus where the run keeps its files."""

    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()
    deploy: DeployConfig = DeployConfig()
    tune_trials: int = Field(0, ge=0, description="Hyperparameter-search trials before training (0: no search).")
    tune_epochs: int = Field(4, ge=0, description="Epochs per trial (0: searched too).")
    tune_backbones: tuple[str, ...] = Field((), description="Backbones the search may pick (default: its own list).")
    deploy_enabled: bool = Field(True, description="Run the deploy stage after registration.")
    pipeline_root: str | None = Field(None, description="Where kfp's local runner keeps artifacts; default $BINCOUNTER_HOME/kfp.")
