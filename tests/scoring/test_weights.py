import hashlib
import json
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from pipeline.scoring.weights import WeightsError, load_strict, read_checkpoint


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(144, 2)).eval()


@pytest.fixture()
def model():
    return _model()


def _outputs(model, state):
    fresh = _model(seed=1)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    load_strict(fresh, state, "test model")
    torch.manual_seed(5)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        return fresh.eval()(x), model(x)


@pytest.mark.parametrize("kind", ["pth", "safetensors"])
@pytest.mark.parametrize("scheme", ["", "file://"])
def test_round_trip_gives_identical_outputs(tmp_path, model, kind, scheme):
    path = tmp_path / f"w.{kind}"
    if kind == "pth":
        torch.save(model.state_dict(), path)
    else:
        save_file(model.state_dict(), str(path))
    ckpt = read_checkpoint(f"{scheme}{path}")
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    ours, theirs = _outputs(model, ckpt.state_dict)
    assert torch.equal(ours, theirs)


def test_wrappers_and_prefixes_are_removed(tmp_path, model):
    path = tmp_path / "wrapped.pt"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)
    ckpt = read_checkpoint(str(path))
    assert sorted(ckpt.state_dict) == sorted(model.state_dict())
    ours, theirs = _outputs(model, ckpt.state_dict)
    assert torch.equal(ours, theirs)


def test_hugging_face_style_folder(tmp_path, model):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"encoder": "vits"}))
    save_file(model.state_dict(), str(folder / "model.safetensors"))
    ckpt = read_checkpoint(str(folder))
    assert ckpt.config == {"encoder": "vits"}
    assert ckpt.path.endswith("model.safetensors")
    assert ckpt.sha256 == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_folder_with_several_weight_files_is_ambiguous(tmp_path, model):
    for name in ("a.pth", "b.pth"):
        torch.save(model.state_dict(), tmp_path / name)
    with pytest.raises(WeightsError, match="holds 2 weight files"):
        read_checkpoint(str(tmp_path))


class _Evil:
    def __reduce__(self):
        return (print, ("code ran while loading",))


@pytest.mark.parametrize(("content", "expected"), [
    (b"", r"is empty \(0 bytes\)"),
    (b"not a checkpoint at all", r"is text, not a checkpoint \(23 bytes\)"),
    (b'{"encoder": "vits"}', "is JSON, not a checkpoint"),
    (b"<!DOCTYPE html><html>403 Forbidden</html>", "is HTML or XML, not a checkpoint"),
    ("truncated", r"is a damaged or truncated PyTorch checkpoint \(300 bytes\); copy it again"),
    ("cut-end", "is a damaged or truncated PyTorch checkpoint"),
    ("pickle", "holds Python objects other than tensors, or is no checkpoint at all .*nothing in it ran"),
    ("zip-pickle", r"holds Python objects other than tensors \([\w.]*print\).*nothing in it ran"),
])
def test_unreadable_files_say_what_they_are_in_the_users_terms(tmp_path, content, expected, capsys):
    """Never torch's internals (``pop from empty list``, ``negative seek value``, ``Unsupported operand 110``)."""
    path = tmp_path / "bad.pth"
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(1000)}, good)
    if content == "truncated":
        path.write_bytes(good.read_bytes()[:300])
    elif content == "cut-end":
        path.write_bytes(good.read_bytes()[:-100])
    elif content == "pickle":
        path.write_bytes(pickle.dumps({"w": _Evil()}))
    elif content == "zip-pickle":
        torch.save({"w": _Evil()}, path)
    else:
        path.write_bytes(content)
    with pytest.raises(WeightsError, match=expected) as info:
        read_checkpoint(str(path))
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message
    assert not any(word in message for word in ("operand", "seek", "miniz", "pop from", "pytorch.org"))
    assert "code ran" not in capsys.readouterr().out


def test_corrupt_safetensors_and_missing_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": broken}xx")
    with pytest.raises(WeightsError, match=r"not a readable safetensors file \(23 bytes\): its header"):
        read_checkpoint(str(path))
    with pytest.raises(WeightsError, match="no weights at"):
        read_checkpoint(str(tmp_path / "nothing.pth"))


def test_non_state_dict_content(tmp_path):
    path = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(WeightsError, match="holds no state dict"):
        read_checkpoint(str(path))


def test_strict_load_names_missing_and_unexpected_keys(model):
    state = dict(model.state_dict())
    state.pop("0.weight")
    state["extra.bias"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"1 missing keys: 0\.weight; 1 unexpected keys: extra\.bias"):
        load_strict(_model(), state, "test model")
