"""Tests of sim/partition: scheme properties, guarantees, hashing, the on-disk store and its verification."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sim.partition import (
    SPLITS,
    DirichletParams,
    Partition,
    PartitionError,
    PartitionStore,
    SplitFractions,
    build_partition,
    describe,
    heterogeneity,
    min_total_per_client,
    partition_key,
    scheme_names,
    scheme_params_cls,
    split_counts,
)

REPO = Path(__file__).resolve().parents[1]
K, D = 10, 4


def make_data(n: int = 6000, num_classes: int = K, num_domains: int = D, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, num_classes, n), rng.integers(0, num_domains, n)


LABELS, DOMAINS = make_data()
ALL_SCHEMES = ["iid", "dirichlet", "shards", "quantity", "domain", "domain-dirichlet"]


def build(
    scheme: str, params=None, num_clients: int = 20, seed: int = 1, labels=LABELS, domains=DOMAINS, **kw
) -> Partition:
    return build_partition(
        labels,
        domains,
        K,
        D,
        scheme=scheme,
        params=params,
        num_clients=num_clients,
        seed=seed,
        dataset_fingerprint="synthetic-v1",
        **kw,
    )


def check_invariants(p: Partition, n: int, min_size: int = 10) -> None:
    """Min sizes, disjointness across clients and splits, coverage and CSR consistency."""
    assert p.sizes("train").min() >= min_size
    assert p.sizes("test").min() >= 1
    everything = np.concatenate([p.indices[s] for s in SPLITS])
    assert np.unique(everything).size == everything.size, "an index is in two clients or splits"
    assert everything.min() >= 0 and everything.max() < n
    for s in SPLITS:
        assert p.offsets[s].shape == (p.num_clients + 1,)
        assert p.indices[s].dtype == np.int64 and p.offsets[s].dtype == np.int64
        assert p.sizes(s).sum() == p.indices[s].size
    j = p.num_clients // 2
    assert np.array_equal(
        p.client_indices(j, "train"), p.indices["train"][p.offsets["train"][j] : p.offsets["train"][j + 1]]
    )


# ----------------------------------------------------------------------------- registry and validation


def test_registry_lists_all_schemes_with_defaults():
    assert set(ALL_SCHEMES) <= set(scheme_names())
    assert scheme_params_cls("dirichlet")().alpha == 0.5
    assert scheme_params_cls("shards")().classes_per_client == 2
    assert scheme_params_cls("quantity")().sigma == 1.0


def test_unknown_scheme_lists_registered_names():
    with pytest.raises(PartitionError) as exc:
        build("no-such-scheme")
    msg = str(exc.value)
    assert "no-such-scheme" in msg and all(name in msg for name in ALL_SCHEMES)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("scheme", ["dirichlet", "domain-dirichlet"])
def test_bad_alpha_names_alpha(scheme, alpha):
    with pytest.raises(PartitionError, match="alpha"):
        build(scheme, {"alpha": alpha})


def test_bad_params_are_reported():
    with pytest.raises(PartitionError, match="alfa"):
        build("dirichlet", {"alfa": 0.1})
    with pytest.raises(PartitionError, match="alpha"):
        build("dirichlet", {"alpha": "0.1"})
    with pytest.raises(PartitionError, match="classes_per_client"):
        build("shards", {"classes_per_client": 0})
    with pytest.raises(PartitionError, match="classes_per_client=11"):
        build("shards", {"classes_per_client": 11})
    with pytest.raises(PartitionError, match="sigma"):
        build("quantity", {"sigma": -1})
    with pytest.raises(PartitionError, match="ShardsParams"):
        build("shards", DirichletParams())


@pytest.mark.parametrize("val,test", [(-0.1, 0.2), (0.1, 0.0), (0.5, 0.5), (0.1, "x")])
def test_bad_split_fractions(val, test):
    with pytest.raises(PartitionError, match="split"):
        SplitFractions(val=val, test=test)


def test_bad_common_arguments():
    with pytest.raises(PartitionError, match="num_clients"):
        build("iid", num_clients=0)
    with pytest.raises(PartitionError, match="seed"):
        build("iid", seed=-3)
    with pytest.raises(PartitionError, match="labels"):
        build_partition(
            LABELS + K, DOMAINS, K, D, scheme="iid", params=None, num_clients=2, seed=0, dataset_fingerprint="x"
        )
    with pytest.raises(PartitionError, match="domains"):
        build_partition(
            LABELS, DOMAINS[:-1], K, D, scheme="iid", params=None, num_clients=2, seed=0, dataset_fingerprint="x"
        )


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_impossible_min_size_is_an_error_not_a_hang(scheme):
    # 6000 samples, 500 clients, min_size 10 -> each needs 14 (with val/test) -> 7000 > 6000
    with pytest.raises(PartitionError, match="min_size"):
        build(scheme, num_clients=500, min_size=10)


def test_domain_scheme_needs_a_client_per_domain_and_samples_per_domain():
    with pytest.raises(PartitionError, match="num_domains"):
        build("domain", num_clients=D - 1)
    labels, domains = LABELS[:400], np.where(np.arange(400) < 390, 0, 1)  # domain 1 has 10 samples
    with pytest.raises(PartitionError, match="domain 1"):
        build_partition(
            labels, domains, K, 2, scheme="domain", params=None, num_clients=4, seed=0, dataset_fingerprint="x"
        )


# ----------------------------------------------------------------------------- split arithmetic


@pytest.mark.parametrize("val,test", [(0.1, 0.2), (0.0, 0.5), (0.3, 0.3), (0.05, 0.9), (0.0, 0.01)])
@pytest.mark.parametrize("min_size", [1, 2, 10, 33])
def test_min_total_is_the_smallest_sufficient_client_size(val, test, min_size):
    sf = SplitFractions(val, test)
    m = min_total_per_client(min_size, sf)
    ns = np.arange(2, 5 * m + 50)
    train, v, t = split_counts(ns, sf)
    assert np.all(np.diff(train) >= 0), "train must not shrink as a client grows"
    assert np.all(t >= 1) and np.all(v >= 0) and np.all(train + v + t == ns)
    assert split_counts(m, sf)[0] >= min_size
    assert m == 2 or split_counts(m - 1, sf)[0] < min_size


# ----------------------------------------------------------------------------- scheme properties


@pytest.mark.parametrize("scheme", ALL_SCHEMES)
def test_every_scheme_meets_min_size_disjoint_and_covers(scheme):
    p = build(scheme, num_clients=40)
    check_invariants(p, LABELS.size)
    # all built-in schemes use every sample
    assert sum(p.indices[s].size for s in SPLITS) == LABELS.size
    counts = p.label_counts(LABELS, K)
    assert counts.shape == (40, K) and np.array_equal(counts.sum(axis=1), p.sizes("train"))


def test_dirichlet_small_alpha_concentrates_labels():
    # Hsu et al. with alpha=0.1 over 10 classes gives E[max class share] ~ 0.65; average 3 seeds
    hs = [heterogeneity(build("dirichlet", {"alpha": 0.1}, num_clients=100, seed=s), LABELS, K) for s in range(3)]
    assert np.mean([h["max_class_share_mean"] for h in hs]) > 0.6
    assert np.mean([h["label_tv_mean"] for h in hs]) > 0.5
    assert np.mean([h["label_entropy_mean"] for h in hs]) < 0.5


def test_dirichlet_large_alpha_is_near_uniform():
    p = build("dirichlet", {"alpha": 100.0}, num_clients=20)
    h = heterogeneity(p, LABELS, K)
    assert h["max_class_share_mean"] < 0.2
    assert h["label_tv_mean"] < 0.1
    assert h["label_entropy_mean"] > 0.95


def test_dirichlet_tiny_alpha_at_exact_capacity_terminates_with_min_size():
    # N == clients * min_total: the repair must hit the minimum exactly for every client
    m = min_total_per_client(10, SplitFractions())
    labels, domains = make_data(n=300 * m)
    p = build("dirichlet", {"alpha": 0.001}, num_clients=300, labels=labels, domains=domains)
    check_invariants(p, labels.size)
    total = sum(p.sizes(s) for s in SPLITS)
    assert np.all(total == m)


@pytest.mark.parametrize("c", [1, 2, 3, 10])
def test_shards_give_exactly_c_classes_per_client(c):
    p = build("shards", {"classes_per_client": c}, num_clients=50)
    all_counts = sum(p.label_counts(LABELS, K, s) for s in SPLITS)
    assert np.all((all_counts > 0).sum(axis=1) == c)
    assert np.all((p.label_counts(LABELS, K, "train") > 0).sum(axis=1) == c)  # stratified split keeps them
    holders = (all_counts > 0).sum(axis=0)
    assert holders.max() - holders.min() <= c  # classes evenly spread over clients


def test_shards_class_sets_vary_between_clients():
    p = build("shards", {"classes_per_client": 2}, num_clients=200)
    sets = {tuple(np.flatnonzero(row)) for row in p.label_counts(LABELS, K) > 0}
    assert len(sets) > 15  # not just a handful of fixed class pairs


def test_quantity_gives_a_wide_size_spread_with_iid_labels():
    labels, domains = make_data(n=20000)
    p = build("quantity", {"sigma": 1.0}, num_clients=50, labels=labels, domains=domains)
    h = heterogeneity(p, labels, K)
    assert h["size_cv"] > 0.5
    assert p.sizes().max() > 5 * p.sizes().min()
    flat = build("quantity", {"sigma": 0.0}, num_clients=50, labels=labels, domains=domains)
    assert heterogeneity(flat, labels, K)["size_cv"] < 0.02


@pytest.mark.parametrize("scheme", ["domain", "domain-dirichlet"])
def test_domain_schemes_give_one_domain_per_client_round_robin(scheme):
    p = build(scheme, num_clients=10)
    for j in range(10):
        doms = np.unique(np.concatenate([DOMAINS[p.client_indices(j, s)] for s in SPLITS]))
        assert doms.tolist() == [j % D]
    assert np.array_equal(p.client_domain, np.arange(10) % D)
    h = heterogeneity(p, LABELS, K, DOMAINS, D)
    assert h["domains_per_client_mean"] == 1.0 and h["domain_purity_mean"] == 1.0


def test_domain_dirichlet_also_skews_labels():
    iid_like = heterogeneity(build("domain", num_clients=80), LABELS, K)
    skewed = heterogeneity(build("domain-dirichlet", {"alpha": 0.1}, num_clients=80), LABELS, K)
    assert skewed["max_class_share_mean"] > iid_like["max_class_share_mean"] + 0.3


def test_client_domain_is_minus_one_for_mixed_clients():
    p = build("iid", num_clients=10)
    assert np.all(p.client_domain == -1)


# ----------------------------------------------------------------------------- determinism and keys


def test_same_inputs_same_partition_and_global_rng_untouched():
    np.random.seed(123)
    state = np.random.get_state()[1].copy()
    a = build("dirichlet", {"alpha": 0.3}, seed=7)
    b = build("dirichlet", DirichletParams(alpha=0.3), seed=7)
    assert np.array_equal(np.random.get_state()[1], state)
    assert a == b and a.key == b.key


def test_different_seed_gives_different_key_and_partition():
    a, b = build("dirichlet", seed=1), build("dirichlet", seed=2)
    assert a.key != b.key
    assert not np.array_equal(a.indices["train"], b.indices["train"])


def test_key_depends_on_every_argument_and_normalizes_params():
    base = dict(
        dataset_fingerprint="ds",
        scheme="dirichlet",
        params={"alpha": 1},
        num_clients=10,
        seed=0,
        min_size=10,
        split=SplitFractions(),
    )
    k0 = partition_key(**base)
    assert len(k0) == 16 and int(k0, 16) >= 0
    assert partition_key(**{**base, "params": DirichletParams(alpha=1.0)}) == k0
    assert partition_key(**{**base, "split": {"val": 0.1, "test": 0.2}}) == k0
    variants = [
        {"dataset_fingerprint": "ds2"},
        {"scheme": "domain-dirichlet"},
        {"params": {"alpha": 2}},
        {"num_clients": 11},
        {"seed": 1},
        {"min_size": 11},
        {"split": SplitFractions(0.0, 0.2)},
    ]
    keys = {partition_key(**{**base, **v}) for v in variants}
    assert k0 not in keys and len(keys) == len(variants)


def test_key_is_stable_across_processes():
    code = (
        "from sim.partition import partition_key, SplitFractions;"
        "print(partition_key('ds', 'shards', {'classes_per_client': 3}, 100, 5, 10, SplitFractions(0.1, 0.2)))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == partition_key("ds", "shards", {"classes_per_client": 3}, 100, 5, 10, SplitFractions())


# ----------------------------------------------------------------------------- scale


@pytest.mark.parametrize("scheme,params", [("dirichlet", {"alpha": 0.1}), ("shards", {"classes_per_client": 2})])
def test_ten_thousand_clients(scheme, params):
    labels, domains = make_data(n=60_000)
    t0 = time.perf_counter()
    p = build(scheme, params, num_clients=10_000, min_size=3, labels=labels, domains=domains)
    print(f"\n{scheme} 10,000 clients x 60,000 samples: built in {time.perf_counter() - t0:.3f}s")
    check_invariants(p, labels.size, min_size=3)


# ----------------------------------------------------------------------------- store


def store_build(store: PartitionStore, **kw):
    args = dict(scheme="dirichlet", params={"alpha": 0.3}, num_clients=20, seed=3, dataset_fingerprint="synthetic-v1")
    args.update(kw)
    return store.get_or_build(LABELS, DOMAINS, K, D, **args)


def test_store_round_trip_and_files(tmp_path):
    store = PartitionStore(tmp_path / "partitions")
    p, path, built = store_build(store)
    assert built and path == store.path_for(p.key) and path.name == p.key
    for name in ("partition.parquet", "manifest.json", "label_counts.csv", "heatmap.png"):
        assert (path / name).is_file(), name
    assert (path / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["key"] == p.key and manifest["scheme"] == "dirichlet" and manifest["params"] == {"alpha": 0.3}
    assert manifest["n_per_split"]["train"] == p.indices["train"].size
    scalars = {"label_tv_mean", "label_entropy_mean", "size_cv", "domains_per_client_mean"}
    assert scalars <= set(manifest["heterogeneity"])
    lines = (path / "label_counts.csv").read_text().strip().splitlines()
    assert len(lines) == 1 + 3 * 20 and lines[0].replace('"', "").startswith("client_id,split,class_0")

    q, path2, built2 = store_build(store)
    assert not built2 and path2 == path and q == p
    assert store.load(p.key) == p
    assert not [x for x in path.parent.iterdir() if x.name.startswith(".tmp")]


def test_parquet_is_long_format(tmp_path):
    import pyarrow.parquet as pq

    store = PartitionStore(tmp_path)
    p, path, _ = store_build(store)
    table = pq.read_table(path / "partition.parquet")
    assert table.column_names == ["client_id", "split", "sample_index"]
    assert str(table.schema.field("client_id").type) == "int32"
    assert str(table.schema.field("sample_index").type) == "int64"
    assert table.num_rows == sum(p.indices[s].size for s in SPLITS)


def test_two_partitions_coexist(tmp_path):
    store = PartitionStore(tmp_path)
    a, pa_, _ = store_build(store, seed=1)
    b, pb, _ = store_build(store, scheme="shards", params=None, seed=1)
    assert a.key != b.key and pa_ != pb
    assert set(store.keys()) == {a.key, b.key}
    assert store.load(a.key) == a and store.load(b.key) == b
    assert store_build(store, seed=1)[2] is False


def _corrupt_truncate(path: Path) -> None:
    f = path / "partition.parquet"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _corrupt_flip(path: Path) -> None:
    f = path / "partition.parquet"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))


def _corrupt_manifest_params(path: Path) -> None:
    f = path / "manifest.json"
    m = json.loads(f.read_text())
    m["params"]["alpha"] = 5.0
    f.write_text(json.dumps(m))


def _corrupt_manifest_garbage(path: Path) -> None:
    (path / "manifest.json").write_text("{not json")


def _missing_parquet(path: Path) -> None:
    (path / "partition.parquet").unlink()


@pytest.mark.parametrize(
    "corrupt,check",
    [
        (_corrupt_truncate, "sha256"),
        (_corrupt_flip, "sha256"),
        (_corrupt_manifest_params, "hash to"),
        (_corrupt_manifest_garbage, "manifest unreadable"),
        (_missing_parquet, "missing"),
    ],
)
def test_corruption_is_detected_and_rebuilt(tmp_path, corrupt, check):
    store = PartitionStore(tmp_path)
    p, path, _ = store_build(store)
    corrupt(path)
    with pytest.raises(PartitionError, match=check) as exc:
        store.load(p.key)
    assert p.key in str(exc.value)  # names the file
    q, path2, built = store_build(store)
    assert built and path2 == path and q == p
    assert store.load(p.key) == p
    aside = [x for x in tmp_path.iterdir() if x.name.startswith(f"{p.key}.corrupt-")]
    assert len(aside) == 1


def _rewrite_parquet(path: Path, edit) -> None:
    """Tamper with the rows but keep the manifest sha256 consistent: only the content checks can catch it."""
    import hashlib

    import pyarrow as pa
    import pyarrow.parquet as pq

    f = path / "partition.parquet"
    table = pq.read_table(f)
    cols = {name: np.array(table.column(name).to_numpy(zero_copy_only=False)) for name in table.column_names}
    edit(cols)
    new = pa.table(
        {
            "client_id": pa.array(cols["client_id"], pa.int32()),
            "split": pa.array(cols["split"].astype(str)),
            "sample_index": pa.array(cols["sample_index"], pa.int64()),
        }
    ).replace_schema_metadata(table.schema.metadata)
    pq.write_table(new, f)
    m = json.loads((path / "manifest.json").read_text())
    m["partition_sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(m))


def _index_out_of_range(cols) -> None:
    cols["sample_index"][0] = LABELS.size + 5


def _duplicate_index(cols) -> None:
    cols["sample_index"][1] = cols["sample_index"][0]


def _client_out_of_range(cols) -> None:
    cols["client_id"][0] = 999


@pytest.mark.parametrize(
    "edit,check",
    [
        (_index_out_of_range, "outside"),
        (_duplicate_index, "two clients or splits"),
        (_client_out_of_range, "client_id"),
    ],
)
def test_load_validates_content(tmp_path, edit, check):
    store = PartitionStore(tmp_path)
    p, path, _ = store_build(store)
    _rewrite_parquet(path, edit)
    with pytest.raises(PartitionError, match=check):
        store.load(p.key)
    q, _, built = store_build(store)
    assert built and q == p


def test_get_or_build_rebuilds_when_the_dataset_size_differs(tmp_path):
    store = PartitionStore(tmp_path)
    p, path, _ = store_build(store)
    labels, domains = make_data(n=5000)
    q, path2, built = store.get_or_build(
        labels,
        domains,
        K,
        D,
        scheme="dirichlet",
        params={"alpha": 0.3},
        num_clients=20,
        seed=3,
        dataset_fingerprint="synthetic-v1",
    )
    assert built and path2 == path and q.meta["n_samples"] == 5000


def test_losing_a_write_race_keeps_the_winner_and_leaves_no_temp_dir(tmp_path):
    store = PartitionStore(tmp_path)
    p, path, _ = store_build(store)
    before = (path / "manifest.json").read_text()
    assert store._write(p, LABELS, DOMAINS, K, D, build_seconds=0.0) is False  # as if a second node finished later
    assert (path / "manifest.json").read_text() == before
    assert [x.name for x in tmp_path.iterdir()] == [p.key]


def test_load_unknown_key_and_bad_key(tmp_path):
    store = PartitionStore(tmp_path)
    with pytest.raises(PartitionError, match="no partition"):
        store.load("0123456789abcdef")
    with pytest.raises(PartitionError, match="key"):
        store.path_for("../etc")


def test_describe_summarizes(tmp_path):
    p = build("domain-dirichlet", {"alpha": 0.5}, num_clients=12)
    text = describe(p, LABELS, K, DOMAINS, D)
    assert p.key in text and "clients: 12" in text and "domain-dirichlet" in text
    assert "label_tv_mean" in text and "min/median/max" in text


def test_partition_pickles_for_shipping_to_actors():
    import pickle

    p = build("shards", num_clients=7)
    q = pickle.loads(pickle.dumps(p))
    assert q == p and not q.indices["train"].flags.writeable


def test_partition_accessors_reject_bad_input():
    p = build("iid", num_clients=5)
    with pytest.raises(PartitionError, match="split"):
        p.sizes("training")
    with pytest.raises(PartitionError, match="client_id"):
        p.client_indices(5)
    with pytest.raises(ValueError):
        p.indices["train"][0] = 1  # read-only arrays: nobody mutates a shared partition
