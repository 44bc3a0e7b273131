import numpy as np
import pytest
import torch

from bincounter.training import train as train_module
from bincounter.data.dataset import load_split
from bincounter.training.distill import CACHE, distill_loss, teacher_folder, teacher_probabilities
from bincounter.model.predictor import Predictor
from bincounter.training.train import train
from bincounter.model.transforms import EvalTransform
from tests.conftest import TINY_TRAIN
from tests.training.test_train import interrupt_second_epoch

pytestmark = pytest.mark.slow

CLASSES = ["0", "1", "2", "3", "4", "5"]


def _train_split(data_dir):
    return load_split(data_dir, "train", EvalTransform(size=64, mean=(0.5,) * 3, std=(0.5,) * 3))


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_distill_loss_is_zero_only_where_the_student_agrees_with_the_teacher(temperature):
    teacher = torch.softmax(torch.randn(5, 6), dim=1)
    agrees = teacher.log()  # logits whose softmax is the teacher's at any temperature's softening
    assert float(distill_loss(agrees, teacher, temperature)) == pytest.approx(0.0, abs=1e-5)
    assert float(distill_loss(torch.zeros(5, 6), teacher, temperature)) > 1e-3


def test_teachers_are_averaged_and_each_sees_the_photos_as_evaluation_does(model_dir, data_dir):
    ds = _train_split(data_dir)
    one = teacher_probabilities([str(model_dir)], ds, CLASSES, progress=False)
    two = teacher_probabilities([str(model_dir), str(model_dir)], ds, CLASSES, progress=False)
    assert one.shape == (len(ds), 6)
    np.testing.assert_allclose(one.sum(1), 1.0, atol=1e-5)
    np.testing.assert_allclose(one, two, atol=1e-6)
    predictor = Predictor.from_dir(model_dir)
    first = predictor.probabilities(predictor.transform(ds.image(0))[None])
    np.testing.assert_allclose(one[0], first[0], atol=1e-5)
    assert ds.extras == {}  # the caller's dataset is left as it was


def test_a_teacher_must_be_a_trained_model_answering_the_students_classes(model_dir, data_dir, tmp_path):
    ds = _train_split(data_dir)
    with pytest.raises(ValueError, match="not a trained model folder"):
        teacher_probabilities([str(tmp_path)], ds, CLASSES, progress=False)
    with pytest.raises(ValueError, match="answers over classes"):
        teacher_probabilities([str(model_dir)], ds, CLASSES + ["6+"], progress=False)


def test_a_student_of_censored_data_refuses_a_teacher_that_cannot_say_6_or_more(model_dir, data_dir_overflow,
                                                                               tmp_path):
    cfg = TINY_TRAIN.model_copy(update={"epochs": 1, "image_size": 48, "teachers": (str(model_dir),)})
    with pytest.raises(ValueError, match=r"answers over classes .* '6\+'"):
        train(cfg, data_dir_overflow, tmp_path / "student")


def test_a_teacher_in_an_mlflow_run_is_downloaded(model_dir, tmp_path):
    import mlflow

    experiment = mlflow.create_experiment("teachers", artifact_location=(tmp_path / "store").as_uri())
    with mlflow.start_run(experiment_id=experiment) as run:
        mlflow.log_artifacts(str(model_dir), "models/seed0")
        mlflow.log_artifacts(str(model_dir), "models/seed1")
    folder = teacher_folder(f"runs:/{run.info.run_id}/models/seed0")
    assert (folder / "model.pt").read_bytes() == (model_dir / "model.pt").read_bytes()
    with pytest.raises(ValueError, match="holds 2 model.pt files"):
        teacher_folder(f"runs:/{run.info.run_id}/models")


def test_the_soft_targets_reach_the_loss_beside_their_own_photos(data_dir_without_val, tmp_path, monkeypatch):
    """A teacher that counts backwards (5 - label), followed alone (distill_weight=1): the
    student learns the teacher's rule, which it can only do if every photo's soft target
    travels with that photo through shuffling and batching. Without a validation split the
    last epoch is kept, so picking by the labels' accuracy cannot undo it."""
    def backwards(out_dir, teachers, dataset, class_names, **kwargs):
        return np.eye(6, dtype=np.float32)[5 - dataset.labels.numpy()]

    monkeypatch.setattr(train_module, "cached_teacher_probabilities", backwards)
    cfg = TINY_TRAIN.model_copy(update={"teachers": ("fake",), "distill_weight": 1.0, "distill_temperature": 1.0,
                                        "loss": "ce", "label_smoothing": 0.0})
    train(cfg, data_dir_without_val, tmp_path / "student")
    predictor = Predictor.from_dir(tmp_path / "student")
    test = load_split(data_dir_without_val, "test", predictor.transform)
    said = predictor.probabilities(torch.stack([test[i][0] for i in range(len(test))])).argmax(1)
    labels = test.labels.numpy()
    assert np.mean(said == 5 - labels) > np.mean(said == labels) + 0.2


def test_a_resumed_student_reads_its_teachers_targets_back(model_dir, data_dir, tmp_path, monkeypatch):
    from bincounter.training import distill

    cfg = TINY_TRAIN.model_copy(update={"epochs": 2, "teachers": (str(model_dir),)})
    calls = interrupt_second_epoch(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, data_dir, tmp_path / "student")
    kept = np.load(tmp_path / "student" / CACHE)
    assert list(kept["ids"]) == _train_split(data_dir).ids and kept["probs"].shape[1] == 6

    def must_not_run(*args, **kwargs):
        raise AssertionError("the teachers ran again")

    monkeypatch.setattr(distill, "teacher_probabilities", must_not_run)
    calls["n"] = 10
    result = train(cfg, data_dir, tmp_path / "student")
    assert [h["epoch"] for h in result.history] == [1, 2]


def test_a_share_of_the_photos_is_scored_in_the_order_asked(model_dir, data_dir):
    ds = _train_split(data_dir)
    whole = teacher_probabilities([str(model_dir)], ds, CLASSES, progress=False)
    rows = [5, 0, 3]
    np.testing.assert_allclose(teacher_probabilities([str(model_dir)], ds, CLASSES, rows=rows, progress=False),
                               whole[rows], atol=1e-6)
    assert teacher_probabilities([str(model_dir)], ds, CLASSES, rows=[], progress=False).shape == (0, 6)
