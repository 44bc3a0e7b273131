"""Pinning: a moving registry reference resolved once to the version it names now."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from bincounter.config import DeployConfig
from bincounter.registry.versions import pin
from tests.fake_counter import register_fake


@pytest.fixture
def two_versions(synth_dir, tmp_path, isolated_home):
    """``bincounter`` v1 and v2, champion on v1, v2 tagged with a digest."""
    first = register_fake(synth_dir, tmp_path)
    second = register_fake(synth_dir, tmp_path)
    client = MlflowClient()
    client.set_registered_model_alias("bincounter", "champion", first)
    client.set_model_version_tag("bincounter", second, "model.sha256", "ab" * 32)
    return first, second


def test_aliases_latest_and_numbers_resolve_to_the_version_they_name_now(two_versions):
    first, second = two_versions
    champion = pin("models:/bincounter@champion")
    assert champion.uri == f"models:/bincounter/{first}" and champion.version == first and champion.run_id
    assert pin("models:/bincounter/latest").uri == f"models:/bincounter/{second}"
    assert pin(f"models:/bincounter/{second}").sha256 == "ab" * 32
    MlflowClient().set_registered_model_alias("bincounter", "champion", second)
    assert pin("models:/bincounter@champion").version == second  # resolved when asked, not before
    labels = pin("models:/bincounter@champion").labels()
    assert labels == {"bincounter.dev/model-uri": f"models:/bincounter/{second}",
                      "bincounter.dev/model-version": second, "bincounter.dev/model-run-id": labels[
                          "bincounter.dev/model-run-id"], "bincounter.dev/model-sha256": "ab" * 32}


@pytest.mark.parametrize("uri", ["/models/folder", "runs:/0123abcd/model", "s3://bucket/model"])
def test_uris_that_name_no_registered_version_stay_as_they_are(uri):
    pinned = pin(uri, client=object())  # never asked
    assert (pinned.uri, pinned.version, pinned.labels()) == (uri, None, {"bincounter.dev/model-uri": uri})


def test_the_deploy_stage_deploys_the_version_the_alias_names_and_records_it(two_versions, monkeypatch):
    """A Deployment names models:/bincounter/<v>, never @champion: a restart loads the same model,
    and the previous revision (what a rollback restores) keeps naming the previous version."""
    import shutil

    from bincounter import launch

    if shutil.which("kubectl") is None:
        pytest.skip("kubectl renders the manifests")
    first, second = two_versions
    rendered = []
    for version in (first, second):
        MlflowClient().set_registered_model_alias("bincounter", "champion", version)
        out = launch.deploy(DeployConfig(target="kubernetes", dry_run=True), tracking_uri=None)
        docs = [d for d in yaml.safe_load_all(out["manifest"]) if d]
        configmap = next(d for d in docs if d["kind"] == "ConfigMap")
        deployment = next(d for d in docs if d["kind"] == "Deployment")
        assert configmap["data"]["MODEL_URI"] == f"models:/bincounter/{version}"
        annotations = deployment["spec"]["template"]["metadata"]["annotations"]
        assert annotations["bincounter.dev/model-version"] == version and "kubectl.kubernetes.io/restartedAt" not in (
            annotations)  # nothing moves under a pinned URI: no forced restart
        assert out["bincounter.dev/model-version"] == version
        rendered.append(configmap["metadata"]["name"])
    assert rendered[0] != rendered[1]  # each version its own ConfigMap: the old revision still names v1
