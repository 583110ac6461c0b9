import copy
import hashlib
import io
import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from pipeline.models.dpiqa import (
    INPUT_SIZE,
    NUM_CHECKPOINT_KEYS,
    DpiqaStudent,
    build_dpiqa_student,
    checkpoint_filter_fn,
)
from pipeline.scorers.registry import get_scorer
from pipeline.scoring.sample import synthetic_photo
from pipeline.scoring.scorer import ScorerConfig, make_scorer
from pipeline.scoring.weights import WeightsError, load_strict, read_checkpoint
from tests.conftest import DATA, SKIMAGE_DATA, read_layout

# Scores of the published student code (RomGai/DP-IQA) for the seeded random weights; how they were made is
# written in the file itself.
GOLDEN = json.loads((DATA / "dpiqa_student_published_scores.json").read_text())
# float32 on the CPU: equal bit for bit on the machine that recorded them (AVX-512), 1.5e-5 apart on an AVX2-only
# EPYC at the same commit (the convolution kernels differ by instruction set); the closest two images lie 5.4e-3
# apart.
TOLERANCE = 1e-4


def _calibrate_batch_norm(model: DpiqaStudent, images: torch.Tensor) -> DpiqaStudent:
    """Set every BatchNorm's statistics from ``images``, so that scores depend on the image.

    With PyTorch's default initialisation EfficientNet-B7's signal vanishes (features of order 1e-15) and the
    random student gives every image nearly the same score, which would let a forward test pass whatever the
    wiring. Only BatchNorm runs in training mode: stochastic depth and dropout stay off, as at inference.
    Statistics from small inputs (a few positions per channel in the last stages) make activations explode, so
    this is done at the full input size.
    """
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # cumulative average: after one batch, that batch's statistics
            module.train()
    with torch.no_grad():
        model(images)
    return model.eval()


@pytest.fixture(scope="module")
def model() -> DpiqaStudent:
    torch.manual_seed(0)
    return build_dpiqa_student()


@pytest.fixture(scope="module")
def state(model) -> dict[str, torch.Tensor]:
    return dict(model.state_dict())


def test_state_dict_has_the_published_layout(state):
    # Recorded from the authors' StudentEfficientNet built with random weights: same keys in the same order,
    # same shapes and dtypes, so their checkpoints load strictly.
    layout = read_layout("dpiqa_student")
    assert len(layout) == NUM_CHECKPOINT_KEYS == 1206
    assert list(state) == list(layout)
    assert {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state.items()} == layout


def test_builder_returns_eval_mode_without_classifier(model):
    assert not model.training
    assert isinstance(model.base_model.avgpool, nn.Identity)
    assert isinstance(model.base_model.classifier, nn.Identity)
    assert INPUT_SIZE == 512
    scale = get_scorer("dpiqa-student").output_scale
    assert "MOS/100" in scale and "no sigmoid" in scale


def test_strict_load_round_trip_with_and_without_data_parallel_prefix(state):
    torch.manual_seed(1)
    fresh = build_dpiqa_student()
    assert not torch.equal(fresh.fc1.weight, state["fc1.weight"])
    wrapped = {"module." + k: v for k, v in state.items()}
    assert list(checkpoint_filter_fn(wrapped)) == list(state)
    load_strict(fresh, wrapped, "DP-IQA student", checkpoint_filter_fn)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
    with torch.no_grad():
        fresh.fc3.bias.add_(1)
        fresh.base_model.features[0][1].running_var.mul_(2)
    load_strict(fresh, state, "DP-IQA student", checkpoint_filter_fn)
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_filter_renames_nothing_else(state):
    # read_checkpoint already strips wrappers; the filter must not hide a different layout by renaming it.
    other = {"_orig_mod.fc3.bias": state["fc3.bias"], "model.fc1.weight": state["fc1.weight"],
             "module.module.fc2.bias": state["fc2.bias"]}
    assert list(checkpoint_filter_fn(other)) == ["_orig_mod.fc3.bias", "model.fc1.weight", "module.fc2.bias"]


def test_truncated_or_altered_checkpoint_names_the_keys(state):
    broken = dict(state)
    del broken["fc3.bias"]
    del broken["base_model.features.0.0.weight"]
    broken["fc4.weight"] = torch.zeros(1, 512)
    broken["fc1.weight"] = torch.zeros(512, 2560)
    with torch.device("meta"):
        target = build_dpiqa_student()
    with pytest.raises(WeightsError) as info:
        load_strict(target, broken, "DP-IQA student (--weights s.pth)", checkpoint_filter_fn)
    message = str(info.value)
    assert "s.pth" in message
    assert "2 missing keys: base_model.features.0.0.weight, fc3.bias" in message
    assert "unexpected keys: fc4.weight" in message
    assert "fc1.weight (512, 2560) vs (512, 32768)" in message


def test_dgiqa_checkpoint_is_refused():
    dgiqa = {key: torch.empty(shape, device="meta") for key, (shape, _) in read_layout("dgiqa").items()}
    with torch.device("meta"):
        target = build_dpiqa_student()
    with pytest.raises(WeightsError) as info:
        load_strict(target, dgiqa, "DP-IQA student", checkpoint_filter_fn)
    message = str(info.value)
    assert "1206 missing keys" in message
    assert f"{len(dgiqa)} unexpected keys" in message
    assert "backbone." in message


def test_pickled_whole_model_is_refused(tmp_path):
    with torch.device("meta"):
        whole = build_dpiqa_student()
    path = tmp_path / "student_whole_model.pth"
    torch.save(whole, path)
    with pytest.raises(WeightsError, match="weights_only=True"):
        read_checkpoint(str(path))


def test_small_input_forward_shapes(model):
    # The head resizes to 64x64 whatever the backbone's grid, so a small input checks the wiring quickly.
    torch.manual_seed(2)
    with torch.inference_mode():
        scores = model(torch.rand(3, 3, 72, 100))  # 3x4 grid, odd sizes rounded up by each stride-2 stage
    assert scores.shape == (3,)
    assert torch.isfinite(scores).all()


def test_head_follows_the_published_architecture(model):
    # Feed the head known features (a forward hook replaces the backbone's output) and recompute it by hand.
    torch.manual_seed(4)
    n, grid = 2, (2, 3)
    features = torch.randn(n, 2560 * grid[0] * grid[1])
    hook = model.base_model.register_forward_hook(lambda module, args, output: features)
    try:
        with torch.inference_mode():
            scores = model(torch.rand(n, 3, 32 * grid[0], 32 * grid[1]))
    finally:
        hook.remove()
    fmap = features.view(n, 2560, *grid)
    x = torch.relu(F.conv_transpose2d(fmap, model.conv_transpose.weight, model.conv_transpose.bias, stride=2,
                                      padding=1, output_padding=1))
    assert x.shape == (n, 8, 4, 6)
    x = F.interpolate(x, size=(64, 64), mode="nearest").flatten(1)
    for layer in (model.fc1, model.fc2):
        x = torch.relu(x @ layer.weight.T + layer.bias)
    expected = (x @ model.fc3.weight.T + model.fc3.bias)[:, 0]
    assert scores.shape == (n,)
    assert (expected[0] - expected[1]).abs() > 1e-4
    torch.testing.assert_close(scores, expected.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_full_size_forward_is_batch_independent(model):
    torch.manual_seed(3)
    model = _calibrate_batch_norm(copy.deepcopy(model), torch.rand(1, 3, INPUT_SIZE, INPUT_SIZE))
    images = torch.rand(2, 3, INPUT_SIZE, INPUT_SIZE)
    seen = []
    hook = model.base_model.register_forward_hook(lambda module, args, output: seen.append(output.shape))
    try:
        with torch.inference_mode():
            scores = model(images)
            second_alone = model(images[1:])
    finally:
        hook.remove()
    assert seen[0] == (2, 2560 * 16 * 16)  # the flattened 2560x16x16 map the head reshapes
    assert scores.shape == (2,) and second_alone.shape == (1,)
    assert torch.isfinite(scores).all()
    assert (scores[0] - scores[1]).abs() > 1e-2
    # An image's score does not depend on the other images in its batch (BatchNorm in eval mode). The tolerance
    # allows float32 rounding through 55 blocks with batch-size-dependent kernels, far below the image-to-image
    # difference.
    torch.testing.assert_close(scores[1:], second_alone, atol=1e-3, rtol=0)


def golden_image(entry: dict) -> bytes:
    """The encoded bytes of a recorded image: a scikit-image photograph, or a generated photo saved as PNG."""
    if entry["source"] == "skimage.data":
        return (SKIMAGE_DATA / entry["name"]).read_bytes()
    assert entry["source"] == "pipeline.scoring.sample.synthetic_photo"
    buffer = io.BytesIO()
    Image.fromarray(synthetic_photo(entry["height"], entry["width"], seed=entry["seed"])).save(buffer, "PNG")
    return buffer.getvalue()


def test_recorded_scores_spread_far_beyond_the_tolerance():
    scores = sorted(entry["score"] for entry in GOLDEN["images"])
    assert 5 <= len(scores) <= 8
    assert GOLDEN["tolerance"] == TOLERANCE
    assert scores[-1] - scores[0] >= 10 * TOLERANCE
    # Every pair of images differs by more than twice the tolerance, so two scores swapped cannot pass.
    assert min(b - a for a, b in zip(scores, scores[1:], strict=False)) > 2 * TOLERANCE


def test_regenerated_weights_are_the_recorded_ones(dpiqa_student):
    recorded = GOLDEN["weights"]
    assert recorded["generator"] == "pipeline.scoring.sample.write_random_dpiqa_student(path, seed=0)"
    # Made with 1 and 2 torch threads alike: the calibration runs in float64 and lands on a grid, so the file is
    # the same bit for bit whatever the thread count, and the published scores below hold for it.
    assert set(recorded["sha256_by_torch_threads"].values()) == {recorded["sha256"]}
    assert hashlib.sha256(dpiqa_student.read_bytes()).hexdigest() == recorded["sha256"]


@pytest.mark.slow
def test_scores_equal_the_published_student_code(dpiqa_student):
    # One image per pass, as the published numbers were computed, on the path of `dgiqa score --model dpiqa-student`.
    scorer = make_scorer(ScorerConfig(weights=str(dpiqa_student), model="dpiqa-student", device="cpu",
                                      forward_batch=1))
    expected = {entry["name"]: entry["score"] for entry in GOLDEN["images"]}
    got = {entry["name"]: scorer.score_bytes(golden_image(entry)).score for entry in GOLDEN["images"]}
    deviation = {name: abs(got[name] - expected[name]) for name in expected}
    print("largest deviation from the published code:", max(deviation.values()))
    assert max(deviation.values()) <= TOLERANCE, deviation
