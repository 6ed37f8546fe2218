"""Checkpoints cannot strand a run: the last ones kept, checksummed, verified, with fallback, and
client states kept for whichever checkpoint a resume falls back to."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from actors.state_store import ClientStateStore
from sim.config import load_config
from sim.orchestration.checkpoints import CheckpointError, CheckpointStore
from sim.typed import ConfigError


class _Remote:
    def __init__(self, fn):
        self.remote = fn


class FakeServer:
    """The server actor's save, without Ray: the same atomic write and digest."""

    def __init__(self) -> None:
        from actors.server import ServerWorker

        self.state = {"w": torch.zeros(3)}
        self.save = _Remote(lambda path: ServerWorker.save(self, path))


def _store(tmp_path, keep=2, **kw):
    notes: list[str] = []
    store = CheckpointStore(tmp_path / "ck", keep=keep, notice=notes.append, **kw)
    return store, notes


def _save(store, server, r, versions, done=False):
    server.state = {"w": torch.full((3,), float(r))}
    store.save(r, server, np.asarray(versions, dtype=np.int64), done)


def test_the_last_two_are_kept_with_checksums(tmp_path):
    store, _ = _store(tmp_path)
    server = FakeServer()
    for r in range(4):
        _save(store, server, r, [r, -1])
    names = sorted(p.name for p in store.dir.iterdir())
    assert names == [
        "meta_r2.json",
        "meta_r3.json",
        "server_r2.pt",
        "server_r3.pt",
        "versions_r2.npy",
        "versions_r3.npy",
    ]
    meta = json.loads((store.dir / "meta_r3.json").read_text())
    import hashlib

    assert meta["sha256"]["server_r3.pt"] == hashlib.sha256((store.dir / "server_r3.pt").read_bytes()).hexdigest()
    checkpoint, done = store.load()
    assert checkpoint.round == 3 and not done and list(checkpoint.versions) == [3, -1]


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    store, notes = _store(tmp_path)
    server = FakeServer()
    for r in range(3):
        _save(store, server, r, [r, r])
    path = store.dir / "server_r2.pt"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    else:
        path.unlink()
    fresh, notes = _store(tmp_path)
    checkpoint, _ = fresh.load()
    assert checkpoint.round == 1 and list(checkpoint.versions) == [1, 1]
    assert torch.load(checkpoint.server_path, weights_only=False)["w"][0] == 1.0
    assert len(notes) == 1 and "server_r2.pt" in notes[0] and "resuming from round 1" in notes[0]
    assert not (store.dir / "meta_r2.json").exists()  # never offered again
    assert fresh.load()[0].round == 1 and len(notes) == 1


def test_no_usable_checkpoint_says_how_to_restart(tmp_path):
    store, _ = _store(tmp_path, keep=1)
    _save(store, FakeServer(), 0, [-1])
    (store.dir / "versions_r0.npy").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"no usable checkpoint .*versions_r0.npy.*remove .*ck and resume again"):
        CheckpointStore(store.dir, keep=1).load()
    assert issubclass(CheckpointError, ConfigError)  # one line on the command line, no traceback


def test_a_write_cut_short_leaves_the_previous_checkpoint(tmp_path):
    store, _ = _store(tmp_path)
    server = FakeServer()
    _save(store, server, 1, [1])
    # a crash after the server file, before the meta: the new round is not offered, and is cleaned up later
    (store.dir / "server_r2.pt").write_bytes(b"partial")
    (store.dir / "versions_r2.npy.tmp123").write_bytes(b"x")
    assert store.load()[0].round == 1
    _save(store, server, 2, [2])
    _save(store, server, 3, [3])
    assert sorted(p.name for p in store.dir.glob("*r2*")) == ["meta_r2.json", "server_r2.pt", "versions_r2.npy"]


def test_an_old_single_meta_checkpoint_still_loads(tmp_path):
    d = tmp_path / "ck"
    d.mkdir()
    torch.save({"w": torch.ones(1)}, d / "server_r4.pt")
    np.save(d / "versions_r4.npy", np.array([4, -1]))
    (d / "meta.json").write_text(json.dumps({"round": 4, "done": True}))
    checkpoint, done = CheckpointStore(d).load()
    assert checkpoint.round == 4 and done


def test_client_states_stay_for_every_kept_checkpoint(tmp_path):
    """A client trained in rounds 1, 2 and 3: after round 3's checkpoint, round 2's (the oldest
    kept) names its version 2, so version 1 may go but 2 and 3 stay; a fallback to round 2 finds
    its state. Before, writing version 3 deleted everything below 2, and with checkpoint_every=2
    even the version the checkpoint named."""
    states = ClientStateStore(tmp_path / "states")
    store, _ = _store(tmp_path, state_dir=states.root)
    server = FakeServer()
    previous = -1
    for r in (1, 2, 3):
        states.save(0, r, {"v": torch.tensor(float(r))}, previous=previous)
        previous = r
        _save(store, server, r, [r, -1])
    assert sorted(p.name for p in states.root.rglob("*.pt")) == ["0_r2.pt", "0_r3.pt"]

    # round 3's checkpoint is damaged: the resume falls back to round 2, whose state is there;
    # round 3's state is removed (that round is redone)
    (store.dir / "server_r3.pt").write_bytes(b"torn")
    fallback, _ = _store(tmp_path, state_dir=states.root)
    checkpoint, _ = fallback.load()
    assert checkpoint.round == 2
    assert float(ClientStateStore(states.root).load(0, int(checkpoint.versions[0]))["v"]) == 2.0
    assert sorted(p.name for p in states.root.rglob("*.pt")) == ["0_r2.pt"]


def test_checkpoint_every_k_keeps_the_version_the_checkpoint_names(tmp_path):
    states = ClientStateStore(tmp_path / "states")
    store, _ = _store(tmp_path, keep=1, state_dir=states.root)
    server = FakeServer()
    states.save(5, 1, {"v": torch.tensor(1.0)}, previous=-1)
    _save(store, server, 2, [-1] * 5 + [1])  # checkpoint at round 2 names version 1
    states.save(5, 3, {"v": torch.tensor(3.0)}, previous=1)
    states.save(5, 4, {"v": torch.tensor(4.0)}, previous=3)  # the run dies here, before round 4's checkpoint
    checkpoint, _ = CheckpointStore(store.dir, keep=1, state_dir=states.root).load()
    assert checkpoint.round == 2 and float(ClientStateStore(states.root).load(5, 1)["v"]) == 1.0


def test_checkpoint_keep_is_a_config_key():
    assert load_config(None, []).checkpoint_keep == 2
    assert load_config(None, ["checkpoint_keep=5"]).checkpoint_keep == 5
    with pytest.raises(ConfigError, match="checkpoint_keep must be > 0"):
        load_config(None, ["checkpoint_keep=0"])
