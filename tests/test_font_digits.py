"""font-digits, the mechanism dataset: shapes, domains, determinism, and a public split that
holds none of the client styles."""

from __future__ import annotations

import numpy as np
import pytest

from sim.data import DatasetError, dataset_names, load_dataset
from sim.data.font_digits import DEFAULT_DOMAINS, FONTS, STYLES, FontDigitsParams, build_font_digits

SMALL = {"per_class": 6, "public_per_class": 5}


@pytest.fixture(scope="module")
def ds():
    return build_font_digits(FontDigitsParams(**SMALL))


def test_registered_shapes_and_domains(ds):
    assert "font-digits" in dataset_names()
    n = 10 * SMALL["per_class"] * len(DEFAULT_DOMAINS)
    assert ds.images.shape == (n, 3, 16, 16) and ds.images.dtype == np.float32
    assert ds.domain_names == DEFAULT_DOMAINS and ds.class_names == tuple("0123456789")
    assert np.bincount(ds.domains).tolist() == [n // len(DEFAULT_DOMAINS)] * len(DEFAULT_DOMAINS)
    assert np.bincount(ds.labels).tolist() == [n // 10] * 10
    assert ds.images.min() >= -1 and ds.images.max() <= 1
    assert ds.public is not None and ds.public.images.shape == (50, 3, 16, 16)
    assert ds.public.domain_names == ("plain",)


def test_deterministic_and_each_style_independent_of_the_others(ds):
    again = build_font_digits(FontDigitsParams(**SMALL))
    assert again.fingerprint() == ds.fingerprint()
    alone = build_font_digits(FontDigitsParams(domains=("shadow",), **SMALL))
    k = DEFAULT_DOMAINS.index("shadow")
    assert np.array_equal(alone.images, ds.images[ds.domains == k])
    other_seed = build_font_digits(FontDigitsParams(seed=1, **SMALL))
    assert not np.array_equal(other_seed.images, ds.images)


def test_public_split_holds_no_client_style(ds):
    pub = ds.public.images
    # plain: grey (channels equal) on a black background; every client style is coloured or
    # has a lit background (frame border, stripes, cream, checker)
    assert np.abs(pub - pub[:, :1]).max() < 1e-6
    assert np.median(pub) == -1.0
    for k, name in enumerate(ds.domain_names):
        imgs = ds.images[ds.domains == k]
        colour = np.abs(imgs - imgs.mean(axis=1, keepdims=True)).mean(axis=(1, 2, 3))
        lit_background = np.median(imgs.reshape(len(imgs), -1), axis=1) > -0.9
        assert np.all((colour > 0.05) | lit_background), f"{name} has images that look like the public plain digits"
    # a nearest-neighbour check: no client image is (almost) a public image
    d2 = ((ds.images.reshape(len(ds.images), -1)[:, None] - pub.reshape(len(pub), -1)[None]) ** 2).mean(-1)
    assert d2.min() > 0.05


def test_digits_are_readable_across_fonts():
    """A pixel logistic regression on plain digits of every font reads held-out ones: the labels match the glyphs."""
    from sklearn.linear_model import LogisticRegression

    ds = build_font_digits(FontDigitsParams(domains=("frame",), per_class=40, public_per_class=60))
    pub = ds.public
    clf = LogisticRegression(C=0.1, max_iter=500).fit(pub.images[:, 0].reshape(len(pub), -1), pub.labels)
    own = build_font_digits(FontDigitsParams(domains=("frame",), per_class=1, public_per_class=20, seed=3)).public
    acc = (clf.predict(own.images[:, 0].reshape(len(own), -1)) == own.labels).mean()
    assert acc > 0.7  # chance is 0.1


def test_bad_params_are_named():
    with pytest.raises(DatasetError, match="'plain' is not a client style"):
        load_dataset("font-digits", {"domains": ["plain"]})
    with pytest.raises(DatasetError, match="unknown font 'Comic'"):
        FontDigitsParams(fonts=("Comic",))
    with pytest.raises(DatasetError, match="lists a style twice"):
        FontDigitsParams(domains=("frame", "frame"))
    assert set(DEFAULT_DOMAINS) <= set(STYLES) and len(FONTS) == 21
