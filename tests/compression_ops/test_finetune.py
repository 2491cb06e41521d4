import copy

import pytest
import torch
import torch.nn.functional as F

from compression_ops import Distill, OpConfigError, TrainSpec, evaluate, fit, kd_loss
from tasks.config import DataConfig
from tasks.data import build_dataset
from tasks.data.loaders import Splits
from tasks.models import create_model


@pytest.fixture(scope="module")
def splits():
    return Splits(build_dataset(DataConfig(source="synthetic", num_samples=600, num_classes=4)))


def test_fit_learns(splits):
    m = create_model("resnet8", in_channels=1, num_classes=4, width=8)
    before = evaluate(m, splits.batches("val"))["accuracy"]
    hist = fit(m, splits.batches("train", 32, train=True), TrainSpec(epochs=4, lr=0.05, schedule="onecycle"),
               val=splits.batches("val"))
    assert len(hist) == 4 and "val_accuracy" in hist[-1]
    after = evaluate(m, splits.batches("test"))["accuracy"]
    assert after > 85 and after > before


def test_distillation_pulls_student_to_teacher(splits):
    teacher = create_model("resnet8", in_channels=1, num_classes=4, width=8)
    fit(teacher, splits.batches("train", 32, train=True), TrainSpec(epochs=4, lr=0.05, schedule="onecycle"))
    student = create_model("resnet8", in_channels=1, num_classes=4, width=4)
    x = splits.tensors["val"][0]

    def gap(m):
        with torch.no_grad():
            return float(F.kl_div(F.log_softmax(m(x), 1), F.log_softmax(teacher(x), 1), log_target=True,
                                  reduction="batchmean"))

    g0 = gap(student.eval())
    fit(student, splits.batches("train", 32, train=True), TrainSpec(epochs=3, lr=0.05), teacher=teacher,
        distill=Distill(temperature=2.0, alpha=1.0))
    assert gap(student) < g0 / 2


def test_alpha_decay_hands_the_fine_tune_from_the_teacher_to_the_labels(splits):
    """With the KD weight at 1 a student copies its teacher, here an untrained one (chance); with the weight
    decaying to 0 the labels take over by the end and the student learns the task."""
    torch.manual_seed(0)
    teacher = create_model("resnet8", in_channels=1, num_classes=4, width=8).eval()
    acc = {}
    for decay in (False, True):
        torch.manual_seed(1)
        student = create_model("resnet8", in_channels=1, num_classes=4, width=4)
        fit(student, splits.batches("train", 32, train=True), TrainSpec(epochs=4, lr=0.05), teacher=teacher,
            distill=Distill(temperature=1.0, alpha=1.0, alpha_decay=decay))
        acc[decay] = evaluate(student, splits.batches("test"))["accuracy"]
    assert acc[True] > 80 and acc[False] < 50, acc
    s, y = torch.randn(8, 5), torch.randint(0, 5, (8,))
    assert torch.isclose(kd_loss(s, s * 3, y, Distill(alpha=1.0), alpha=0.0), F.cross_entropy(s, y))


def test_kd_loss_limits():
    s = torch.randn(8, 5, requires_grad=True)
    y = torch.randint(0, 5, (8,))
    # alpha=0 is plain cross-entropy; a student equal to its teacher has zero soft loss
    assert torch.isclose(kd_loss(s, s.detach() * 3, y, Distill(alpha=0.0)), F.cross_entropy(s, y))
    assert float(kd_loss(s, s.detach(), y, Distill(alpha=1.0)).detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(OpConfigError, match="alpha=1.5"):
        Distill(alpha=1.5)
    with pytest.raises(OpConfigError, match="temperature=0"):
        Distill(temperature=0)


def test_fit_zero_epochs_is_a_no_op(splits):
    m = create_model("resnet8", in_channels=1, num_classes=4, width=8)
    before = copy.deepcopy(m.state_dict())
    assert fit(m, splits.batches("train", 32, train=True), TrainSpec(epochs=0, lr=0.1)) == []
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_onecycle_on_a_handful_of_steps_trains(splits):
    # 5 steps: OneCycleLR's warm-up ends at step 0.2 * 5 - 1 = 0, where it starts: it divided by zero here.
    m = create_model("resnet8", in_channels=1, num_classes=4, width=8)
    before = copy.deepcopy(m.state_dict())
    n = len(splits.batches("train", 1, train=True))
    batches = splits.batches("train", -(-n // 5), train=True)
    assert len(batches) == 5
    hist = fit(m, batches, TrainSpec(epochs=1, lr=0.05, schedule="onecycle"))
    assert len(hist) == 1 and any(not torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_feature_hint_trains_student_features_only(splits):
    from compression_ops.distill import FeatureHint

    teacher = create_model("resnet8", in_channels=1, num_classes=4, width=8).eval()
    student = create_model("resnet8", in_channels=1, num_classes=4, width=4)
    x = splits.tensors["val"][0][:32]
    hint = FeatureHint(student, teacher)
    student(x), teacher(x)
    assert hint.adapter.weight.shape == (teacher.fc.in_features, student.fc.in_features)
    hint.loss().backward()
    assert student.stem[0].weight.grad.abs().sum() > 0  # the hint reaches the student's backbone
    assert hint.adapter.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    hint.remove()

    fit(student, splits.batches("train", 32, train=True), TrainSpec(epochs=3, lr=0.05), teacher=teacher,
        distill=Distill(temperature=4, alpha=0.5, hint_weight=1.0))
    assert not student.fc._forward_pre_hooks and not teacher.fc._forward_pre_hooks  # hooks removed
    with pytest.raises(OpConfigError, match="hint_weight"):
        Distill(hint_weight=-1)


def test_adamw_trains_a_transformer(splits):
    """AdamW (train.optimizer: adamw) trains a ViT on data where the model has to learn something."""
    from tasks.models.user import build_arch

    vit = {"transformers": {"model_type": "vit", "image_size": 8, "patch_size": 2, "hidden_size": 32,
                            "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}}
    torch.manual_seed(0)
    m = build_arch(vit, in_channels=1, num_classes=4)
    fit(m, splits.batches("train", 32, train=True), TrainSpec(epochs=4, lr=2e-3, schedule="onecycle", optimizer="adamw"))
    assert evaluate(m, splits.batches("test"))["accuracy"] > 60  # chance is 25 %


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="optimizer='adam'.*sgd, adamw"):
        TrainSpec(epochs=1, lr=0.1, optimizer="adam")
