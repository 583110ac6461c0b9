"""Sample data for trying the product without the published weights: random checkpoints and generated photos.

Scores computed with random weights are meaningless as quality judgements; they exercise every step of the
real pipeline (and let tests run with no network). Files written here say ``random`` in their names.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torchvision.ops import StochasticDepth

from pipeline.models.depth_anything import build_depth_anything
from pipeline.models.dgiqa import CROP_SIZE, build_dgiqa
from pipeline.scoring.preprocess import normalize_to_tensor

DGIQA_RANDOM = "dgiqa_random.safetensors"


def depth_random_name(encoder: str = "vits") -> str:
    """File name of a random Depth Anything V1 checkpoint for ``encoder``."""
    return f"depth_anything_v1_{encoder}14_random.safetensors"


def _save(state_dict: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path))
    return path


def write_random_dgiqa(path: Path, seed: int = 0) -> Path:
    """Save a random DGIQA checkpoint whose scores spread across [0, 1] from image to image.

    With PyTorch's default initialisation every image scores within about 1e-3 of 0.5: a test tolerance
    could then hide two images' scores swapped, crops cut in the wrong place or a broken depth path. So the
    network keeps its seeded default weights, and only the final linear layer is replaced by one along the
    first principal direction of the pooled features of a few generated crops, centred and scaled to a logit
    standard deviation of 1 (the test photographs then score from about 0.17 to 0.95). The calibration runs in
    float64 and the layer is rounded to float16 values, so the file is the same bit for bit wherever it is
    made; the tests record its SHA-256 beside the published code's scores for it.
    """
    torch.manual_seed(seed)
    model = build_dgiqa()
    weight, bias = _spread_head(model, seed)
    state = model.state_dict()
    state["fc.weight"], state["fc.bias"] = weight, bias
    return _save(state, path)


def _spread_head(model: torch.nn.Module, seed: int, crops: int = 6, logit_std: float = 1.0,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``fc`` weight and bias that spread the scores of ``model`` (see ``write_random_dgiqa``)."""
    photos = [synthetic_photo(CROP_SIZE, CROP_SIZE, seed=seed + 1000 + i) for i in range(crops)]
    rgb = torch.stack([normalize_to_tensor(p) for p in photos]).double()
    # A stand-in depth map (darker is farther): enough to make the depth branch's features vary too.
    depth = torch.stack([normalize_to_tensor((255 - p.mean(axis=2)).astype(np.uint8)) for p in photos]).double()
    pooled = []
    twin = copy.deepcopy(model).double()
    twin.global_pool.register_forward_hook(lambda module, args, output: pooled.append(output.flatten(1)))
    with torch.no_grad():
        twin(rgb, depth)
    features = pooled[0]
    mean = features.mean(0)
    direction = torch.linalg.svd(features - mean, full_matrices=False).Vh[0]
    direction = direction * direction[direction.abs().argmax()].sign()  # SVD's sign is arbitrary: fix it
    weight = direction * (logit_std / ((features - mean) @ direction).std())
    bias = -(weight @ mean)
    return (weight.to(torch.float16).float().reshape(1, -1).contiguous(),
            bias.to(torch.float16).float().reshape(1).contiguous())


def write_random_depth_anything(path: Path, encoder: str = "vits", seed: int = 0) -> Path:
    """Save a random Depth Anything V1 checkpoint whose depth maps are not flat.

    With default initialisation the final ReLU zeroes almost every output, so every depth map would be a
    constant; a positive output bias keeps the maps varied, which the tests need to see depth at work.
    """
    torch.manual_seed(seed)
    state = build_depth_anything(encoder).state_dict()
    state["depth_head.scratch.output_conv2.2.bias"].fill_(0.5)
    return _save(state, path)


def write_random_dpam(path: Path, seed: int = 0) -> Path:
    """Save a DPAM-IQA checkpoint (a bare state dict, the authors' layout) whose scores feel every input.

    With default initialisation two of the three inputs are all but ignored: the superpixel branch's weighting
    layer (a 1x1 convolution, then a ReLU) has a negative weight and bias with seed 0 and zeroes the similarity
    map, and the two fusion attentions, whose queries carry the texture and superpixel inputs, are so flat that
    any query gives the same mixture (swapping the superpixels or blanking the texture moved a score by under
    1e-7). A parity test could then not see a wrong superpixel or texture input. So that layer passes the
    similarity map through (weight 1, bias 0), and the fusion attentions' query and key weights are multiplied
    by 64 (a power of two, so the file is the same bit for bit wherever it is made): blanking the texture then
    moves a score by about 1e-3, another image's superpixels by about 5e-4, while the test photographs still
    score from about 0.06 to 0.08. The file is 690 MB.
    """
    from pipeline.models.dpam import build_dpam

    torch.manual_seed(seed)
    model = build_dpam()
    with torch.no_grad():
        weighting = model.simi_matrix.similarity_weight_block[0]
        weighting.weight.fill_(1.0)
        weighting.bias.zero_()
        for attention in model.teablock:
            attention.c_q.weight.mul_(64)
            attention.c_k.weight.mul_(64)
    return _save(model.state_dict(), path)


# Raw seed-0 scores of the test photographs lie in [0.033, 0.041]: centred on 0.5 and stretched 80 times.
_DPIQA_RAW_CENTRE = 0.037
_DPIQA_SCORE_GAIN = 80.0


def _on_grid(values: torch.Tensor, step: float = 2.0**-20) -> torch.Tensor:
    """``values`` rounded to multiples of ``step`` (about 1e-6).

    A float64 sum's last-place differences (another thread count adds in another order, and a mean that is zero
    comes out as noise of 1e-15) vanish in the rounding, so a file made from the result is the same bit for bit
    on any machine.
    """
    return torch.round(values / step) * step + 0.0  # + 0.0 turns -0.0 (a rounded tiny negative) into 0.0


def write_random_dpiqa_student(path: Path, seed: int = 0) -> Path:
    """Save a DP-IQA student checkpoint (a bare state dict, the authors' layout) with random weights.

    With default initialisation and fresh BatchNorm statistics EfficientNet-B7's features all but vanish and
    every image gets the same score; the running statistics are therefore set from two generated photos and
    two noise images (one forward pass in training mode, stochastic depth off, in float64 and rounded to
    multiples of 2^-20, so the statistics, and the file, do not depend on the thread count). Channels that are
    nearly constant on those four images would then be divided by almost nothing and explode on real photographs
    (scores in the thousands that move with the last float bit), so each BatchNorm's variances are floored at
    their median. Last, the score layer gets a fixed gain and offset that spread the test photographs over
    about [0.2, 0.8] with seed 0, so that a test tolerance of 1e-5 is far below the image-to-image differences.
    """
    from pipeline.models.dpiqa import INPUT_SIZE, build_dpiqa_student

    torch.manual_seed(seed)
    model = build_dpiqa_student()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # a plain average of the batches seen
    rng = np.random.default_rng(seed)
    side = INPUT_SIZE // 2  # the statistics are per channel: a smaller picture gives them at a quarter of the cost
    photos = np.stack([synthetic_photo(side, side, seed=seed + i) for i in range(2)]
                      + [rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(2)])
    model.train().double()
    for module in model.modules():
        if isinstance(module, StochasticDepth):
            module.eval()  # every block on, as in inference, or the statistics would not fit the eval network
    with torch.no_grad():
        model(torch.from_numpy(photos).permute(0, 3, 1, 2).double().div(255))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_var.clamp_(min=float(module.running_var.median()))
                module.running_mean.copy_(_on_grid(module.running_mean))
                module.running_var.copy_(_on_grid(module.running_var))
        model.float()
        model.fc3.weight.mul_(_DPIQA_SCORE_GAIN)
        model.fc3.bias.sub_(_DPIQA_RAW_CENTRE).mul_(_DPIQA_SCORE_GAIN).add_(0.5)
    return _save(model.eval().state_dict(), path)


def random_prompts(seed: int = 0, count: int = 495, dim: int = 32) -> torch.Tensor:
    """``count`` random prompt features of width ``dim``, drawn with NumPy (the same values on every machine)."""
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((count, dim)).astype(np.float32))


def write_random_prompts(path: Path, seed: int = 0, count: int = 495, dim: int = 32) -> Path:
    """Save ``random_prompts`` as the authors' script saves CLIP's features: one tensor, ``torch.save``d."""
    torch.save(random_prompts(seed, count, dim), path)
    return path


def write_random_dpiqa(path: Path, seed: int = 0, architecture: str = "tiny") -> Path:
    """Save a DP-IQA checkpoint (a bare state dict, the authors' layout) whose scores spread across images.

    With default initialisation every image scores about the same (0.0418 for two noise images, 1e-5 apart): the
    decoder's biases outweigh its image-dependent activations, and the VAE's random log-variance (about -0.2)
    makes the latent noise as large as its mean, which real Stable Diffusion VAEs do not. So the decoder's score
    convolutions and hidden linear layers get zero biases (its ReLUs then pass the image's differences on), the
    VAE's log-variance bias is set to -8 (a posterior standard deviation of about 0.02: the noise moves a score,
    but does not swamp it), and the score layer gets a gain and an offset that centre two generated photographs'
    scores (latent means, fp32) on 0.5 and set them about 0.3 apart. The gain is a power of two and the offset on
    a grid of 2^-20, so the file is the same bit for bit wherever the float32 pass rounds differently. The
    ``tiny`` architecture's file is 122 MB.
    """
    from pipeline.models.dpiqa_diffusion import INPUT_SIZE, build_dpiqa

    torch.manual_seed(seed)
    model = build_dpiqa(architecture)
    model.set_prompts(random_prompts(seed, dim=model.architecture.text_dim))
    photos = np.stack([synthetic_photo(INPUT_SIZE, INPUT_SIZE, seed=seed + i) for i in range(2)])
    with torch.no_grad():
        for layer in (*(getattr(model.QFD, f"conv_score{i}") for i in (1, 2, 3)), model.QFD.fc1, model.QFD.fc2):
            layer.bias.zero_()
        latent_channels = model.vae.config.latent_channels
        model.vae.quant_conv.bias[latent_channels:].fill_(-8.0)  # mean channels first, then the log-variances
        raw = model(torch.from_numpy(photos).permute(0, 3, 1, 2).float().div(255)).double()
        gain = 2.0 ** round(float(torch.log2(0.3 / (raw[0] - raw[1]).abs())))
        centre = float(_on_grid(raw.mean()))
        model.QFD.fc3.weight.mul_(gain)
        model.QFD.fc3.bias.sub_(centre).mul_(gain).add_(0.5)
    return _save(model.state_dict(), path)


def synthetic_photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A photo-like uint8 RGB image: sky gradient, ground plane, a few soft shapes and sensor noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    horizon = height * rng.uniform(0.4, 0.6)
    sky = np.stack([110 + 60 * yy / height, 150 + 50 * yy / height, 235 - 30 * yy / height], axis=-1)
    ground = np.stack([70 + 40 * yy / height, 110 + 30 * xx / width, 50 + 20 * yy / height], axis=-1)
    img = np.where((yy < horizon)[..., None], sky, ground)
    for _ in range(6):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.2) * min(height, width)
        mask = np.clip(1.5 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / r, 0, 1)[..., None]
        img = img * (1 - mask) + rng.uniform(20, 235, size=3) * mask
    img += rng.normal(0, 4, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_sample(folder: Path, encoder: str = "vits") -> dict[str, list[Path] | Path]:
    """Write sample images and random weights under ``folder``.

    Returns:
        ``images`` (paths), ``weights`` and ``depth_weights`` (paths).
    """
    images_dir, weights_dir = folder / "images", folder / "weights"
    images_dir.mkdir(parents=True, exist_ok=True)
    weights_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, (h, w, fmt) in enumerate([(480, 640, "JPEG"), (768, 512, "JPEG"), (400, 600, "PNG")]):
        path = images_dir / f"sample_{i}.{'jpg' if fmt == 'JPEG' else 'png'}"
        Image.fromarray(synthetic_photo(h, w, seed=i)).save(path, fmt, **({"quality": 85} if fmt == "JPEG" else {}))
        images.append(path)
    return {
        "images": images,
        "weights": write_random_dgiqa(weights_dir / DGIQA_RANDOM),
        "depth_weights": write_random_depth_anything(weights_dir / depth_random_name(encoder), encoder),
    }


def write_demo_bucket(folder: Path) -> dict[str, Path]:
    """A local folder that plays the bucket for the job's demo: images, a CSV manifest, random weights.

    Returns:
        ``manifest``, ``output``, ``weights`` and ``depth_weights`` paths.
    """
    paths = write_sample(folder)
    manifest = folder / "manifest.csv"
    lines = ["uri,source"] + [f"{p.relative_to(folder).as_posix()},generated" for p in paths["images"]]
    manifest.write_text("\n".join(lines) + "\n")
    return {"manifest": manifest, "output": folder / "scores", "weights": paths["weights"],
            "depth_weights": paths["depth_weights"]}


def write_random_clip_text(folder: Path, seed: int = 0, width: int = 32) -> Path:
    """Save a small random CLIP model in Hugging Face format: config, weights and tokenizer files.

    Its projected text features are ``width`` wide: ``openai/clip-vit-large-patch14``'s layout at a test's size.

    Its tokenizer knows single characters only (no merges), which tokenises any prompt, one token per character.
    """
    import json

    from transformers import CLIPConfig, CLIPModel

    folder.mkdir(parents=True, exist_ok=True)
    # Byte-level BPE's alphabet: printable bytes stand for themselves, the others for code points from 256 up.
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    others = [b for b in range(256) if b not in printable]
    chars = [chr(b) for b in printable] + [chr(256 + i) for i in range(len(others))]
    vocab = {token: i for i, token in enumerate(chars + [c + "</w>" for c in chars]
                                                 + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
         "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}))
    eos = vocab["<|endoftext|>"]
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": eos - 1,
                     "eos_token_id": eos, "pad_token_id": eos},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
                       "image_size": 32, "patch_size": 16},
        projection_dim=width)
    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(folder)
    return folder
