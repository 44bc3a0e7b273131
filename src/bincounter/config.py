"""Every stage's parameters, in one typed place.

Each stage takes one of these frozen models and nothing else, so the CLI (tyro), the KFP
components and the MLflow parameter log all see the same names, defaults and validation.
Unknown fields are rejected rather than silently ignored.
"""

from __future__ import annotations

import os
import re
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from bincounter.ids import check_id

from bincounter import __version__


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

    def params(self) -> dict:
        """This config as one KFP struct parameter: JSON values, unset (None) fields left out
        (a KFP struct cannot hold null; leaving them out gives the same config back)."""
        return self.model_dump(mode="json", exclude_none=True)


PUBLIC_BUCKET = "s3://aft-vbi-pds"
IMAGE_REPOSITORY = "ghcr.io/bincounter/bincounter"
# Kubernetes names: a namespace is an RFC 1123 label, most other objects (secrets, service
# accounts) an RFC 1123 subdomain.
_RFC1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_RFC1123_SUBDOMAIN = re.compile(r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


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


# Bounds on the JSON a stage parses, checked before parsing: the real metadata files are at most
# 10 KB and 4 levels deep; json.loads recurses per level, so 100,000 brackets would crash it.
MAX_METADATA_BYTES = 2**20
MAX_JSON_DEPTH = 32


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
    max_metadata_bytes: int = Field(MAX_METADATA_BYTES, ge=1, description="Larger metadata objects (and manifest "
                                    "lines) are not parsed: the object is recorded in the errors file, not copied.")
    max_json_depth: int = Field(MAX_JSON_DEPTH, ge=1, description="Metadata, manifest lines and the file list nested "
                                "deeper are not parsed (the object is recorded in the errors file, not copied).")
    max_file_list_bytes: int = Field(256 * 2**20, ge=1, description="Largest file_list.json read.")
    reviews: str | None = Field(None, description="s3://bucket[/prefix] or a folder in the bucket's layout whose "
                                "reviews/<id>.json hold people's counts (bincounter review): every bin with a settled "
                                "count there is ingested from it with that count as its label, and the manifest says "
                                "which labels came from where. Endpoint and signing: the source's.")
    reviews_agreeing: int = Field(1, ge=1, description="Agreeing answers that settle a reviewed bin's count (and they "
                                  "must be a majority of its answers): 2 asks for two people's word.")
    max_review_bytes: int = Field(2**20, ge=1, description="Larger reviews/<id>.json objects are not parsed (recorded "
                                  "in the errors file; the bin keeps its recorded count).")
    progress: bool = True

    @field_validator("ids")
    @classmethod
    def _ids_are_dataset_ids(cls, ids: tuple[str, ...]) -> tuple[str, ...]:
        # They become file names in the output folder: "../x" must never get that far.
        return tuple(check_id(i, "ingest ids") for i in ids)


class PreprocessConfig(_Config):
    """Validate, clean, split, resize and pack into webdataset shards."""

    image_size: int = Field(224, ge=16, description="Each photo is resized once, whole (no crop), to this square size.")
    max_count: int = Field(5, ge=0, description="Largest count kept as its own class (K).")
    min_count: int = Field(0, ge=0, description="Smallest count kept (1 for the 1..5 setting, 0 for ABID's 0..5).")
    overflow: Literal["drop", "class"] = Field(
        "drop", description="Counts above K: drop them, or pool them in one 'K+1 or more' class."
    )
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0, description="0: no validation split; training then keeps "
                                "the last epoch's weights without early stopping, and a search is refused.")
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
    max_metadata_bytes: int = Field(MAX_METADATA_BYTES, ge=1, description="Larger metadata files are quarantined "
                                    "unread (manifest lines too).")
    max_json_depth: int = Field(MAX_JSON_DEPTH, ge=1, description="Metadata (and manifest lines) nested deeper are "
                                "quarantined unparsed.")

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
    "efficientnet_lite1",
    "efficientnet_lite2",
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
    aux_weight: float = Field(
        0.0, ge=0.0, description="Weight of auxiliary regression targets read from the metadata (log of the exact "
        "item count, distinct products, total item volume and weight; data.AUX_TARGETS): they teach the backbone "
        "what an item is. 0 disables."
    )
    overflow_answer: Literal["condition", "class"] = Field(
        "condition", description="When the data has a 'K+1 or more' class (preprocess overflow=class): 'condition' "
        "trains on those photos as censored labels but answers over 0..K (probabilities conditioned on a count "
        "of at most K), 'class' also answers 'K+1 or more'."
    )
    teachers: tuple[str, ...] = Field(
        (), description="Trained models to distil into this one (training output folders, or s3://, runs:/ or "
        "models:/ URIs of one): their averaged probabilities on each training photo, with their own test-time "
        "views, become a soft target beside the label. They must answer over the classes this model trains on."
    )
    distill_weight: float = Field(0.5, ge=0.0, le=1.0, description="Share of the teachers' soft targets in the "
                                  "classification loss (the label has the rest); used only with teachers.")
    distill_temperature: float = Field(2.0, gt=0.0, description="Softens student and teacher alike, so the "
                                       "teachers' doubts between neighbouring counts carry weight.")
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
    calibrate: bool = Field(True, description="After training, fit a temperature on half the validation photos (so "
                            "the served probabilities are honest) and the count sets' threshold on the other half "
                            "(training.calibrate); both are stored in the model's spec.")
    count_set_coverage: float = Field(0.9, gt=0.0, lt=1.0, description="Count sets hold the true count this often "
                                      "(split conformal on held-out photos).")
    profile: bool = Field(False, description="Record a torch.profiler trace of a few steps.")
    progress: bool = True


VerdictRule = Literal["posterior", "thresholds"]
# (flag, match) thresholds of each rule when neither the config nor the model's evaluation chose them.
VERDICT_DEFAULTS: dict[str, tuple[float, float]] = {"posterior": (0.05, 0.95), "thresholds": (0.05, 0.5)}


class VerdictConfig(_Config):
    """How a photo's count and the inventory's expected count become a verdict.

    Rule ``posterior`` (the default): the probability that the record is right given the photo and
    the record, from the model's calibrated probabilities and the inventory's own error rate (how
    often a record is wrong, and how wrong: off by one or by two). Rule ``thresholds``: the
    model's probability of the expected count alone (the rule before; it ignores how rare wrong
    records are, so its flags are right less often). Either way "mismatch" when the figure is at
    most ``flag_threshold``, "match" when at least ``match_threshold``, else "unsure" (a person
    looks). Thresholds left unset take those evaluation chose for the model and stored with it
    (``evaluation.verdicts``), else the rule's defaults (``VERDICT_DEFAULTS``).
    """

    rule: VerdictRule = Field("posterior", description="'posterior': P(record right | photo, record) with the "
                              "inventory's error rate; 'thresholds': the model's probability of the expected count.")
    error_rate: float = Field(
        0.05, gt=0.0, lt=1.0, description="Share of bins whose recorded count is wrong. 5% by default, the upper end "
        "of the record error rates warehouses report (1-5%): a rate set too low passes wrong bins as matches, so "
        "when unsure err high, and set it from bins people counted (bincounter error-rate).")
    off_by_one_share: float = Field(0.8, ge=0.0, le=1.0, description="Of the wrong records, the share off by one item "
                                    "(the rest off by two, but for off_by_more_share).")
    off_by_more_share: float = Field(
        0.05, ge=0.0, le=1.0, description="Of the wrong records, the share off by three items or more (spread evenly "
        "over the counts the model knows): without it a grossly wrong record has no explanation and passes.")
    flag_threshold: float | None = Field(
        None, ge=0.0, lt=1.0, description="Flag a bin as a mismatch when the rule's figure is at most this (default: "
        "the model's chosen threshold, else 0.05).")
    match_threshold: float | None = Field(
        None, gt=0.0, le=1.0, description="Call a bin a match when the rule's figure is at least this (default: the "
        "model's chosen threshold, else 0.95 for posterior, 0.5 for thresholds); between them a person decides.")

    @model_validator(mode="after")
    def _check(self) -> "VerdictConfig":
        if self.off_by_one_share + self.off_by_more_share > 1.0:
            raise ValueError("off_by_one_share + off_by_more_share must be at most 1 (the rest is off by two)")
        if self.flag_threshold is not None and self.match_threshold is not None \
                and self.flag_threshold >= self.match_threshold:
            raise ValueError("flag_threshold must be below match_threshold (the band between them is 'unsure')")
        return self

    def thresholds(self, chosen: dict | None = None) -> tuple[float, float]:
        """(flag, match): this config's own where set, else those chosen for the model under this
        rule (``chosen``: {rule: {"flag_threshold", "match_threshold"}}), else the rule's defaults."""
        flag, match = VERDICT_DEFAULTS[self.rule]
        picked = (chosen or {}).get(self.rule) or {}
        flag = picked.get("flag_threshold", flag) if self.flag_threshold is None else self.flag_threshold
        match = picked.get("match_threshold", match) if self.match_threshold is None else self.match_threshold
        if flag >= match:
            raise ValueError(f"flag threshold {flag} is not below match threshold {match}")
        return float(flag), float(match)


# The scalar figures the evaluate stage reports (its KFP Metrics, its MLflow test_* metrics),
# and the only names the promotion gate accepts. bincounter.evaluation.evaluate derives its summary from this.
EvalMetric = Literal["accuracy", "rmse", "mae", "within_1", "macro_f1", "range_accuracy", "range_rmse",
                     "range_mae", "range_within_1", "latency_ms_p50", "latency_ms_p95", "throughput_images_per_s"]
EVAL_METRICS: tuple[str, ...] = get_args(EvalMetric)
LOWER_IS_BETTER = frozenset({"rmse", "mae", "range_rmse", "range_mae", "latency_ms_p50", "latency_ms_p95"})


class EvaluateConfig(_Config):
    """Held-out figures, and the verdict thresholds chosen for the model (``evaluation.verdicts``):
    on the test photos against an inventory simulated at ``verdict.error_rate``, the thresholds
    that meet both targets and settle the most bins without a person. Evaluation stores them with
    the model; the server and the audit use them unless told otherwise."""

    batch_size: int = Field(64, ge=1)
    latency_samples: int = Field(32, ge=0, description="Single-image requests timed for latency.")
    device: str = "auto"
    target_flag_precision: float = Field(
        0.95, gt=0.0, le=1.0, description="Of the bins flagged as mismatches, at least this share must really be "
        "wrong (a person sent to a flagged bin finds an error).")
    max_wrong_passed: float = Field(
        0.05, ge=0.0, le=1.0, description="Of the wrong records, at most this share may be called a match (passed "
        "without a person).")
    target_confidence: float = Field(
        0.9, gt=0.5, lt=1.0, description="How sure the chosen thresholds meet both targets on photos to come, not "
        "just on the test photos (the shares are taken at their one-sided Wilson bounds): too few test photos to "
        "be that sure of a flag's precision, and nothing is flagged.")
    verdict: VerdictConfig = Field(VerdictConfig(), description="The rule and the error rate the thresholds are chosen "
                                   "under (set thresholds here are ignored: choosing them is the point).")
    int8: bool = Field(
        True, description="Also quantize the served graph to INT8 (ONNX Runtime static quantization, calibrated on "
        "validation photos) and score it on the same test photos; it is kept, registered and served when its accuracy "
        "is within int8_max_accuracy_drop of fp32 (the figures are then the INT8 graph's).")
    int8_max_accuracy_drop: float = Field(0.01, ge=0.0, le=1.0, description="Most accuracy INT8 may lose against fp32.")
    int8_calibration_photos: int = Field(128, ge=1, description="Validation photos that set INT8's activation ranges.")


# The metrics the promotion gate can compute for both models from their answers on the same photos.
GateMetric = Literal["accuracy", "rmse", "mae", "within_1", "macro_f1"]


class RegisterConfig(_Config):
    """Registration and the promotion gate (``bincounter.evaluation.gate``): the challenger and
    the champion are scored on the challenger's test photos, and the challenger is promoted only
    when it is better there by a margin, significantly, and without regressions."""

    model_name: str = "bincounter"
    metric: GateMetric = Field("accuracy", description="Metric the gate compares on the same photos.")
    greater_is_better: bool | None = Field(
        None, description="Direction of the metric; default: the metric's own (errors lower).")
    min_improvement: float = Field(0.0, ge=0.0, description="Challenger must beat the champion by more than this.")
    max_p_value: float = Field(
        0.05, gt=0.0, le=1.0, description="McNemar's exact test on the photos exactly one of the two models counted "
        "right must give at most this (1: no significance asked).")
    max_class_drop: float = Field(0.10, ge=0.0, le=1.0, description="No class's recall may drop by more than this.")
    min_class_photos: int = Field(20, ge=1, description="Classes with fewer test photos are not judged for a drop "
                                                       "(too few to tell).")
    max_rmse_increase: float = Field(0.10, ge=0.0, description="The RMSE may not rise by more than this.")
    smoke_photos: int = Field(16, ge=0, description="Test photos handed to the deploy step with the serving version's "
                                                   "answers, to ask the new pods again after a rollout (0: none).")
    tracking_uri: str | None = Field(None, description="Default: $MLFLOW_TRACKING_URI, else a local SQLite store.")
    experiment: str = "bincounter"

    @property
    def higher_is_better(self) -> bool:
        if self.greater_is_better is not None:
            return self.greater_is_better
        return self.metric not in LOWER_IS_BETTER


class DeployConfig(_Config):
    target: Literal["local", "kubernetes", "kserve", "sagemaker"] = "local"
    model_uri: str = Field("models:/bincounter@champion")
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="0 picks a free port.")
    image: str = Field(f"{IMAGE_REPOSITORY}:{__version__}-serve",
                       description="Serving image (Kubernetes, KServe): dockerfiles/Dockerfile.serve, no torch.")
    namespace: str = "bincounter"
    replicas: int = Field(1, ge=1)
    mlflow_secret: str | None = Field(None, description="Kubernetes and KServe: secret in the serving namespace whose "
                                      "MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN keys become the server's env "
                                      "(optional keys).")
    aws_secret: str | None = Field(None, description="Kubernetes and KServe: secret in the serving namespace whose "
                                   "AWS_* keys become the server's env (model artifacts in S3; optional keys).")
    smoke_min_agreement: float = Field(
        0.9, ge=0.0, le=1.0, description="Kubernetes: after a rollout the new pods must answer the registration's "
        "smoke photos as the version's evaluation did on at least this share, or the rollout is undone.")
    canary_percent: int = Field(
        0, ge=0, le=100, description="KServe (serverless mode) and SageMaker: the share of traffic the new version "
        "gets first (0: all of it at once).")
    kserve_mode: Literal["raw", "serverless"] = Field(
        "raw", description="KServe: plain Deployments (raw) or Knative (serverless: scale to zero, canaries).")
    dry_run: bool = Field(False, description="Render and validate, do not apply/create.")
    sagemaker_role_arn: str | None = None
    sagemaker_instance_type: str = "ml.m5.large"

    @field_validator("mlflow_secret", "aws_secret", mode="before")
    @classmethod
    def _secret_name(cls, value: object) -> object:
        if value in ("", None):
            return None
        if not isinstance(value, str) or not _RFC1123_SUBDOMAIN.match(value):
            raise ValueError(f"{value!r} is not a Kubernetes secret name")
        return value


# Search ranges sampled on a log scale (their useful values span orders of magnitude); the rest of
# SearchSpace's fields are choices.
LOG_SCALE = frozenset({"lr", "weight_decay"})
RANGES = frozenset({"lr", "momentum", "weight_decay"})
TuneMetric = Literal["val_accuracy", "val_macro_f1", "val_within_1", "val_rmse"]


class SearchSpace(_Config):
    """What each trial may vary. Ranges are ``(low, high)``, choices are tuples; a single value
    (or ``low == high``, or a one-element tuple) fixes that setting for every trial."""

    lr: tuple[float, float] = Field((1e-4, 3e-3), description="Peak learning rate, log-uniform.")
    batch_size: tuple[int, ...] = Field((16, 32, 64), description="Images per step, one of these.")
    epochs: tuple[int, ...] = Field((4,), description="Epochs of each trial, one of these: a few short epochs rank "
                                    "settings well enough at a fraction of the cost (the final training keeps its own "
                                    "unless this is searched).")
    momentum: tuple[float, float] = Field((0.8, 0.95), description="SGD momentum / Adam beta1, uniform.")
    weight_decay: tuple[float, float] = Field((1e-5, 1e-3), description="Weight decay, log-uniform.")
    image_size: tuple[int, ...] = Field((160, 192, 224), description="Training input size, one of these.")
    backbone: tuple[Backbone, ...] = Field(
        ("efficientnet_lite0",), description="Backbone, one of these. The default is the one with packaged "
        "offline weights: torchvision backbones start from random weights unless the base config asks for "
        "pretrained='torchvision' (a download), which would make the comparison unfair and the search need a network.")

    @field_validator("*", mode="before")
    @classmethod
    def _scalar_fixes(cls, value, info):
        """A bare value fixes the dimension: ``lr=1e-3`` means ``(1e-3, 1e-3)``."""
        if isinstance(value, (list, tuple)):
            return value
        return (value, value) if info.field_name in RANGES else (value,)

    @field_validator("*")
    @classmethod
    def _check(cls, value, info):
        if not value:
            raise ValueError("needs at least one value")
        if info.field_name in RANGES:
            low, high = value
            if low > high:
                raise ValueError(f"low {low} is above high {high}")
            if info.field_name in LOG_SCALE and low <= 0:
                raise ValueError("a log-uniform range must be positive")
        return value

    def searched(self) -> list[str]:
        """The dimensions that actually vary (more than one value)."""
        return [name for name, value in self if len(set(value)) > 1]


class TuneConfig(_Config):
    """The hyperparameter search before training (``bincounter.training.tune``): how many trials,
    which seed, what "best" means, and what each trial may vary."""

    trials: int = Field(0, ge=0, description="Trials before training (0: no search, and a pipeline compiled with 0 "
                                             "has no tune task); trials already recorded are skipped.")
    seed: int = Field(0, ge=0, description="Same seed, same trial settings.")
    metric: TuneMetric = Field(
        "val_accuracy", description="Best-epoch validation metric to optimise; val_rmse is minimised, the rest "
        "maximised. Ties go to the lower val_rmse (or, for val_rmse, the higher val_accuracy).")
    keep_weights: bool = Field(False, description="Keep each trial's model.pt and checkpoint.pt; the final "
                                                  "training retrains anyway, so by default they are deleted.")
    space: SearchSpace = Field(SearchSpace(), description="What each trial may vary.")


class ServeConfig(_Config):
    """The model server (``python -m bincounter.serving``, ``bincounter serve``, the containers).

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
    precision: Literal["auto", "fp32", "int8"] = Field(
        "auto", description="ONNX graph to run: 'auto' takes model.int8.onnx when the model was registered with it "
        "(evaluation kept it, within its accuracy bound of fp32), else model.onnx; 'int8' refuses a model without it.")
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
    verdict: VerdictConfig = Field(VerdictConfig(), description="Thresholds of the verdict answered with expected "
                                   "(and applied by the page at GET /).")

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
            if field == "verdict":  # nested: set it in code or with --verdict.* flags
                continue
            var = f"BINCOUNTER_SERVE_{field.upper()}"
            if env.get(var):
                values[field] = env[var]
        return cls.model_validate({**values, **overrides})


class PipelineConfig(_Config):
    """The whole pipeline: every stage's settings plus where the run keeps its files.

    Each stage field (in the pipeline's order) travels as one KFP struct parameter (``params()``) and
    is validated by the stage's own model inside its component; ``STAGES``, derived from these
    fields, names them for the pipeline and runner.
    """

    ingest: IngestConfig = IngestConfig()
    preprocess: PreprocessConfig = PreprocessConfig()
    tune: TuneConfig = TuneConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegisterConfig = RegisterConfig()
    deploy: DeployConfig = DeployConfig()
    shards: int = Field(1, ge=1, description="Ingest and preprocess fan out over this many shards of the id space "
                                            "(one pod each on a cluster); the dataset is the same for any number.")
    deploy_enabled: bool = Field(True, description="Run the deploy stage after registration.")
    pipeline_root: str | None = Field(None, description="Where kfp's local runner keeps artifacts; default $BINCOUNTER_HOME/kfp.")


class AuditConfig(_Config):
    """Count every bin of a pod and compare with what the inventory system expects."""

    source: SourceConfig = Field(SourceConfig(), description="The photos: s3://bucket[/prefix] or a folder, bucket layout.")
    expected_csv: str | None = Field(
        None, description="CSV with a header 'id,expected' (a local path or s3://...): audit exactly these ids with "
        "these expected counts. Default: every id of the source, expected count from its metadata JSON."
    )
    model_uri: str = Field("models:/bincounter@champion", description="MLflow pyfunc counting in this process.")
    url: str | None = Field(None, description="Count through a deployed server's /v1/count:batch instead of in-process.")
    tracking_uri: str | None = Field(None, description="Default: $MLFLOW_TRACKING_URI, else the local SQLite store.")
    experiment: str = Field("bincounter-audit", description="MLflow experiment of the audit runs.")
    track: bool = Field(True, description="Log the summary and the report to MLflow.")
    calibration: str | None = Field(
        None, description="The evaluation's metrics.json (path or MLflow artifact URI) with the held-out "
        "reliability; default: the one logged in the registered model's run."
    )
    verdict: VerdictConfig = VerdictConfig()
    workers: int = Field(16, ge=1, description="Concurrent photo downloads.")
    batch_size: int = Field(16, ge=1, le=64, description="Photos per model call or server request.")
    requests: int = Field(2, ge=1, description="With url: batch requests in flight at once.")
    request_timeout: float = Field(120.0, gt=0, description="Seconds to wait for one server answer.")
    retries: int = Field(8, ge=0, description="Retries per S3 object, or per server request refused with 503.")
    report_limit: int = Field(500, ge=0, description="Most flagged (and unsure) bins listed in report.html.")
    thumbnail_px: int = Field(96, ge=16, le=512, description="Longest side of the report's thumbnails.")
    max_metadata_bytes: int = Field(MAX_METADATA_BYTES, ge=1, description="A bin whose metadata is larger is "
                                    "recorded as an error, its metadata unread.")
    max_json_depth: int = Field(MAX_JSON_DEPTH, ge=1, description="A bin whose metadata is nested deeper is "
                                "recorded as an error, its metadata unparsed.")
    max_csv_line_bytes: int = Field(64 * 2**10, ge=1, description="Longer lines of expected_csv are recorded as "
                                    "errors and skipped, never held whole.")
    progress: bool = True

    @model_validator(mode="after")
    def _check(self) -> "AuditConfig":
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {self.url!r}")
        return self


class ErrorRateConfig(_Config):
    """Estimating the inventory's error rate from bins people counted (``bincounter error-rate``)."""

    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Of the interval given around the estimate.")
    max_line_bytes: int = Field(64 * 2**10, ge=1, description="Longer lines of the CSV are skipped, never held whole.")
    max_count: int = Field(1000, ge=1, description="Counts above this are refused as not counts.")


class ReviewQueueConfig(_Config):
    """Which bins of an audit people count first (``bincounter review-queue``): the ones the model is
    least sure of, where a person's count teaches it the most, up to a day's budget."""

    budget: int = Field(200, ge=1, description="Bins in the queue: what the floor counts in a day.")
    verdicts: tuple[Literal["unsure", "mismatch", "match"], ...] = Field(
        ("unsure", "mismatch"), description="Verdicts whose bins may enter the queue (a person looks at them anyway).")
    max_line_bytes: int = Field(64 * 2**10, ge=1, description="Longer lines of the audit CSV are skipped, never held whole.")
    reviews: SourceConfig = Field(SourceConfig(uri="", anonymous=False), description="The bins' root (s3://bucket"
                                  "[/prefix] or a folder) whose reviews/ hold earlier answers: bins they settle (or "
                                  "gave up on) leave the queue, bins whose answers disagree come first. Empty: not read.")
    agreeing: int = Field(1, ge=1, description="With reviews: agreeing answers that settle a bin (as the page's).")
    cant_tell_limit: int = Field(2, ge=1, description="With reviews: can't-tells that take a bin out (as the page's).")


class ReviewConfig(_Config):
    """The review page (``bincounter review``): people count a queue's bins one at a time; each answer
    is stored with who, when, the photo's sha256 and the model version that asked, in
    ``reviews/<id>.json`` beside ``metadata/``."""

    source: SourceConfig = Field(SourceConfig(uri="", anonymous=False), description="The bins: s3://bucket[/prefix] "
                                 "or a folder, bucket layout; the answers are written to its reviews/ (signed requests).")
    tokens: str | None = Field(None, description="Reviewers' token file (bincounter review-token writes it): one "
                               "'name:sha256-of-token' line each. Every write is attributed to the token's name.")
    identity_header: str | None = Field(None, pattern=r"^[A-Za-z][A-Za-z0-9-]{0,63}$", description="Behind an "
                                        "authenticating proxy (oauth2-proxy: X-Forwarded-Email): the header naming "
                                        "the signed-in person. Only for a server nobody reaches but through the proxy.")
    host: str = Field("127.0.0.1", description="Interface to listen on.")
    port: int = Field(8090, ge=0, le=65535)
    agreeing: int = Field(1, ge=1, description="Agreeing answers that settle a bin (a majority of its answers too); "
                          "a bin whose answers disagree goes back into the queue for someone else.")
    cant_tell_limit: int = Field(2, ge=1, description="A bin this many people could not count leaves the queue.")
    lease_seconds: float = Field(120.0, gt=0, description="A bin handed to one person is not handed to another "
                                 "for this long (unless answered or skipped).")
    max_count: int = Field(1000, ge=0, description="Largest count a person may enter.")
    max_review_bytes: int = Field(2**20, ge=1, description="A reviews/<id>.json larger than this is not parsed "
                                  "(and not written to: the bin is refused, nothing overwritten).")
    max_json_depth: int = Field(MAX_JSON_DEPTH, ge=1)
    max_photo_bytes: int = Field(32 * 2**20, ge=1, description="Larger photos are not served.")
    max_line_bytes: int = Field(64 * 2**10, ge=1, description="Longer lines of the queue CSV are skipped.")
    log_level: Literal["critical", "error", "warning", "info", "debug"] = "info"


class SageMakerConfig(_Config):
    """An AWS account's SageMaker settings: where training jobs and endpoints run.

    Managed spot training (the default) bills only the seconds a spot instance trains, at about
    a third of the on-demand price; an interrupted job restarts by itself and resumes from the
    checkpoints it keeps under ``checkpoint_prefix`` (see docs/sagemaker.md).
    """

    region: str = Field("us-east-1", description="AWS region of the jobs, endpoints, bucket and ECR images.")
    role_arn: str | None = Field(
        None, description="Execution role SageMaker assumes (trusts sagemaker.amazonaws.com; reads and writes the "
        "bucket's prefixes, pulls from ECR, writes CloudWatch logs)."
    )
    bucket: str | None = Field(None, description="S3 bucket for the shards, checkpoints and model artifacts.")
    data_prefix: str = Field("bincounter/data", description="Packed shards go under s3://<bucket>/<data_prefix>/<dataset digest>/.")
    output_prefix: str = Field("bincounter/jobs", description="SageMaker writes <job>/output/model.tar.gz here.")
    checkpoint_prefix: str = Field("bincounter/checkpoints", description="Each job's checkpoints: <prefix>/<job>/.")
    training_image: str | None = Field(None, description="ECR URI of the training image (dockerfiles/Dockerfile.cuda for GPUs).")
    serving_image: str | None = Field(None, description="ECR URI of the serving image (dockerfiles/Dockerfile.serve).")
    instance_type: str = Field("ml.g5.xlarge", description="Training instance (1 A10G GPU, 4 vCPUs).")
    instance_count: int = Field(
        1, ge=1, description="Training instances; more than one trains data-parallel (DDP) across them, every "
        "instance reading the whole training channel (see docs/sagemaker.md)."
    )
    volume_gb: int = Field(30, ge=1, le=16384, description="Training volume (shards, scratch, checkpoints).")
    spot: bool = Field(True, description="Managed spot training, resuming from the checkpoints after an interruption.")
    max_run_seconds: int = Field(4 * 3600, ge=1, le=28 * 86400, description="Training time limit (MaxRuntimeInSeconds).")
    max_wait_seconds: int = Field(
        8 * 3600, ge=1, le=28 * 86400, description="Spot only: training plus time waiting for spot capacity "
        "(MaxWaitTimeInSeconds, at least max_run_seconds)."
    )
    job_name_prefix: str = Field("bincounter", pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,31}$")
    endpoint_name: str = Field("bincounter", pattern=r"^[a-zA-Z0-9](-*[a-zA-Z0-9]){0,62}$")
    endpoint_instance_type: str = Field("ml.m5.xlarge", description="Hosting instance (4 vCPUs, 16 GiB; CPU serving).")
    endpoint_instance_count: int = Field(1, ge=1)
    canary_percent: int = Field(0, ge=0, le=100, description="Endpoint updates: the share of capacity the new fleet "
                                "serves first (SageMaker's blue/green canary); 0: all at once.")
    canary_wait_seconds: int = Field(600, ge=0, le=3600, description="How long the canary serves before the rest of "
                                     "the traffic shifts.")
    rollback_alarms: tuple[str, ...] = Field((), description="CloudWatch alarms that roll a canary update back "
                                             "(SageMaker's auto-rollback), e.g. on 5xx or latency.")
    poll_seconds: float = Field(30.0, gt=0, description="How often to ask SageMaker about a job or an endpoint.")
    endpoint_subnets: tuple[str, ...] = Field(
        (), description="VPC subnets of the endpoint's instances (with endpoint_security_groups), so it reaches a "
                        "private MLflow server; empty: SageMaker's own network.")
    endpoint_security_groups: tuple[str, ...] = Field((), description="VPC security groups of the endpoint's instances.")
    mlflow_secret_arn: str | None = Field(
        None, description="Secrets Manager secret (ARN) holding the endpoint's MLflow credentials as JSON "
                          "(MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN keys); the server reads it at start with "
                          "the execution role (secretsmanager:GetSecretValue). The values never enter the model's "
                          "environment, which DescribeModel shows.")
    sagemaker_endpoint_url: str | None = Field(None, description="SageMaker API endpoint override (VPC endpoint, moto).")
    s3_endpoint_url: str | None = Field(None, description="S3 endpoint override (VPC endpoint, moto).")

    @field_validator("role_arn", "bucket", "training_image", "serving_image", "sagemaker_endpoint_url",
                     "s3_endpoint_url", "mlflow_secret_arn", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # KFP pipeline parameters cannot be None: "" stands for "not set".
        return None if value == "" else value

    @model_validator(mode="after")
    def _check(self) -> "SageMakerConfig":
        if self.spot and self.max_wait_seconds < self.max_run_seconds:
            raise ValueError("max_wait_seconds must be at least max_run_seconds for managed spot training")
        if bool(self.endpoint_subnets) != bool(self.endpoint_security_groups):
            raise ValueError("endpoint_subnets and endpoint_security_groups go together: a SageMaker VpcConfig needs "
                             "both (the subnets the endpoint runs in, the security groups that may reach MLflow)")
        for name, prefix in (("endpoint_subnets", "subnet-"), ("endpoint_security_groups", "sg-")):
            bad = [v for v in getattr(self, name) if not re.fullmatch(prefix + r"[0-9a-f]{8,17}", v)]
            if bad:
                raise ValueError(f"{name}: {bad} are not {prefix}... ids")
        if self.mlflow_secret_arn is not None and not re.fullmatch(
                r"arn:aws[a-z0-9-]*:secretsmanager:[a-z0-9-]+:\d{12}:secret:[\w/+=.@-]+", self.mlflow_secret_arn):
            raise ValueError(f"mlflow_secret_arn {self.mlflow_secret_arn!r} is not a Secrets Manager secret ARN")
        for name in ("data_prefix", "output_prefix", "checkpoint_prefix"):
            if getattr(self, name).startswith("/") or "//" in getattr(self, name) or ".." in getattr(self, name).split("/"):
                raise ValueError(f"{name} must be a relative S3 key prefix like 'bincounter/data'")
        return self

    def s3_uri(self, prefix: str, *parts: str) -> str:
        """s3://<bucket>/<prefix>/<parts...>; the bucket is required from here on."""
        if not self.bucket:
            raise ValueError("SageMakerConfig.bucket is not set: name the S3 bucket for data, checkpoints and models")
        return "/".join([f"s3://{self.bucket}", prefix.strip("/"), *(p.strip("/") for p in parts)])


class SageMakerTrainingConfig(_Config):
    """The SageMaker training step: what to train, where, and which MLflow run records it."""

    train: TrainConfig = TrainConfig()
    sagemaker: SageMakerConfig = SageMakerConfig()
    tracking_uri: str | None = Field(None, description="Default: $MLFLOW_TRACKING_URI, else a local SQLite store.")
    experiment: str = "bincounter"


class SageMakerHostingConfig(_Config):
    """The SageMaker hosting step: which registered model, on which endpoint."""

    sagemaker: SageMakerConfig = SageMakerConfig()
    model_uri: str = Field("", description="Default: the registry's champion that the register step names.")
    tracking_uri: str | None = Field(None, description="http(s) MLflow server the endpoint loads the model from "
                                     "(default: $MLFLOW_TRACKING_URI).")
    timeout_seconds: int = Field(3600, ge=1, description="How long to wait for InService (and for a rollback).")


# PipelineConfig's fields that are one stage's config each (one struct parameter each), in order.
STAGES = tuple(name for name, field in PipelineConfig.model_fields.items()
               if isinstance(field.annotation, type) and issubclass(field.annotation, _Config))


class Resources(_Config):
    """A task's CPU and memory requests and limits (Kubernetes quantities)."""

    cpu_request: str = "1"
    cpu_limit: str = "2"
    memory_request: str = "2G"
    memory_limit: str = "4G"


IMAGE_NAME = "bincounter"
# The project's images in a registry: the CPU image (every stage, the server), its CUDA build
# (GPU training) and the serving image; each tag is the package version plus this suffix.
IMAGE_SUFFIXES = {"cpu": "", "cuda": "-cuda", "serving": "-serve"}
ImageKind = Literal["cpu", "cuda", "serving"]

# KFP backend releases the compiled YAML can be made for, oldest first, and what each newer one
# adds that the pipeline uses (docs/kubeflow.md, "Backend versions").
KFP_BACKENDS = ("2.5", "2.14", "2.15")
KfpBackend = Literal["2.5", "2.14", "2.15"]


def version_tuple(release: str) -> tuple[int, ...]:
    """'2.15.0' -> (2, 15, 0): release numbers compare as numbers, not as text."""
    return tuple(int(part) for part in re.findall(r"\d+", release))


def _env(variable: str) -> str | None:
    return os.environ.get(variable) or None


_LOCAL_STORES = ("sqlite:", "file:", "./", "/", "~")


def check_tracking_server(uri: str | None, option: str = "--cluster.tracking-uri") -> str:
    """``uri`` if it names a tracking server; else a ValueError saying why a pod needs one."""
    value = (uri or "").strip()
    if not value or value.startswith(_LOCAL_STORES) or "://" not in value:
        raise ValueError(
            f"tracking_uri {uri!r} is not a tracking server: on a cluster every task runs in its own pod, so a "
            f"local store is lost with the pod. Set {option} to your MLflow server, e.g. "
            "http://mlflow.mlflow.svc.cluster.local:5000 (kubectl apply -k manifests/mlflow deploys one).")
    return value


# The keys the two credential secrets may hold; each becomes the env variable of its name.
AWS_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION")
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


class ClusterConfig(_Config):
    """Everything a cluster run needs from its cluster, in one place: images, registry, tracking
    server, secrets, namespaces, service account, retries, resources and the KFP backend.

    Compile- and submit-time only. Every pipeline variant (main, sharded, GPU, SageMaker, audit)
    and every manifest the deploy step applies takes these values from here (``pipelines.cluster``,
    ``pipelines.runner.for_cluster``).
    """

    registry: str = Field(
        default_factory=lambda: _env("BINCOUNTER_REGISTRY") or "ghcr.io/bincounter",
        description="Registry (and path) of the project's images (default $BINCOUNTER_REGISTRY, else "
                    "ghcr.io/bincounter): <registry>/bincounter:<version>, ...-cuda, ...-serve.")
    image: str | None = Field(default_factory=lambda: _env("BINCOUNTER_IMAGE"),
                              description="Image of the CPU tasks (default $BINCOUNTER_IMAGE, else "
                                          "<registry>/bincounter:<version>).")
    cuda_image: str | None = Field(default_factory=lambda: _env("BINCOUNTER_CUDA_IMAGE"),
                                   description="Image of the GPU tasks (default $BINCOUNTER_CUDA_IMAGE, else "
                                               "<registry>/bincounter:<version>-cuda).")
    serving_image: str | None = Field(default_factory=lambda: _env("BINCOUNTER_SERVING_IMAGE"),
                                      description="Image the deploy step serves the model with (Deployment, "
                                                  "InferenceService; default $BINCOUNTER_SERVING_IMAGE, else "
                                                  "<registry>/bincounter:<version>-serve, dockerfiles/Dockerfile.serve).")
    tracking_uri: str = Field(
        "http://mlflow.mlflow.svc.cluster.local:5000",
        description="MLflow tracking server every task and the served model share (default: manifests/mlflow's). "
                    "Pods share nothing else, so a local store (SQLite, a folder) is refused.")
    mlflow_secret: str | None = Field(
        "mlflow-credentials", description="Secret whose MLFLOW_TRACKING_USERNAME / _PASSWORD / _TOKEN keys become "
                                          "env of the tasks that talk to MLflow and of the model server ('' or "
                                          "none: not used).")
    aws_secret: str | None = Field(
        "aws-credentials", description="Secret whose AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN "
                                       "/ AWS_DEFAULT_REGION keys become env of every task and of the model server "
                                       "('' or none: not used, e.g. with IRSA).")
    namespace: str = Field("kubeflow", description="Namespace (Kubeflow profile) the runs go to.")
    service_account: str | None = Field(
        None, description="Service account of the runs' pods (default: the KFP installation's; "
                          "'bincounter-pipeline' from 'bincounter pipeline rbac').")
    serving_namespace: str = Field("bincounter", description="Namespace the deploy step serves the model in.")
    kfp_backend: KfpBackend = Field(
        "2.15", description="Oldest Kubeflow Pipelines backend the compiled YAML must run on: 2.15 (everything), "
                            "2.14 (secret keys become required), 2.5 (also no --shards).")
    gpus: int = Field(0, ge=0, description="GPUs for each of the tune and train tasks (0: CPU only).")
    gpu_resource: str = Field("nvidia.com/gpu", description="The GPU's extended resource name.")
    gpu_node_label: str = Field("nvidia.com/gpu.present=true",
                                description="key=value node label the GPU tasks select ('' for none).")
    gpu_toleration: str = Field("nvidia.com/gpu", description="Taint key the GPU tasks tolerate (operator Exists, "
                                                              "effect NoSchedule; '' for none).")
    shm_size: str = Field("8Gi", description="Memory-backed /dev/shm on tune and train (DataLoader workers).")
    retries: int = Field(3, ge=0, description="Retries of the tasks that touch S3 or the registry (never of the "
                                              "checks, nor of deploy, which retries what a retry can fix itself).")
    retry_backoff: str = Field("30s", description="Wait before the first retry; doubles each time.")
    retry_backoff_max: str = Field("3600s", description="Longest time spent retrying.")
    cache_data: bool = Field(True, description="Cache ingest and preprocess (keyed by their inputs); register and "
                                               "deploy are never cached.")
    deploy_target: Literal["kubernetes", "kserve", "sagemaker"] = Field(
        "kubernetes", description="Where the deploy step serves when the pipeline's deploy.target is 'local' (a "
                                  "local server would die with its pod).")
    data_resources: Resources = Resources(cpu_request="2", cpu_limit="4", memory_request="4G", memory_limit="8G")
    train_resources: Resources = Resources(cpu_request="4", cpu_limit="8", memory_request="16G", memory_limit="32G")
    light_resources: Resources = Resources(cpu_request="1", cpu_limit="2", memory_request="2G", memory_limit="4G")

    @field_validator("mlflow_secret", "aws_secret", "image", "cuda_image", "serving_image", "service_account",
                     mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if value == "" else value

    def backend_at_least(self, release: str) -> bool:
        """Whether the oldest backend the YAML is compiled for is ``release`` or newer."""
        return version_tuple(self.kfp_backend) >= version_tuple(release)

    def image_of(self, kind: ImageKind) -> str:
        """The image of ``kind``: its own setting, else the project's in ``registry``."""
        own = {"cpu": self.image, "cuda": self.cuda_image, "serving": self.serving_image}[kind]
        return own or f"{self.registry.rstrip('/')}/{IMAGE_NAME}:{__version__}{IMAGE_SUFFIXES[kind]}"

    @model_validator(mode="after")
    def _check(self) -> "ClusterConfig":
        check_tracking_server(self.tracking_uri)
        if self.gpu_node_label and "=" not in self.gpu_node_label:
            raise ValueError("gpu_node_label is key=value, e.g. nvidia.com/gpu.present=true")
        for name in ("namespace", "serving_namespace"):
            if not _RFC1123_LABEL.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a Kubernetes namespace name (RFC 1123 label)")
        if self.service_account is not None and not _RFC1123_SUBDOMAIN.match(self.service_account):
            raise ValueError(f"service_account {self.service_account!r} is not a Kubernetes name")
        for name in ("mlflow_secret", "aws_secret"):
            if getattr(self, name) is not None and not _RFC1123_SUBDOMAIN.match(getattr(self, name)):
                raise ValueError(f"{name} {getattr(self, name)!r} is not a Kubernetes secret name")
        if not self.registry.strip() or any(c.isspace() for c in self.registry) or "://" in self.registry:
            raise ValueError(f"registry {self.registry!r} is not a registry path like registry.example.com/team")
        return self
