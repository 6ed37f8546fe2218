"""WarmFed diffusion side: tiny backbone, LoRA upload round trip, synthesis, Stable Diffusion path.

Everything is offline (HF_HUB_OFFLINE=1) and small: tiny UNets with a few training steps,
except one test that fine-tunes a LoRA on the committed default backbone and checks that the
samples move to the client's domain while keeping their digit classes.
"""

from __future__ import annotations

import json
import os
import shutil
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from pathlib import Path

import numpy as np
import pytest
import torch

from algorithms.warmfed.diffusion import (
    DEFAULT_ASSET_DIR,
    BackboneError,
    DiffusionBackbone,
    StableDiffusionBackbone,
    StableDiffusionConfig,
    TinyBackbone,
    TinyBackboneConfig,
    array_fingerprint,
    get_or_pretrain_tiny_backbone,
    pretrain_tiny_backbone,
)
from algorithms.warmfed.lora import (
    LoraConfig,
    LoraMismatchError,
    LoraUpload,
    apply_lora,
    privatize_upload,
    train_client_lora,
)
from algorithms.warmfed.synthesis import save_sample_grid, synthesize

# the domain test: half the WarmFed default's steps (100 x 32 at 2e-3) at twice the rate, as far toward
# inverted digits (every pixel flipped) and quicker
LORA_TEST_CONFIG = LoraConfig(steps=50, lr=4e-3)
LORA_TEST_SAMPLER_STEPS = 20
LORA_TEST_MIN_SHIFT = 0.25  # fraction of the way from the base samples' mean pixel to the data's
LORA_TEST_MIN_FIDELITY = 0.4  # chance is 0.1; measured values are in the report

TINY = TinyBackboneConfig(block_out_channels=(16, 32), train_steps=3, batch_size=8, warmup_steps=1)


def _toy_data(n: int = 24, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.uniform(-1, 1, (n, 3, 16, 16)).astype(np.float32), (np.arange(n) % 10).astype(np.int64)


@pytest.fixture(scope="module")
def tiny() -> TinyBackbone:
    x, y = _toy_data()
    return pretrain_tiny_backbone(x, y, TINY, data_fingerprint="toy")


@pytest.fixture(scope="module")
def tiny_other() -> TinyBackbone:
    x, y = _toy_data()
    return pretrain_tiny_backbone(x, y, TinyBackboneConfig(**{**TINY.to_dict(), "seed": 1}), data_fingerprint="toy")


def _state(bb: TinyBackbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bb.unet.state_dict().items()}


# --------------------------------------------------------------------------- tiny backbone
def test_config_key_and_validation():
    a = TinyBackboneConfig()
    assert a.key("d1") == TinyBackboneConfig().key("d1")
    assert a.key("d1") != a.key("d2") != TinyBackboneConfig(train_steps=10).key("d2")
    assert TinyBackboneConfig.from_dict(json.loads(json.dumps(a.to_dict()))) == a
    with pytest.raises(BackboneError, match="norm_num_groups"):
        TinyBackboneConfig(block_out_channels=(12, 24), norm_num_groups=8)


def test_pretrain_deterministic_save_load(tiny, tmp_path):
    assert isinstance(tiny, DiffusionBackbone)
    x, y = _toy_data()
    again = pretrain_tiny_backbone(x, y, TINY, data_fingerprint="toy")
    assert again.fingerprint() == tiny.fingerprint()
    tiny.save(tmp_path / "a")
    back = TinyBackbone.load(tmp_path / "a")
    assert back.fingerprint() == tiny.fingerprint() and back.key == tiny.key
    assert np.array_equal(
        back.sample(np.arange(4), steps=2, guidance_scale=2.0, seed=0, batch_size=4),
        tiny.sample(np.arange(4), steps=2, guidance_scale=2.0, seed=0, batch_size=4),
    )
    with pytest.raises(BackboneError, match="not found"):
        TinyBackbone.load(tmp_path / "missing")
    # weights of another architecture next to this config -> clear error
    small = pretrain_tiny_backbone(x, y, TinyBackboneConfig(block_out_channels=(8, 16), train_steps=1, batch_size=4))
    small.save(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "tiny_backbone.safetensors", tmp_path / "a" / "tiny_backbone.safetensors")
    with pytest.raises(BackboneError, match="do not match"):
        TinyBackbone.load(tmp_path / "a")


def test_get_or_pretrain_caches_atomically(tmp_path):
    x, y = _toy_data()
    cfg = TinyBackboneConfig(**{**TINY.to_dict(), "train_steps": 1})
    fp = array_fingerprint(x, y)
    bb, path, trained = get_or_pretrain_tiny_backbone(tmp_path, x, y, cfg, fp, asset_dir=None)
    assert trained and path == tmp_path / "backbones" / cfg.key(fp)
    assert sorted(p.name for p in (tmp_path / "backbones").iterdir()) == [cfg.key(fp)]  # no temp dirs left
    bb2, path2, trained2 = get_or_pretrain_tiny_backbone(tmp_path, x, y, cfg, fp, asset_dir=None)
    assert not trained2 and path2 == path and bb2.fingerprint() == bb.fingerprint()


def test_default_asset_matches_default_config():
    meta = json.loads((DEFAULT_ASSET_DIR / "tiny_backbone.json").read_text())
    cfg = TinyBackboneConfig()
    assert meta["config"] == cfg.to_dict(), "assets/ is stale: run python -m algorithms.warmfed.pretrain_default"
    assert meta["key"] == cfg.key(meta["data_fingerprint"])
    size = (DEFAULT_ASSET_DIR / "tiny_backbone.safetensors").stat().st_size
    assert size < 1_600_000


# --------------------------------------------------------------------------- LoRA
def test_lora_upload_round_trip_only_lora_keys(tiny):
    before = _state(tiny)
    flags = {n: p.requires_grad for n, p in tiny.unet.named_parameters()}
    x, y = _toy_data(16)
    cfg = LoraConfig(rank=4, steps=2, batch_size=8)
    up = train_client_lora(tiny, x, y, cfg)
    again = train_client_lora(tiny, x, y, cfg)
    # the shared backbone is untouched: same modules, weights, flags, mode
    after = tiny.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: p.requires_grad for n, p in tiny.unet.named_parameters()} == flags and not tiny.unet.training
    assert not hasattr(tiny.unet, "peft_config")
    # only LoRA tensors travel, far fewer bytes than the backbone
    assert up.state and all(".lora_A." in k or ".lora_B." in k for k in up.state)
    assert all(t.device.type == "cpu" and t.is_contiguous() for t in up.state.values())
    assert not any(k in before for k in up.state)
    assert up.num_bytes < 0.25 * tiny.num_bytes()
    # deterministic for a seed
    assert all(torch.equal(up.state[k], again.state[k]) for k in up.state)
    # bytes round trip
    blob = up.to_bytes()
    assert len(blob) < up.num_bytes + 16_384
    back = LoraUpload.from_bytes(blob)
    assert back.config == cfg and back.backbone_fingerprint == tiny.fingerprint()
    assert back.state.keys() == up.state.keys() and all(torch.equal(back.state[k], up.state[k]) for k in up.state)
    # applying loads exactly these tensors
    from algorithms.warmfed.lora import _lora_state

    with apply_lora(tiny, back, merge=False) as personalized:
        loaded = _lora_state(personalized.unet)
        assert loaded.keys() == up.state.keys() and all(torch.equal(loaded[k], up.state[k]) for k in up.state)
    assert tiny.unet.state_dict().keys() == before.keys()
    # DP option: clipped and noised, same keys
    priv = privatize_upload(up, clip_norm=0.1, noise_multiplier=0.0, seed=0)
    norm = sum(float(t.double().pow(2).sum()) for t in priv.state.values()) ** 0.5
    assert priv.state.keys() == up.state.keys() and norm <= 0.1 + 1e-5


def test_lora_rank_must_be_positive():
    with pytest.raises(ValueError, match="LoRA rank must be >= 1"):
        LoraConfig(rank=0)


def test_lora_from_another_backbone_is_refused(tiny, tiny_other):
    x, y = _toy_data(8)
    up = train_client_lora(tiny, x, y, LoraConfig(rank=2, steps=1, batch_size=4))
    with pytest.raises(LoraMismatchError, match="trained on backbone"), apply_lora(tiny_other, up):
        pass
    broken = LoraUpload({k: v for k, v in list(up.state.items())[1:]}, up.backbone_fingerprint, up.config)
    with pytest.raises(LoraMismatchError, match="do not fit"), apply_lora(tiny, broken):
        pass
    assert not hasattr(tiny.unet, "peft_config")  # cleaned up after the failure too


# --------------------------------------------------------------------------- synthesis
def test_synthesis_counts_labels_and_determinism(tiny, tmp_path):
    counts = {0: 3, 2: 0, 7: 2, 9: 1}
    x, y = synthesize(tiny, counts, steps=3, guidance_scale=2.0, seed=5, batch_size=4)
    assert x.shape == (6, 3, 16, 16) and x.dtype == np.float32 and y.dtype == np.int64
    assert y.tolist() == [0, 0, 0, 7, 7, 9]
    assert x.min() >= -1 and x.max() <= 1
    x2, _ = synthesize(tiny, counts, steps=3, guidance_scale=2.0, seed=5, batch_size=4)
    assert np.array_equal(x, x2)
    x3, _ = synthesize(tiny, counts, steps=3, guidance_scale=2.0, seed=5, batch_size=6)
    np.testing.assert_allclose(x, x3, atol=1e-4)  # batch size does not change the images
    x4, _ = synthesize(tiny, counts, steps=3, guidance_scale=2.0, seed=6, batch_size=4)
    assert not np.allclose(x, x4)
    arr_counts = np.array([1, 0, 2] + [0] * 7)
    xa, ya = synthesize(tiny, arr_counts, steps=2, seed=0)
    assert ya.tolist() == [0, 2, 2] and xa.shape[0] == 3
    with pytest.raises(ValueError):
        synthesize(tiny, {10: 1}, steps=2, seed=0)
    # a LoRA changes the samples while applied, and only then
    xd, yd = _toy_data(8)
    up = train_client_lora(tiny, xd, yd, LoraConfig(rank=2, steps=2, batch_size=4, lr=1e-2))
    with apply_lora(tiny, up) as personalized:
        xl, yl = synthesize(personalized, counts, steps=3, guidance_scale=2.0, seed=5, batch_size=4)
    assert yl.tolist() == y.tolist() and not np.allclose(xl, x)
    x5, _ = synthesize(tiny, counts, steps=3, guidance_scale=2.0, seed=5, batch_size=4)
    assert np.array_equal(x, x5)
    png = save_sample_grid(x, y, tmp_path / "grid.png", nrow=3)
    assert png.stat().st_size > 100 and png.read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- Stable Diffusion
def _build_tiny_sd(root: Path) -> Path:
    """A random-weight Stable Diffusion pipeline in the standard folder layout, built offline."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(0)
    src = root / "tokenizer-src"
    src.mkdir(parents=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in "abcdefghijklmnopqrstuvwxyz0123456789":
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (src / "vocab.json").write_text(json.dumps(vocab))
    (src / "merges.txt").write_text("#version: 0.2\n")  # no merges: character-level BPE
    tokenizer = CLIPTokenizer(vocab=str(src / "vocab.json"), merges=str(src / "merges.txt"), model_max_length=16)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=len(vocab),
            max_position_embeddings=16,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        norm_num_groups=8,
        sample_size=16,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    out = root / "tiny-sd"
    pipe.save_pretrained(out)
    return out


def test_stable_diffusion_path_end_to_end(tmp_path):
    path = _build_tiny_sd(tmp_path)
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"} <= set(os.listdir(path))
    cfg = StableDiffusionConfig(model=str(path), prompt_template="a {domain} photo of a {class_name}", image_size=16)
    bb = StableDiffusionBackbone(cfg)
    assert isinstance(bb, DiffusionBackbone) and bb.num_classes == 10
    assert bb.prompts(torch.tensor([3])) == ["a photo of a digit 3"]
    before = {k: v.clone() for k, v in bb.unet.state_dict().items()}
    x, y = _toy_data(4)
    up = train_client_lora(bb, x, y, LoraConfig(rank=2, steps=2, batch_size=2, domain="sketch"))
    assert up.state and all("lora_" in k for k in up.state) and up.num_bytes < bb.num_bytes()
    assert bb.unet.state_dict().keys() == before.keys()
    up = LoraUpload.from_bytes(up.to_bytes())
    with apply_lora(bb, up) as personalized:
        assert personalized.prompts(torch.tensor([3])) == ["a sketch photo of a digit 3"]
        imgs, labels = synthesize(personalized, {1: 1, 4: 1}, steps=2, guidance_scale=3.0, seed=0, batch_size=2)
    assert imgs.shape == (2, 3, 16, 16) and imgs.dtype == np.float32 and labels.tolist() == [1, 4]
    assert np.isfinite(imgs).all() and imgs.min() >= -1 and imgs.max() <= 1
    assert bb.prompts(torch.tensor([3])) == ["a photo of a digit 3"]  # domain restored
    # a LoRA from the tiny class-conditional backbone does not fit here
    other = LoraUpload(up.state, "0" * 16, up.config)
    with pytest.raises(LoraMismatchError, match="trained on backbone"), apply_lora(bb, other):
        pass


def test_stable_diffusion_missing_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(BackboneError, match=str(missing)):
        StableDiffusionBackbone(StableDiffusionConfig(model=str(missing)))
    with pytest.raises(BackboneError, match="not in the local Hugging Face cache"):
        StableDiffusionBackbone(StableDiffusionConfig(model="no-such-org/no-such-model-xyz"))


def test_prompt_template_needs_class_name():
    with pytest.raises(BackboneError, match=r"\{class_name\}"):
        StableDiffusionConfig(model="x", prompt_template="a photo in {domain} style")
    with pytest.raises(BackboneError, match="unknown slots"):
        StableDiffusionConfig(model="x", prompt_template="a {class_name} by {artist}")


# --------------------------------------------------------------------------- domain capture
@pytest.mark.slow
def test_client_lora_moves_default_backbone_samples_to_its_domain(capsys):
    """Fine-tune a client LoRA on 200 inverted digits (black on white) on the committed backbone."""
    from sklearn.svm import SVC

    from algorithms.warmfed.pretrain_default import _real_digits

    bb = TinyBackbone.load(DEFAULT_ASSET_DIR)
    inv, lab = _real_digits("inverted")
    idx = np.random.default_rng(0).permutation(len(inv))
    train, held = idx[:200], idx[200:]
    judge = SVC(C=5.0).fit(inv[held][:, 0].reshape(len(held), -1), lab[held])  # real inverted digits
    counts = np.full(10, 10)
    before, y0 = synthesize(bb, np.full(10, 5), steps=LORA_TEST_SAMPLER_STEPS, seed=0)
    t0 = time.perf_counter()
    up = train_client_lora(bb, inv[train], lab[train], LORA_TEST_CONFIG)
    lora_seconds = time.perf_counter() - t0
    with apply_lora(bb, up) as personalized:
        after, y = synthesize(personalized, counts, steps=LORA_TEST_SAMPLER_STEPS, seed=0)
    assert y.tolist() == np.repeat(np.arange(10), 10).tolist()
    target = float(inv[train].mean())
    acc_before = float((judge.predict(before[:, 0].reshape(len(y0), -1)) == y0).mean())
    acc_after = float((judge.predict(after[:, 0].reshape(len(y), -1)) == y).mean())
    with capsys.disabled():
        print(
            f"\n[warmfed lora] mean pixel {before.mean():+.3f} -> {after.mean():+.3f} (inverted data {target:+.3f}); "
            f"class fidelity (SVC on real inverted digits) {acc_after:.2f} "
            f"(base samples: {acc_before:.2f}); LoRA {up.num_bytes} B vs backbone {bb.num_bytes()} B; "
            f"{lora_seconds / LORA_TEST_CONFIG.steps:.3f} s/step"
        )
    shift = float(after.mean() - before.mean())
    assert shift > LORA_TEST_MIN_SHIFT * (target - float(before.mean())), (
        "the LoRA did not move the samples to its domain"
    )
    assert acc_after >= LORA_TEST_MIN_FIDELITY


# --------------------------------------------------------------------------- module split
def test_module_split_keeps_the_old_imports():
    import importlib

    import algorithms.warmfed.diffusion as pkg

    for name in pkg.__all__:
        assert getattr(pkg, name) is not None, name
    # each job in its own module, re-exported unchanged
    for module, name in (
        ("base", "DiffusionBackbone"),
        ("tiny", "TinyBackbone"),
        ("sampling", "denoise"),
        ("pretrain", "pretrain_tiny_backbone"),
        ("loaders", "get_or_pretrain_tiny_backbone"),
        ("stable_diffusion", "StableDiffusionBackbone"),
    ):
        mod = importlib.import_module(f"algorithms.warmfed.diffusion.{module}")
        assert getattr(mod, name) is getattr(pkg, name)
    assert (DEFAULT_ASSET_DIR / "tiny_backbone.json").is_file()


# --------------------------------------------------------------------------- sampler
def test_every_sampler_is_deterministic_and_batch_independent(tiny):
    from algorithms.warmfed.diffusion import SAMPLERS

    labels = np.array([0, 3, 3, 9, 1])
    outs = {}
    for name in SAMPLERS:
        a = tiny.sample(labels, steps=4, guidance_scale=2.0, seed=1, batch_size=5, sampler=name)
        b = tiny.sample(labels, steps=4, guidance_scale=2.0, seed=1, batch_size=2, sampler=name)
        assert a.shape == (5, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
        np.testing.assert_allclose(a, b, atol=1e-4)
        outs[name] = a
    assert not np.allclose(outs["ddim"], outs["dpm++"])  # the name does choose the solver
    with pytest.raises(ValueError, match="sampler must be one of ddim, dpm"):
        tiny.sample(labels, steps=2, guidance_scale=1.0, seed=0, batch_size=5, sampler="euler")


def test_bf16_sampling_on_a_cpu_stays_close_to_fp32_and_returns_fp32(tiny):
    """`mixed_precision: bf16` samples under CPU autocast: the UNet really runs in bf16 (the images
    move), the solver's output is still float32 in [-1, 1], deterministic, and near the fp32 samples."""
    labels = np.array([0, 3, 3, 9, 1, 7])
    fp32 = tiny.sample(labels, steps=4, guidance_scale=2.0, seed=1, batch_size=6)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        bf16 = tiny.sample(labels, steps=4, guidance_scale=2.0, seed=1, batch_size=6)
        again = tiny.sample(labels, steps=4, guidance_scale=2.0, seed=1, batch_size=6)
    assert bf16.dtype == np.float32 and bf16.min() >= -1 and bf16.max() <= 1
    assert np.array_equal(bf16, again)
    diff = np.abs(bf16 - fp32)
    assert 0 < diff.mean() < 0.05, diff.mean()


def test_synthesis_follows_each_client_lora(tiny):
    """Two clients with opposite data (bright vs dark images): each client's samples are its own
    (reproducible for its LoRA, different from the other client's and from the base backbone's);
    a synthesis that ignored the LoRA would give three identical sets."""
    x = np.random.default_rng(0).uniform(0.6, 1.0, (32, 3, 16, 16)).astype(np.float32)
    y = (np.arange(32) % 10).astype(np.int64)
    cfg = LoraConfig(rank=4, steps=5, batch_size=16, lr=2e-2, include_embeddings=True)
    uploads = {"bright": train_client_lora(tiny, x, y, cfg), "dark": train_client_lora(tiny, -x, y, cfg)}
    want = np.full(10, 2)
    base, _ = synthesize(tiny, want, steps=4, seed=3)
    out = {}
    for name, up in uploads.items():
        with apply_lora(tiny, up) as personalized:
            out[name], _ = synthesize(personalized, want, steps=4, seed=3)
    with apply_lora(tiny, uploads["bright"]) as personalized:
        again, _ = synthesize(personalized, want, steps=4, seed=3)
    assert np.array_equal(again, out["bright"])
    for a, b in (("bright", "dark"), ("bright", None), ("dark", None)):
        other = base if b is None else out[b]
        assert np.abs(out[a] - other).mean() > 0.05, (a, b)


def test_merged_lora_samples_like_the_injected_one(tiny):
    x, y = _toy_data(16)
    up = train_client_lora(tiny, x, y, LoraConfig(rank=2, steps=3, batch_size=8, lr=1e-2, include_embeddings=True))
    assert any("class_embedding" in k for k in up.state)
    before = _state(tiny)
    with apply_lora(tiny, up, merge=True) as merged:
        assert merged.unet is not tiny.unet and not hasattr(tiny.unet, "peft_config")
        a = merged.sample(np.arange(6), steps=3, guidance_scale=2.0, seed=0, batch_size=6)
    with apply_lora(tiny, up, merge=False) as injected:
        b = injected.sample(np.arange(6), steps=3, guidance_scale=2.0, seed=0, batch_size=6)
    np.testing.assert_allclose(a, b, atol=2e-2)
    base = tiny.sample(np.arange(6), steps=3, guidance_scale=2.0, seed=0, batch_size=6)
    assert np.abs(a - base).max() > 10 * np.abs(a - b).max()
    after = tiny.unet.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_pretraining_augmentations_keep_shapes_and_polarity_inverts_about_half():
    from algorithms.warmfed.diffusion.pretrain import augment_batch

    x = torch.linspace(-1, 1, 64 * 3 * 4 * 4).reshape(64, 3, 4, 4)
    same = augment_batch(x, "none", torch.Generator().manual_seed(0))
    assert same is x
    a = augment_batch(x, "polarity", torch.Generator().manual_seed(0))
    b = augment_batch(x, "polarity", torch.Generator().manual_seed(0))
    assert torch.equal(a, b)  # seeded
    flipped = [bool(torch.equal(a[i], -x[i])) for i in range(64)]
    kept = [bool(torch.equal(a[i], x[i])) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True)) and 20 <= sum(flipped) <= 44
    colours = augment_batch(x, "photometric", torch.Generator().manual_seed(0))
    assert colours.shape == x.shape and colours.abs().max() <= 1 and not torch.equal(colours, x)


def test_texture_augmentation_keeps_the_digit_over_varied_backgrounds():
    """`textures` redraws about three quarters of the digits over generic backgrounds (seeded), and the
    digit stays readable: ink pixels contrast with the background around them."""
    from algorithms.warmfed.diffusion.pretrain import augment_batch

    ink = torch.zeros(200, 1, 16, 16)
    ink[:, :, 3:13, 7:9] = 1.0  # a bar: the "digit"
    x = ink.repeat(1, 3, 1, 1) * 2 - 1  # white on black, as the public split
    a = augment_batch(x, "textures", torch.Generator().manual_seed(0))
    assert torch.equal(a, augment_batch(x, "textures", torch.Generator().manual_seed(0)))
    assert a.shape == x.shape and a.abs().max() <= 1
    kept = [bool(torch.equal(a[i], x[i])) for i in range(200)]
    assert 30 <= sum(kept) <= 70
    drawn = a[[i for i in range(200) if not kept[i]]]
    on, off = ink[0, 0].bool(), ~ink[0, 0].bool()
    fg = drawn[:, :, on].mean(2)  # (n, 3): the ink colour
    bg = drawn[:, :, off]
    # the ink differs from the background by a clear margin in every redrawn image
    gap = (bg - fg[:, :, None]).abs().amax(1).mean(1)
    assert float(gap.min()) > 0.3
    # backgrounds vary: flat ones and textured ones (a spread of pixel values)
    spread = bg.std(2).amax(1)
    assert int((spread < 1e-4).sum()) > 10 and int((spread > 0.2).sum()) > 50


@pytest.mark.parametrize(
    "source, local",
    [
        ("org/name", False),
        ("runwayml/stable-diffusion-v1-5", False),
        ("./sd", True),
        ("~/sd", True),
        ("/abs/sd", True),
        ("a/b/c", True),
    ],
)
def test_a_model_source_is_a_local_folder_or_a_hub_id(source, local, tmp_path, monkeypatch):
    """One rule for the config check and the loader: a path is never looked up on the hub, a hub id
    never read as a missing folder (so each says the right thing when it is not found)."""
    from algorithms.warmfed.diffusion.base import local_model_path

    monkeypatch.chdir(tmp_path)
    assert (local_model_path(source) is not None) is local
    (tmp_path / "sd-here").mkdir()
    assert local_model_path("sd-here") == Path("sd-here")  # an existing folder, even with one part


def test_warmfed_samples_at_the_samplers_defaults():
    """params.py keeps copies of the sampling defaults (importing the diffusion package loads
    diffusers, which the driver must not pay for): they must not drift apart."""
    from algorithms.warmfed.diffusion import (
        DEFAULT_GUIDANCE_SCALE,
        DEFAULT_SAMPLER,
        DEFAULT_SAMPLER_STEPS,
        SAMPLERS,
    )
    from algorithms.warmfed.params import SAMPLERS as WARMFED_SAMPLERS
    from algorithms.warmfed.params import WarmFedParams

    params = WarmFedParams()
    assert (params.sampler, params.sampler_steps, params.guidance_scale) == (
        DEFAULT_SAMPLER,
        DEFAULT_SAMPLER_STEPS,
        DEFAULT_GUIDANCE_SCALE,
    )
    assert tuple(WARMFED_SAMPLERS) == tuple(SAMPLERS)


def test_weight_space_lora_matches_pefts_forward_and_gradients(tiny):
    """The injected layers are the weight-space ones, and they compute peft's function: the same
    diffusion loss and LoRA gradients as peft's ``base(x) + s B(A(x))`` for the same adapter."""
    from peft.tuners.lora import layer as peft_lora

    from algorithms.warmfed.lora import _inject, _preserved
    from algorithms.warmfed.lora_layers import WeightSpaceConv2d, WeightSpaceLinear

    x, y = _toy_data(8)
    images, labels = torch.as_tensor(x), torch.as_tensor(y)

    def loss_and_grads(peft_forward: bool) -> tuple[float, dict[str, torch.Tensor]]:
        unet = tiny.unet
        with _preserved(unet):
            _inject(unet, LoraConfig(rank=4, seed=3))
            kinds = {type(m) for m in unet.modules() if isinstance(m, peft_lora.LoraLayer)}
            assert kinds == {WeightSpaceConv2d, WeightSpaceLinear}
            gen = torch.Generator().manual_seed(7)
            for name, p in unet.named_parameters():
                p.requires_grad_("lora_" in name)
                p.grad = None
                if "lora_B" in name:  # peft starts B at zero: make the update non-zero
                    p.data.copy_(torch.randn(p.shape, generator=gen) * 0.05)
            unet.train()
            if peft_forward:
                for m in unet.modules():
                    if isinstance(m, (WeightSpaceConv2d, WeightSpaceLinear)):
                        parent = peft_lora.Conv2d if isinstance(m, WeightSpaceConv2d) else peft_lora.Linear
                        m.forward = parent.forward.__get__(m)  # type: ignore[method-assign]
            loss = tiny.training_loss(images, labels, torch.Generator().manual_seed(0))
            loss.backward()
            grads = {n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None}
        return float(loss.detach()), grads

    ours, ours_grads = loss_and_grads(peft_forward=False)
    theirs, their_grads = loss_and_grads(peft_forward=True)
    assert ours_grads.keys() == their_grads.keys() and len(ours_grads) > 10
    assert ours == pytest.approx(theirs, rel=1e-5)
    for name, g in their_grads.items():
        torch.testing.assert_close(ours_grads[name], g, rtol=1e-4, atol=1e-4 * float(g.abs().max()))


def test_weight_space_lora_falls_back_to_peft_with_dropout(tiny):
    """LoRA dropout acts on the adapter's input only, which a weight update cannot express: peft's
    forward runs then (train mode: two passes differ; eval mode: they agree)."""
    from algorithms.warmfed.lora import _inject, _preserved

    x, y = _toy_data(4)
    images, t = torch.as_tensor(x), torch.zeros(4, dtype=torch.long)
    unet = tiny.unet
    with _preserved(unet), torch.no_grad():
        _inject(unet, LoraConfig(rank=4, dropout=0.5))
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.fill_(0.1)
        labels = torch.as_tensor(y)
        unet.train()
        a = unet(images, t, class_labels=labels).sample
        b = unet(images, t, class_labels=labels).sample
        assert not torch.allclose(a, b)
        unet.eval()
        torch.testing.assert_close(
            unet(images, t, class_labels=labels).sample, unet(images, t, class_labels=labels).sample
        )


def test_weight_space_lora_leaves_wide_layers_to_pefts_low_rank_branch():
    """A wide layer's dense update would cost 10-50x the low-rank branch's arithmetic (Stable
    Diffusion's widths): it runs peft's forward; a narrow one runs the weight-space path. Both agree."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model
    from peft.tuners.lora import layer as peft_lora

    from algorithms.warmfed.lora_layers import MAX_DENSE_COST, WEIGHT_SPACE_LAYERS, dense_cost

    assert dense_cost(320, 320 * 9, 8) > MAX_DENSE_COST >= dense_cost(32, 320 * 9, 8)
    calls: list[int] = []
    original = peft_lora.Conv2d.forward

    def counting(self, x, *args, **kwargs):
        calls.append(self.get_base_layer().out_channels)
        return original(self, x, *args, **kwargs)

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(320, 320, 3, padding=1), torch.nn.Conv2d(320, 32, 3, padding=1))
    cfg = PeftLoraConfig(r=8, lora_alpha=8, target_modules=["0", "1"])
    cfg._register_custom_module(WEIGHT_SPACE_LAYERS)
    inject_adapter_in_model(cfg, model, adapter_name="a")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.05)
    x = torch.randn(2, 320, 6, 6)
    peft_lora.Conv2d.forward = counting  # type: ignore[method-assign]
    try:
        with torch.no_grad():
            ours = model(x)
            assert calls == [320]  # the 320 -> 320 layer (cost 12) fell back; the 320 -> 32 one (cost 1.3) did not
            for m in model:
                m.forward = counting.__get__(m)  # every layer through peft's low-rank branch
            theirs = model(x)
    finally:
        peft_lora.Conv2d.forward = original  # type: ignore[method-assign]
    assert calls == [320, 320, 32]
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
