"""DP-IQA's prompt features: the 495 prompts, a tensor file, a CLIP folder computed once and cached."""

import pytest
import torch

from pipeline.scoring.prompt_embeddings import compute_prompt_features, quality_prompts, read_prompt_features
from pipeline.scoring.sample import write_random_clip_text, write_random_prompts
from pipeline.scoring.weights import WeightsError


def test_the_prompts_are_five_qualities_by_nine_scenes_by_eleven_distortions():
    prompts = quality_prompts()
    assert len(prompts) == len(set(prompts)) == 495
    assert prompts[0] == "a photo of a animal with jpeg2000 compression artifacts, which is of bad quality"
    assert prompts[-1] == "a photo of a others with other artifacts, which is of perfect quality"
    assert prompts[11] == "a photo of a cityscape with jpeg2000 compression artifacts, which is of bad quality"


def test_a_clip_folder_gives_what_the_authors_script_computes_and_is_cached(tmp_path, monkeypatch):
    from transformers import CLIPModel, CLIPTokenizerFast

    monkeypatch.setenv("DGIQA_CACHE_DIR", str(tmp_path / "cache"))
    folder = write_random_clip_text(tmp_path / "clip")
    first = compute_prompt_features(str(folder))
    assert first.features.shape == (495, 32) and first.label.startswith("clip-text@")
    # The authors' way: a whole CLIPModel, the processor's fast tokenizer, get_text_features.
    model = CLIPModel.from_pretrained(str(folder)).eval()
    tokens = CLIPTokenizerFast.from_pretrained(str(folder))(quality_prompts(), padding=True, truncation=True,
                                                            return_tensors="pt")
    with torch.no_grad():
        theirs = model.get_text_features(**tokens)
    theirs = theirs if isinstance(theirs, torch.Tensor) else theirs.pooler_output
    assert torch.allclose(first.features, theirs, atol=1e-6)
    assert theirs.std() > 0.5  # the prompts differ, so a misaligned prompt order would show
    cached = list((tmp_path / "cache" / "prompt-features").iterdir())
    assert [p.name for p in cached] == [f"clip-text-{first.label.split('@')[1]}.safetensors"]
    (folder / "vocab.json").unlink()  # a second run reads the cache, not the model
    again = compute_prompt_features(str(folder))
    assert torch.equal(again.features, first.features) and again.label == first.label


def test_a_tensor_file_is_read_and_named_by_its_hash(tmp_path):
    path = write_random_prompts(tmp_path / "prompts.pth", count=7, dim=5)
    features = read_prompt_features(str(path))
    assert features.features.shape == (7, 5) and features.label.startswith("prompts@")
    torch.save({"a": torch.zeros(2, 2), "b": torch.zeros(2, 2)}, tmp_path / "two.pth")
    with pytest.raises(WeightsError, match="holds 2 entries, not one tensor"):
        read_prompt_features(str(tmp_path / "two.pth"))
    torch.save(torch.zeros(3), tmp_path / "flat.pth")
    with pytest.raises(WeightsError, match=r"holds a \(3,\) float32 tensor; prompt features are"):
        read_prompt_features(str(tmp_path / "flat.pth"))
    with pytest.raises(WeightsError, match="is not a folder"):
        compute_prompt_features(str(path))


def test_a_clip_folder_in_s3_is_copied_and_gives_the_same_features(tmp_path, monkeypatch, s3):
    fs, options = s3
    folder = write_random_clip_text(tmp_path / "clip")
    fs.mkdir("models")
    fs.put(str(folder), "models/clip", recursive=True)
    monkeypatch.setenv("DGIQA_CACHE_DIR", str(tmp_path / "local-cache"))
    local = compute_prompt_features(str(folder))
    monkeypatch.setenv("DGIQA_CACHE_DIR", str(tmp_path / "s3-cache"))  # computed again, from the S3 copy
    remote = compute_prompt_features("s3://models/clip", options)
    assert remote.label == local.label and torch.equal(remote.features, local.features)
    with pytest.raises(WeightsError, match="no CLIP model at s3://models/none"):
        compute_prompt_features("s3://models/none", options)
