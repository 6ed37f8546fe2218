"""Content-addressed on-disk store of partitions: root/<key>/{partition.parquet, manifest.json, ...}.

Every algorithm of a comparison, on every node, reads the same files, so they must be
trustworthy: a directory appears only by an atomic rename of a finished temp directory, and
loading re-checks the manifest against its key, the Parquet against its sha256 and the
indices against the dataset size. A file that fails any check is never used: `load` raises,
`get_or_build` moves it aside as <key>.corrupt-<timestamp> and rebuilds.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from sim.files import sha256_file
from sim.partition.base import SPLITS, Partition, PartitionError, SplitFractions
from sim.partition.build import ALGORITHM_VERSION, build_partition, check_arrays, key_of_spec, partition_spec
from sim.partition.stats import heterogeneity, label_count_table, plot_heatmap

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PARQUET = "partition.parquet"
MANIFEST = "manifest.json"
LABEL_COUNTS = "label_counts.csv"
HEATMAP = "heatmap.png"
_SPEC_FIELDS = (
    "algorithm_version",
    "dataset_fingerprint",
    "scheme",
    "params",
    "num_clients",
    "seed",
    "min_size",
    "split",
)
_META_KEY = b"warmfed.partition"
_KEY_RE = re.compile(r"^[0-9a-f]{16}$")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartitionStore:
    """Several partitions side by side under `root`, each in the directory named by its key."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def path_for(self, key: str) -> Path:
        if not isinstance(key, str) or not _KEY_RE.match(key):
            raise PartitionError(f"key: expected 16 lowercase hex digits, got {key!r}")
        return self.root / key

    # ------------------------------------------------------------------ public API

    def get_or_build(
        self,
        labels: np.ndarray,
        domains: np.ndarray | None,
        num_classes: int,
        num_domains: int,
        *,
        scheme: str,
        params: Mapping[str, Any] | Any | None = None,
        num_clients: int,
        seed: int,
        min_size: int = 10,
        split: SplitFractions | Mapping[str, Any] | None = None,
        dataset_fingerprint: str,
    ) -> tuple[Partition, Path, bool]:
        """Load the partition for these arguments if a valid copy exists, else build and save it.

        Returns (partition, its directory, built_now). A copy that fails verification or does
        not match the request is moved aside with a warning and rebuilt.
        """
        labels, domains, num_classes, num_domains = check_arrays(labels, domains, num_classes, num_domains)
        spec = partition_spec(dataset_fingerprint, scheme, params, num_clients, seed, min_size, split)
        key = key_of_spec(spec)
        path = self.path_for(key)
        want = dict(spec, n_samples=int(labels.size), num_classes=num_classes, num_domains=num_domains)
        if path.exists():
            try:
                part = self.load(key)
                got = dict(part.meta)
                if got != want:
                    diff = sorted(k for k in set(want) | set(got) if got.get(k) != want.get(k))
                    raise PartitionError(
                        f"{path / MANIFEST}: manifest parameters do not match the request ({', '.join(diff)})"
                    )
                return part, path, False
            except PartitionError as exc:
                aside = self._move_aside(path)
                log.warning("partition %s is unusable (%s); moved to %s and rebuilding", key, exc, aside)
        t0 = time.perf_counter()
        part = build_partition(
            labels,
            domains,
            num_classes,
            num_domains,
            scheme=scheme,
            params=spec["params"],
            num_clients=spec["num_clients"],
            seed=spec["seed"],
            min_size=spec["min_size"],
            split=spec["split"],
            dataset_fingerprint=dataset_fingerprint,
        )
        built_s = time.perf_counter() - t0
        if not self._write(part, labels, domains, num_classes, num_domains, build_seconds=built_s):
            return self.load(key), path, False  # another process won the race; use its copy
        log.info("built partition %s (%s, %d clients) in %.2fs", key, scheme, part.num_clients, built_s)
        return part, path, True

    def load(self, key: str) -> Partition:
        """Read and verify root/<key>; raises PartitionError naming the file and the failed check."""
        path = self.path_for(key)
        if not path.is_dir():
            raise PartitionError(f"{path}: no partition with key {key}")
        manifest = self._read_manifest(path)
        mpath = path / MANIFEST
        if manifest.get("key") != key:
            raise PartitionError(f"{mpath}: manifest key {manifest.get('key')!r} differs from directory key {key}")
        spec = {k: manifest[k] for k in _SPEC_FIELDS}
        try:
            recomputed = key_of_spec(spec)
        except (TypeError, ValueError) as exc:
            raise PartitionError(f"{mpath}: manifest parameters unreadable: {exc}") from exc
        if recomputed != key:
            raise PartitionError(f"{mpath}: manifest parameters hash to {recomputed}, not {key} (manifest edited?)")
        ppath = path / PARQUET
        if not ppath.is_file():
            raise PartitionError(f"{ppath}: missing")
        sha = sha256_file(ppath)
        if sha != manifest["partition_sha256"]:
            expected = str(manifest["partition_sha256"])[:12]
            raise PartitionError(f"{ppath}: sha256 {sha[:12]}... differs from the manifest's {expected}...")
        return self._read_parquet(ppath, manifest, key)

    def keys(self) -> list[str]:
        """Keys of the partition directories present (not verified)."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _KEY_RE.match(p.name))

    # ------------------------------------------------------------------ reading

    def _read_manifest(self, path: Path) -> dict[str, Any]:
        mpath = path / MANIFEST
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise PartitionError(f"{mpath}: manifest unreadable: {exc}") from exc
        if not isinstance(manifest, dict):
            raise PartitionError(f"{mpath}: manifest is not a JSON object")
        required = (
            *_SPEC_FIELDS,
            "key",
            "format_version",
            "partition_sha256",
            "n_samples",
            "num_classes",
            "num_domains",
            "n_per_split",
        )
        missing = [k for k in required if k not in manifest]
        if missing:
            raise PartitionError(f"{mpath}: manifest lacks field(s) {', '.join(missing)}")
        if manifest["format_version"] != FORMAT_VERSION:
            raise PartitionError(
                f"{mpath}: format_version {manifest['format_version']!r} unsupported (this code reads {FORMAT_VERSION})"
            )
        return manifest

    def _read_parquet(self, ppath: Path, manifest: Mapping[str, Any], key: str) -> Partition:
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(ppath)
            client = table.column("client_id").to_numpy().astype(np.int64)
            sample = table.column("sample_index").to_numpy().astype(np.int64)
            col = table.column("split").combine_chunks()
            if not pa.types.is_dictionary(col.type):
                col = col.dictionary_encode()
            codes = col.indices.to_numpy(zero_copy_only=False).astype(np.int64)
            names = col.dictionary.to_pylist()
            extra = json.loads((table.schema.metadata or {}).get(_META_KEY, b"null"))
        except Exception as exc:  # pyarrow raises many types for damaged files
            raise PartitionError(f"{ppath}: unreadable Parquet: {type(exc).__name__}: {exc}") from exc
        if not isinstance(extra, dict) or extra.get("key") != key:
            embedded = extra.get("key") if isinstance(extra, dict) else None
            raise PartitionError(f"{ppath}: embedded key {embedded!r} != {key}")
        bad = [n for n in names if n not in SPLITS]
        if bad:
            raise PartitionError(f"{ppath}: unknown split value {bad[0]!r}; allowed: {', '.join(SPLITS)}")
        J, n = int(manifest["num_clients"]), int(manifest["n_samples"])
        if client.size and (client.min() < 0 or client.max() >= J):
            raise PartitionError(f"{ppath}: client_id outside [0, {J})")
        if sample.size and (sample.min() < 0 or sample.max() >= n):
            raise PartitionError(f"{ppath}: sample_index outside [0, n_samples={n})")
        if sample.size and np.bincount(sample, minlength=n).max() > 1:
            raise PartitionError(f"{ppath}: a sample index appears in two clients or splits")
        indices, offsets = {}, {}
        for s in SPLITS:
            sel = codes == names.index(s) if s in names else np.zeros(codes.size, dtype=bool)
            c, i = client[sel], sample[sel]
            order = np.lexsort((i, c))
            indices[s] = i[order]
            offsets[s] = np.concatenate(([0], np.cumsum(np.bincount(c, minlength=J))))
            if int(manifest["n_per_split"].get(s, -1)) != i.size:
                expected = manifest["n_per_split"].get(s)
                raise PartitionError(f"{ppath}: {i.size} {s} rows but the manifest says {expected}")
        train, test = np.diff(offsets["train"]), np.diff(offsets["test"])
        if train.min() < int(manifest["min_size"]) or test.min() < 1:
            raise PartitionError(
                f"{ppath}: a client has fewer than min_size={manifest['min_size']} train or no test samples"
            )
        cd = np.asarray(extra.get("client_domain", []), dtype=np.int64)
        D = int(manifest["num_domains"])
        if cd.shape != (J,) or (cd.size and (cd.min() < -1 or cd.max() >= D)):
            raise PartitionError(f"{ppath}: client_domain metadata malformed (expected {J} values in [-1, {D}))")
        meta = {k: manifest[k] for k in _SPEC_FIELDS}
        meta.update(n_samples=n, num_classes=int(manifest["num_classes"]), num_domains=D)
        return Partition(J, indices, offsets, cd, key, meta)

    # ------------------------------------------------------------------ writing

    def _move_aside(self, path: Path) -> Path:
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = path.with_name(f"{path.name}.corrupt-{stamp}")
        os.rename(path, aside)
        return aside

    def _write(
        self,
        part: Partition,
        labels: np.ndarray,
        domains: np.ndarray,
        num_classes: int,
        num_domains: int,
        build_seconds: float,
    ) -> bool:
        """Write into a temp dir, then rename it into place; False if another writer got there first."""
        import pyarrow as pa
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        final = self.path_for(part.key)
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{part.key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            sizes = {s: part.sizes(s) for s in SPLITS}
            client = np.concatenate([part.client_ids(s) for s in SPLITS]).astype(np.int32)
            codes = np.concatenate([np.full(part.indices[s].size, i, dtype=np.int8) for i, s in enumerate(SPLITS)])
            table = pa.table(
                {
                    "client_id": pa.array(client, pa.int32()),
                    "split": pa.DictionaryArray.from_arrays(pa.array(codes, pa.int8()), pa.array(list(SPLITS))),
                    "sample_index": pa.array(np.concatenate([part.indices[s] for s in SPLITS]), pa.int64()),
                }
            )
            extra = {"key": part.key, "client_domain": part.client_domain.tolist()}
            table = table.replace_schema_metadata({_META_KEY: json.dumps(extra, separators=(",", ":")).encode()})
            pq.write_table(table, tmp / PARQUET, compression="zstd")
            _fsync(tmp / PARQUET)
            pacsv.write_csv(pa.table(label_count_table(part, labels, num_classes)), tmp / LABEL_COUNTS)
            het = heterogeneity(part, labels, num_classes, domains, num_domains)
            meta = part.meta
            title = f"{meta['scheme']} " + " ".join(f"{k}={v}" for k, v in meta["params"].items())
            plot_heatmap(part, labels, num_classes, tmp / HEATMAP, title=f"{title.strip()} [{part.key}]")
            manifest = {
                "format_version": FORMAT_VERSION,
                "key": part.key,
                **{k: meta[k] for k in _SPEC_FIELDS},
                "n_samples": meta["n_samples"],
                "num_classes": num_classes,
                "num_domains": num_domains,
                "n_per_split": {s: int(sizes[s].sum()) for s in SPLITS},
                "client_sizes": {
                    s: {"min": int(sizes[s].min()), "median": float(np.median(sizes[s])), "max": int(sizes[s].max())}
                    for s in SPLITS
                },
                "partition_sha256": sha256_file(tmp / PARQUET),
                "heterogeneity": het,
                "clients_with_majority_domain": int((part.client_domain >= 0).sum()),
                "build_seconds": round(build_seconds, 3),
                "numpy_version": np.__version__,
                "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            }
            assert manifest["algorithm_version"] == ALGORITHM_VERSION
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n", encoding="utf-8")
            _fsync(tmp / MANIFEST)
            try:
                os.rename(tmp, final)
            except OSError:
                if final.exists():
                    shutil.rmtree(tmp, ignore_errors=True)
                    return False
                raise
            return True
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
