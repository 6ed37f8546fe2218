"""The client pixel map: the affine map that puts a client's images into the backbone's public look.

Unit tests of the map itself (polarity by skew, inverse, serialization with the upload), its
plumbing through the LoRA trainer and `apply_lora`, WarmFed's `lora_pixel_map` setting, and one
slow test on the committed backbone: inverted digits keep their class only with the map.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import dataclasses
import json

import numpy as np
import pytest
import torch

from algorithms.warmfed.diffusion import TinyBackboneConfig, pretrain_tiny_backbone
from algorithms.warmfed.lora import (
    LoraConfig,
    LoraMismatchError,
    LoraUpload,
    apply_lora,
    privatize_upload,
    train_client_lora,
)
from algorithms.warmfed.pixel_map import MAX_GAIN, MIN_AGREEMENT, PixelMap, PixelStats, polarity_agreement


def _digit_like(n: int = 64, seed: int = 0) -> np.ndarray:
    """Bright strokes (a minority of pixels) on a black ground, in [-1, 1], (n, 3, 8, 8)."""
    rng = np.random.default_rng(seed)
    ink = (rng.random((n, 1, 8, 8)) < 0.2).astype(np.float32)
    return np.repeat(ink * 2 - 1, 3, axis=1)


def test_inverted_images_map_exactly_onto_the_public_look():
    public = _digit_like()
    m = PixelMap.fit(-public, PixelStats.of(public))
    assert all(s < 0 for s in m.scale), "dark ink on a light ground must be flipped"
    np.testing.assert_allclose(m.to_backbone(-public).numpy(), public, atol=1e-5)
    np.testing.assert_allclose(m.to_client(public), -public, atol=1e-5)


def test_same_polarity_is_not_flipped_and_the_map_inverts():
    public = _digit_like()
    rng = np.random.default_rng(1)
    client = (0.4 * _digit_like(seed=2) - 0.3 + 0.05 * rng.standard_normal((64, 3, 8, 8))).astype(np.float32)
    m = PixelMap.fit(client, PixelStats.of(public))
    assert all(s > 0 for s in m.scale)
    mapped = m.to_backbone(client).numpy()
    np.testing.assert_allclose(mapped.mean((0, 2, 3)), public.mean((0, 2, 3)), atol=0.05)  # clipping moves it a little
    inside = np.abs(mapped) < 0.999  # where nothing was clipped, to_client undoes to_backbone
    np.testing.assert_allclose(m.to_client(mapped)[inside], client[inside], atol=1e-5)


def test_a_textured_ground_is_flipped_by_skew_where_a_median_rule_would_not():
    """Dark ink over a checkerboard of two light greys: the median is one of the greys, below the mean."""
    n, s = 64, 8
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:s, 0:s]
    ground = np.where(((yy // 2) + (xx // 2)) % 2 == 0, 0.84, 0.24).astype(np.float32)
    ink = rng.random((n, s, s)) < 0.15
    grey = np.where(ink, -0.9, ground[None])
    client = np.repeat(grey[:, None], 3, axis=1).astype(np.float32)
    assert np.median(client) < client.mean()  # what a median-vs-mean rule would read as "like the public"
    m = PixelMap.fit(client, PixelStats.of(_digit_like()))
    assert all(sc < 0 for sc in m.scale)


def test_one_polarity_for_all_channels_and_a_capped_gain():
    """Dark ink whose blue channel is brighter than the ground (blue ink on grey): every channel is
    flipped with the luminance; a channel with little contrast is not blown up past MAX_GAIN."""
    rng = np.random.default_rng(6)
    ink = rng.random((64, 8, 8)) < 0.2
    client = np.stack([np.where(ink, -0.9, 0.7), np.where(ink, -0.8, 0.7), np.where(ink, 0.75, 0.7)], axis=1).astype(
        np.float32
    )
    m = PixelMap.fit(client, PixelStats.of(_digit_like()))
    assert all(s < 0 for s in m.scale)
    assert abs(m.scale[2]) == MAX_GAIN


def test_flat_channel_is_shifted_not_scaled_and_grey_reference_serves_rgb():
    public = _digit_like()[:, :1]  # one grey channel
    client = _digit_like(seed=4)
    client[:, 2] = 0.5  # a flat blue channel
    m = PixelMap.fit(client, PixelStats.of(public))
    assert m.channels == 3 and m.scale[2] == 1.0
    with pytest.raises(ValueError, match="3 channels"):
        m.to_client(np.zeros((1, 1, 8, 8), np.float32))


def test_a_client_mixing_polarities_gets_no_map():
    """Half bright-on-dark, half dark-on-light: no one map fits both; one-look sets pass the check."""
    public = _digit_like()
    ref = PixelStats.of(public)
    mixed = np.concatenate([_digit_like(seed=7), -_digit_like(seed=8)])
    assert polarity_agreement(mixed) < MIN_AGREEMENT
    assert PixelMap.fit_if_one_look(mixed, ref) is None
    for one_look in (_digit_like(seed=9), -_digit_like(seed=9)):
        assert polarity_agreement(one_look) >= MIN_AGREEMENT
        assert PixelMap.fit_if_one_look(one_look, ref) == PixelMap.fit(one_look, ref)
    mostly = np.concatenate([-_digit_like(95, seed=10), _digit_like(5, seed=11)])  # 95 % one look
    assert PixelMap.fit_if_one_look(mostly, ref) is not None


def test_bad_maps_are_refused():
    with pytest.raises(ValueError, match="non-zero"):
        PixelMap((0.0,), (0.0,), (0.0,))
    with pytest.raises(ValueError, match="one scale"):
        PixelMap((1.0, 1.0), (0.0,), (0.0,))
    with pytest.raises(ValueError, match="malformed"):
        PixelMap.from_dict({"scale": [1.0]})
    with pytest.raises(ValueError, match="non-empty"):
        PixelStats.of(np.zeros((0, 3, 4, 4)))


# --------------------------------------------------------------------------- with the LoRA
@pytest.fixture(scope="module")
def tiny():
    x = _digit_like(24)
    y = (np.arange(24) % 10).astype(np.int64)
    cfg = TinyBackboneConfig(block_out_channels=(16, 32), train_steps=3, batch_size=8, warmup_steps=1, image_size=8)
    return pretrain_tiny_backbone(x, y, cfg, data_fingerprint="pixel-map-toy")


def _client(n: int = 24) -> tuple[np.ndarray, np.ndarray]:
    return -_digit_like(n, seed=5), (np.arange(n) % 10).astype(np.int64)


def test_lora_trains_on_mapped_images_and_samples_come_back_in_the_client_look(tiny):
    x, y = _client()
    cfg = LoraConfig(rank=2, steps=2, batch_size=4, pixel_map="moments")
    with pytest.raises(ValueError, match="reference"):
        train_client_lora(tiny, x, y, cfg)
    ref = PixelStats.of(_digit_like())
    up = train_client_lora(tiny, x, y, cfg, reference=ref)
    assert up.pixel_map == PixelMap.fit(x, ref)
    mixed = np.concatenate([x, -x])
    unmapped = train_client_lora(tiny, mixed, np.concatenate([y, y]), cfg, reference=ref)
    assert unmapped.pixel_map is None and unmapped.config.pixel_map == "moments"
    # the same adapter trained on the mapped images by hand: the map is all that differs
    plain = train_client_lora(tiny, up.pixel_map.to_backbone(x).numpy(), y, dataclasses.replace(cfg, pixel_map="none"))
    assert plain.pixel_map is None
    for k, v in up.state.items():
        torch.testing.assert_close(v, plain.state[k], rtol=0, atol=0)
    labels = np.arange(10)
    with apply_lora(tiny, plain) as p:
        raw = p.sample(labels, steps=2, guidance_scale=1.0, seed=0, batch_size=10)
    with apply_lora(tiny, up) as p:
        mapped = p.sample(labels, steps=2, guidance_scale=1.0, seed=0, batch_size=10)
        assert p.num_classes == tiny.num_classes  # everything else is the personalized backbone's
    np.testing.assert_array_equal(mapped, up.pixel_map.to_client(raw))


def test_the_map_travels_with_the_upload_and_counts_in_its_bytes(tiny):
    x, y = _client()
    up = train_client_lora(
        tiny,
        x,
        y,
        LoraConfig(rank=2, steps=1, batch_size=4, pixel_map="moments"),
        reference=PixelStats.of(_digit_like()),
    )
    back = LoraUpload.from_bytes(up.to_bytes())
    assert back.pixel_map == up.pixel_map and back.config.pixel_map == "moments"
    tensors = sum(t.numel() * t.element_size() for t in up.state.values())
    assert up.num_bytes == tensors + 3 * 3 * 4
    raw = bytearray(up.to_bytes())
    key = b'\\"scale\\"'  # the map is JSON inside the safetensors header's JSON: quotes escaped
    at = raw.find(key)
    assert at > 0
    raw[at : at + len(key)] = b'\\"scalf\\"'  # same length: the header still parses, the map does not
    with pytest.raises(LoraMismatchError, match="pixel map"):
        LoraUpload.from_bytes(bytes(raw))
    with pytest.raises(ValueError, match="not privatized"):
        privatize_upload(up, clip_norm=1.0, noise_multiplier=1.0, seed=0)


def test_lora_config_refuses_unknown_pixel_map():
    with pytest.raises(ValueError, match="pixel_map"):
        LoraConfig(pixel_map="histogram")
    assert json.loads(json.dumps(LoraConfig(pixel_map="moments").to_dict()))["pixel_map"] == "moments"


# --------------------------------------------------------------------------- WarmFed's setting
def test_warmfed_resolves_auto_and_refuses_what_cannot_work():
    from algorithms.warmfed.algorithm import WarmFed
    from algorithms.warmfed.params import WarmFedParams

    with pytest.raises(ValueError, match="lora_pixel_map"):
        WarmFedParams(lora_pixel_map="histogram")
    with pytest.raises(ValueError, match="DP does not noise"):
        WarmFedParams(lora_pixel_map="moments", dp_clip=1.0, dp_noise=1.0)

    def resolve(params: WarmFedParams, public: object) -> str:
        algo = WarmFed.__new__(WarmFed)
        algo.params = params
        return algo._pixel_map(public)

    public = object()
    one_look = WarmFedParams(pretrain_augment="none")
    assert resolve(one_look, public) == "moments"
    # the default backbone is photometrically augmented: it draws every look, nothing to map onto
    assert resolve(WarmFedParams(), public) == "none"
    assert resolve(WarmFedParams(pretrain_augment="polarity"), public) == "none"
    assert resolve(WarmFedParams(pretrain_augment="none", backbone="stable-diffusion", sd_model="x"), public) == "none"
    assert resolve(one_look, None) == "none"  # no public split: nothing to map onto
    assert resolve(dataclasses.replace(one_look, dp_clip=1.0, dp_noise=1.0), public) == "none"
    assert resolve(dataclasses.replace(one_look, lora_pixel_map="none"), public) == "none"
    assert resolve(WarmFedParams(lora_pixel_map="moments"), public) == "moments"
    with pytest.raises(ValueError, match="public split"):
        resolve(WarmFedParams(lora_pixel_map="moments"), None)


# --------------------------------------------------------------------------- the committed backbones
def _font_digits_backbone():
    from algorithms.warmfed.diffusion import TinyBackboneConfig, load_default_asset
    from sim.data import load_dataset

    ds = load_dataset("font-digits")
    assert ds.public is not None
    return ds, load_default_asset(TinyBackboneConfig(augment="none"), ds.public.fingerprint())


def test_the_mechanism_benchmarks_backbone_is_committed(tmp_path):
    """configs/warmfed_mechanism.yaml's backbone loads from the package, not a 5-minute pretraining."""
    from algorithms.warmfed.diffusion import TinyBackboneConfig, get_or_pretrain_tiny_backbone

    ds, bb = _font_digits_backbone()
    assert bb is not None and bb.cfg.augment == "none"
    pub = ds.public
    assert pub is not None
    got, path, trained = get_or_pretrain_tiny_backbone(
        tmp_path, pub.images, pub.labels, TinyBackboneConfig(augment="none"), pub.fingerprint()
    )
    assert not trained and path.name == "font-digits-plain" and got.fingerprint() == bb.fingerprint()
    assert not (tmp_path / "backbones").exists()


@pytest.mark.slow
def test_dark_on_light_clients_keep_their_digits_only_with_the_map(capsys):
    """font-digits' shadow domain (dark-red digits on cream) on the mechanism backbone (plain white on
    black): with the map the LoRA's samples are shadow digits a classifier of real shadow digits
    reads; without it they lose the digit (README, "The client pixel map")."""
    from sklearn.svm import SVC

    from algorithms.warmfed.synthesis import synthesize

    ds, bb = _font_digits_backbone()
    assert bb is not None and ds.public is not None
    shadow = np.flatnonzero(ds.domains == ds.domain_names.index("shadow"))
    idx = np.random.default_rng(0).permutation(shadow)
    train, held = idx[:240], idx[240:840]
    x_train, y_train = np.asarray(ds.images[train]), np.asarray(ds.labels[train])
    judge = SVC(C=5.0).fit(np.asarray(ds.images[held]).reshape(len(held), -1), ds.labels[held])
    reference = PixelStats.of(ds.public.images)
    fidelity, mean_pixel = {}, {}
    for kind in ("moments", "none"):
        cfg = LoraConfig(pixel_map=kind, seed=0)  # the default client budget: 100 steps x 32
        up = train_client_lora(bb, x_train, y_train, cfg, reference=reference)
        with apply_lora(bb, up) as personalized:
            x, y = synthesize(personalized, np.full(10, 10), steps=10, seed=0)
        fidelity[kind] = float((judge.predict(x.reshape(len(y), -1)) == y).mean())
        mean_pixel[kind] = float(x.mean())
    with capsys.disabled():
        print(
            f"\n[pixel map] shadow digits, class fidelity (SVC on real shadow digits) with the map "
            f"{fidelity['moments']:.2f}, without {fidelity['none']:.2f}; mean pixel {mean_pixel['moments']:+.3f} / "
            f"{mean_pixel['none']:+.3f} (data {float(x_train.mean()):+.3f})"
        )
    assert mean_pixel["moments"] > 0.5 * float(x_train.mean())  # light grounds, as the client's
    assert fidelity["moments"] >= 0.7
    assert fidelity["moments"] >= fidelity["none"] + 0.2
