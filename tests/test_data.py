"""Tests for sim/data: the registry, the ArrayDataset contract and the four formats.

File-based formats are exercised on tiny files written into tmp_path, in their real on-disk
formats (PNG folders, pickled CIFAR batches, Parquet with encoded image bytes).
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from sim.data import (
    ArrayDataset,
    DatasetError,
    dataset_names,
    dataset_params_cls,
    load_dataset,
)
from sim.data.digits_domains import ALL_DOMAINS, DigitsDomainsParams, _source_digits, _upscale


def _check_contract(ds: ArrayDataset) -> None:
    n = len(ds)
    assert ds.images.dtype == np.float32 and ds.images.ndim == 4 and ds.images.flags.c_contiguous
    assert ds.labels.dtype == np.int64 and ds.labels.shape == (n,)
    assert ds.domains.dtype == np.int64 and ds.domains.shape == (n,)
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    assert ds.image_shape == ds.images.shape[1:]
    assert ds.labels.max() < ds.num_classes and ds.domains.max() < ds.num_domains


# ---------------------------------------------------------------- registry


def test_registry_lists_builtins_and_rejects_unknown_names():
    assert {"digits-domains", "image-folder", "cifar10", "parquet"} <= set(dataset_names())
    with pytest.raises(DatasetError, match="unknown dataset 'mnist'.*digits-domains"):
        load_dataset("mnist")
    with pytest.raises(DatasetError, match="digits-domains"):
        dataset_params_cls("mnist")


def test_unknown_or_mistyped_param_names_the_key():
    with pytest.raises(DatasetError, match=r"image_sise.*allowed keys.*image_size"):
        load_dataset("digits-domains", {"image_sise": 16})
    with pytest.raises(DatasetError, match="image_size"):
        load_dataset("digits-domains", {"image_size": "big"})
    with pytest.raises(DatasetError, match="params must be a mapping"):
        load_dataset("digits-domains", 3)


def test_params_as_instance_mapping_and_list_domains_agree():
    a = load_dataset("digits-domains", DigitsDomainsParams(domains=("plain", "noisy")))
    b = load_dataset("digits-domains", {"domains": ["plain", "noisy"]})  # YAML gives lists
    assert a is b  # same typed params → the in-process cache hands back the same object
    assert b.domain_names == ("plain", "noisy")


def test_arrays_are_read_only_and_dataset_pickles():
    """Ray ships datasets by pickle; the copy must carry the same content and fingerprint."""
    ds = load_dataset("digits-domains")
    with pytest.raises(ValueError):
        ds.images[0, 0, 0, 0] = 0.0
    ds.fingerprint()
    copy = pickle.loads(pickle.dumps(ds))
    assert np.array_equal(copy.images, ds.images) and copy.public is not None
    assert copy.fingerprint() == ds.fingerprint()
    object.__delattr__(copy, "_fingerprint")  # recomputed from content, not just carried along
    assert copy.fingerprint() == ds.fingerprint()


# ---------------------------------------------------------------- digits-domains


def test_digits_defaults_shapes_and_public_split():
    ds = load_dataset("digits-domains")
    _check_contract(ds)
    assert ds.domain_names == ALL_DOMAINS and ds.image_shape == (3, 16, 16) and ds.num_classes == 10
    pub = ds.public
    assert pub is not None and pub.domain_names == ("plain",) and not pub.domains.any()
    _check_contract(pub)

    n_domains = len(ALL_DOMAINS)
    assert len(ds) % n_domains == 0
    n_client = len(ds) // n_domains
    assert np.bincount(ds.domains).tolist() == [n_client] * n_domains
    assert len(pub) + n_client == 1797

    # Stratified: every class gives round(0.2 · n_c) digits to the public part.
    _, src_labels = _source_digits()
    per_class = np.bincount(src_labels, minlength=10)
    assert np.bincount(pub.labels, minlength=10).tolist() == [int(round(0.2 * c)) for c in per_class]
    client_labels = ds.labels[ds.domains == 0]
    assert (
        np.bincount(client_labels, minlength=10) + np.bincount(pub.labels, minlength=10)
    ).tolist() == per_class.tolist()
    # Every domain holds the same digits in the same order.
    for d in range(n_domains):
        assert np.array_equal(ds.labels[ds.domains == d], client_labels)


def test_digits_public_and_client_partition_the_source_digits():
    """Without translation, plain client images ∪ public images is exactly the source set, as a multiset."""
    ds = load_dataset("digits-domains", {"shift": 0})
    src, _ = _source_digits()
    expected = (np.clip(_upscale(src, 16), 0, 1) * 2 - 1).reshape(1797, -1)
    got = np.concatenate([ds.images[ds.domains == 0][:, 0], ds.public.images[:, 0]]).reshape(1797, -1)
    key = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731  sort rows for a multiset comparison
    np.testing.assert_allclose(key(got), key(expected), atol=1e-6)


def test_digits_deterministic_and_fingerprint_tracks_params():
    a = load_dataset("digits-domains", cache=False)
    b = load_dataset("digits-domains", cache=False)
    assert a is not b
    for x, y in [
        (a.images, b.images),
        (a.labels, b.labels),
        (a.domains, b.domains),
        (a.public.images, b.public.images),
    ]:
        assert np.array_equal(x, y)
    assert a.fingerprint() == b.fingerprint() == a.fingerprint()
    assert len(a.fingerprint()) == 16 and int(a.fingerprint(), 16) >= 0
    others = {
        load_dataset("digits-domains", {"seed": 1}).fingerprint(),
        load_dataset("digits-domains", {"image_size": 12}).fingerprint(),
        load_dataset("digits-domains", {"public_fraction": 0.3}).fingerprint(),
        load_dataset("digits-domains", {"shift": 0}).fingerprint(),
    }
    assert a.fingerprint() not in others and len(others) == 4


def test_digits_domains_differ_measurably_and_stay_readable():
    ds = load_dataset("digits-domains")
    mean = {name: ds.images[ds.domains == i].mean() for i, name in enumerate(ds.domain_names)}
    assert abs(mean["inverted"] + mean["plain"]) < 0.02  # inverted is the negative of plain
    assert mean["plain"] < -0.3 and mean["inverted"] > 0.3

    # Per-domain statistics: channel means, channel stds, colourfulness (spread between channels).
    stats = {}
    for i, name in enumerate(ds.domain_names):
        x = ds.images[ds.domains == i]
        stats[name] = np.concatenate(
            [x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3)), [np.abs(x - x.mean(1, keepdims=True)).mean()]]
        )
    for a in ALL_DOMAINS:
        for b in ALL_DOMAINS:
            if a < b:
                assert np.abs(stats[a] - stats[b]).max() > 0.05, (a, b, stats[a], stats[b])
    assert stats["colored"][-1] > 0.05 and stats["thick"][-1] > 0.05 and stats["plain"][-1] == 0.0

    # Readable: 1-nearest-neighbour on colour-invariant contrast maps (distance of each pixel from the
    # image's median colour, standardised per image), fit on half of each domain, labels the rest well.
    for i, name in enumerate(ds.domain_names):
        x = ds.images[ds.domains == i]
        contrast = np.sqrt(((x - np.median(x.reshape(len(x), 3, -1), axis=2)[:, :, None, None]) ** 2).sum(1))
        f = contrast.reshape(len(x), -1)
        f = (f - f.mean(1, keepdims=True)) / (f.std(1, keepdims=True) + 1e-6)
        y = ds.labels[ds.domains == i]
        fit, test = f[0::2], f[1::2]
        dist = (test**2).sum(1)[:, None] + (fit**2).sum(1)[None] - 2 * test @ fit.T
        accuracy = (y[0::2][dist.argmin(1)] == y[1::2]).mean()
        assert accuracy > 0.7, (name, accuracy)


def test_digits_domain_subset_renders_the_same_pixels():
    """Each domain has its own RNG stream: asking for fewer domains must not change a domain's images."""
    full = load_dataset("digits-domains")
    sub = load_dataset("digits-domains", {"domains": ["noisy", "plain"]})
    assert sub.domain_names == ("noisy", "plain")
    assert np.array_equal(sub.images[sub.domains == 0], full.images[full.domains == ALL_DOMAINS.index("noisy")])
    assert sub.fingerprint() != full.fingerprint()


def test_digits_param_validation():
    with pytest.raises(DatasetError, match="unknown domain 'sketch'.*plain, inverted, colored, noisy, thick"):
        load_dataset("digits-domains", {"domains": ["plain", "sketch"]})
    with pytest.raises(DatasetError, match="public_fraction"):
        load_dataset("digits-domains", {"public_fraction": 0.95})
    with pytest.raises(DatasetError, match="public_fraction"):
        DigitsDomainsParams(public_fraction=-0.1)
    assert load_dataset("digits-domains", {"public_fraction": 0.0}).public is None
    big = load_dataset("digits-domains", {"image_size": 32, "domains": ["thick"]})
    assert big.image_shape == (3, 32, 32)


def test_digits_build_benchmark_prints_its_figure(capsys):
    """The build time is a benchmark's figure (benchmarks/digits_build.py), not a unit-test bound."""
    import importlib.util
    import re

    spec = importlib.util.spec_from_file_location(
        "digits_build", Path(__file__).resolve().parents[1] / "benchmarks" / "digits_build.py"
    )
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--repeats", "2"]) == 0
    match = re.search(r"median ([\d.]+) s over 2 \(min ([\d.]+), max ([\d.]+)\)", capsys.readouterr().out)
    assert match and 0 < float(match[2]) <= float(match[1]) <= float(match[3])


# ---------------------------------------------------------------- image-folder

COLORS = {"cat": (255, 0, 0), "dog": (0, 0, 255), "fox": (0, 255, 0)}


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (10, 6)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


@pytest.fixture
def nested_root(tmp_path: Path) -> Path:
    """photo: cat×3, dog×3; sketch: cat×2, fox×1 (a domain missing a class is allowed)."""
    root = tmp_path / "pacs"
    for dom, counts in {"photo": {"cat": 3, "dog": 3}, "sketch": {"cat": 2, "fox": 1}}.items():
        for cls, k in counts.items():
            for j in range(k):
                _png(root / dom / cls / f"{j:02d}.png", COLORS[cls])
    (root / "README.txt").write_text("not an image")
    return root


def test_image_folder_nested_layout(nested_root: Path):
    ds = load_dataset("image-folder", {"path": str(nested_root), "image_size": 8})
    _check_contract(ds)
    assert ds.class_names == ("cat", "dog", "fox") and ds.domain_names == ("photo", "sketch")
    assert ds.image_shape == (3, 8, 8) and len(ds) == 9 and ds.public is None
    assert np.bincount(ds.domains).tolist() == [6, 3]
    assert np.bincount(ds.labels).tolist() == [5, 3, 1]
    for i, name in enumerate(ds.class_names):  # pixels follow labels: solid colours scaled to [-1, 1]
        expected = np.array(COLORS[name], dtype=np.float32) / 127.5 - 1
        np.testing.assert_allclose(ds.images[ds.labels == i].mean(axis=(0, 2, 3)), expected, atol=1e-5)


def test_image_folder_max_per_class_and_public_domain(nested_root: Path):
    capped = load_dataset("image-folder", {"path": str(nested_root), "image_size": 4, "max_per_class": 2})
    assert len(capped) == 2 + 2 + 2 + 1
    held = load_dataset("image-folder", {"path": str(nested_root), "image_size": 4, "public_domain": "sketch"})
    assert held.domain_names == ("photo",) and len(held) == 6 and not held.domains.any()
    assert held.public is not None and held.public.domain_names == ("sketch",) and len(held.public) == 3
    assert held.public.class_names == held.class_names == ("cat", "dog", "fox")
    assert sorted(held.public.labels.tolist()) == [0, 0, 2]
    with pytest.raises(DatasetError, match="public_domain 'clipart'.*photo, sketch"):
        load_dataset("image-folder", {"path": str(nested_root), "public_domain": "clipart"})


def test_image_folder_flat_layout(tmp_path: Path):
    for cls, k in {"dog": 2, "cat": 1}.items():
        for j in range(k):
            _png(tmp_path / cls / f"{j}.jpg" if cls == "dog" else tmp_path / cls / f"{j}.PNG", COLORS[cls])
    ds = load_dataset("image-folder", {"path": str(tmp_path), "image_size": 5})
    assert ds.domain_names == ("default",) and ds.class_names == ("cat", "dog")
    assert ds.labels.tolist() == [0, 1, 1] and ds.image_shape == (3, 5, 5)
    with pytest.raises(DatasetError, match="only domain"):
        load_dataset("image-folder", {"path": str(tmp_path), "public_domain": "default"})


def test_image_folder_errors(tmp_path: Path):
    with pytest.raises(DatasetError, match=r"data\.path is required"):
        load_dataset("image-folder")
    with pytest.raises(DatasetError, match="dataset path does not exist: .*nowhere"):
        load_dataset("image-folder", {"path": str(tmp_path / "nowhere")})
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="not a directory"):
        load_dataset("image-folder", {"path": str(tmp_path / "file.txt")})
    (tmp_path / "empty" / "cat").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no images found.*root/<domain>/<class>"):
        load_dataset("image-folder", {"path": str(tmp_path / "empty")})
    _png(tmp_path / "bad" / "cat" / "ok.png", COLORS["cat"])
    (tmp_path / "bad" / "cat" / "broken.png").write_bytes(b"definitely not a png")
    with pytest.raises(DatasetError, match="broken.png"):
        load_dataset("image-folder", {"path": str(tmp_path / "bad")})


# ---------------------------------------------------------------- cifar10

CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 4


def _write_cifar(root: Path) -> None:
    """Six batches of 4 images; image k of batch b has label (b·4 + k) % 10 and one lit pixel."""
    root.mkdir(parents=True)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for b, name in enumerate(files):
        data = np.zeros((PER_BATCH, 3072), dtype=np.uint8)
        labels = [(b * PER_BATCH + k) % 10 for k in range(PER_BATCH)]
        for k in range(PER_BATCH):
            c, y, x = k % 3, 5 + k, 20 + b
            data[k, c * 1024 + y * 32 + x] = 255
        with open(root / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, f)
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [n.encode() for n in CIFAR_NAMES], b"num_cases_per_batch": PER_BATCH}, f)


def test_cifar10_labels_and_pixel_positions(tmp_path: Path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    ds = load_dataset("cifar10", {"path": str(root)})
    _check_contract(ds)
    assert ds.class_names == tuple(CIFAR_NAMES) and ds.domain_names == ("default",)
    assert len(ds) == 6 * PER_BATCH and ds.image_shape == (3, 32, 32)
    assert ds.labels.tolist() == [i % 10 for i in range(6 * PER_BATCH)]
    for b in range(6):
        for k in range(PER_BATCH):
            img = ds.images[b * PER_BATCH + k]
            c, y, x = k % 3, 5 + k, 20 + b
            assert img[c, y, x] == 1.0
            assert (img == 1.0).sum() == 1 and (img == -1.0).sum() == img.size - 1

    no_test = load_dataset("cifar10", {"path": str(root), "include_test_batch": False})
    assert len(no_test) == 5 * PER_BATCH
    few = load_dataset("cifar10", {"path": str(root), "max_samples": 6, "image_size": 16})
    assert len(few) == 6 and few.image_shape == (3, 16, 16) and few.labels.tolist() == list(range(6))


def test_cifar10_missing_files_are_listed(tmp_path: Path):
    root = tmp_path / "cifar-10-batches-py"
    _write_cifar(root)
    (root / "data_batch_3").unlink()
    (root / "batches.meta").unlink()
    with pytest.raises(DatasetError, match="missing.*data_batch_3, batches.meta"):
        load_dataset("cifar10", {"path": str(root)})
    with pytest.raises(DatasetError, match=r"data\.path is required"):
        load_dataset("cifar10")


# ---------------------------------------------------------------- parquet


def _png_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (7, 9), color).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg_bytes(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture
def parquet_file(tmp_path: Path) -> Path:
    rows = [("dog", "real"), ("cat", "real"), ("fox", "clipart"), ("cat", "clipart"), ("dog", "sketch")]
    table = pa.table(
        {
            "image": pa.array([_png_bytes(COLORS[c]) for c, _ in rows], type=pa.binary()),
            "label": [c for c, _ in rows],
            "domain": [d for _, d in rows],
            "extra": list(range(len(rows))),
        }
    )
    path = tmp_path / "set.parquet"
    pq.write_table(table, path)
    return path


def test_parquet_string_labels_and_domains(parquet_file: Path):
    ds = load_dataset("parquet", {"path": str(parquet_file), "image_size": 6})
    _check_contract(ds)
    assert ds.class_names == ("cat", "dog", "fox") and ds.domain_names == ("clipart", "real", "sketch")
    assert ds.labels.tolist() == [1, 0, 2, 0, 1] and ds.domains.tolist() == [1, 1, 0, 0, 2]
    red = np.array(COLORS["cat"], dtype=np.float32) / 127.5 - 1
    np.testing.assert_allclose(ds.images[1].mean(axis=(1, 2)), red, atol=1e-5)

    held = load_dataset("parquet", {"path": str(parquet_file), "public_domain": "clipart", "image_size": 6})
    assert held.domain_names == ("real", "sketch") and len(held) == 3
    assert held.public.domain_names == ("clipart",) and held.public.labels.tolist() == [2, 0]
    assert held.public.class_names == ("cat", "dog", "fox")


def test_parquet_directory_int_labels_no_domain_and_hf_struct(tmp_path: Path):
    d = tmp_path / "shards"
    d.mkdir()
    for i, labels in enumerate([[3, 1], [1]]):
        pq.write_table(
            pa.table(
                {
                    "img": pa.array([_jpeg_bytes((40 * j, 0, 0)) for j in range(len(labels))], type=pa.binary()),
                    "y": labels,
                }
            ),
            d / f"part-{i}.parquet",
        )
    (d / "_SUCCESS").write_text("")
    ds = load_dataset("parquet", {"path": str(d), "image_column": "img", "label_column": "y", "image_size": 8})
    assert ds.class_names == ("1", "3") and ds.labels.tolist() == [1, 0, 0]
    assert ds.domain_names == ("default",) and len(ds) == 3

    hf = tmp_path / "hf.parquet"  # Hugging Face datasets store an Image feature as {bytes, path}
    struct = pa.array([{"bytes": _png_bytes(COLORS["fox"]), "path": "a.png"}])
    pq.write_table(pa.table({"image": struct, "label": [0]}), hf)
    one = load_dataset("parquet", {"path": str(hf), "image_size": 4})
    assert one.image_shape == (3, 4, 4) and one.images[0, 1].min() == 1.0


def test_parquet_errors(parquet_file: Path, tmp_path: Path):
    with pytest.raises(DatasetError, match=r"column 'pixels' missing.*columns present: image, label, domain, extra"):
        load_dataset("parquet", {"path": str(parquet_file), "image_column": "pixels"})
    with pytest.raises(DatasetError, match="column 'site' missing"):
        load_dataset("parquet", {"path": str(parquet_file), "domain_column": "site"})
    with pytest.raises(DatasetError, match="must hold encoded image bytes"):
        load_dataset("parquet", {"path": str(parquet_file), "image_column": "extra"})
    with pytest.raises(DatasetError, match=r"data\.path is required"):
        load_dataset("parquet")
    with pytest.raises(DatasetError, match="dataset path does not exist"):
        load_dataset("parquet", {"path": str(tmp_path / "nope.parquet")})
    (tmp_path / "notes.parquet").write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match="cannot read Parquet file .*notes.parquet"):
        load_dataset("parquet", {"path": str(tmp_path / "notes.parquet")})
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"image": pa.array([b"garbage"], type=pa.binary()), "label": [0]}), bad)
    with pytest.raises(DatasetError, match="cannot read image row 0"):
        load_dataset("parquet", {"path": str(bad)})
