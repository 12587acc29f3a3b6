"""Atomic checkpoints with a history, weights-only loading, and the choice of where to resume."""

from __future__ import annotations

import errno
import inspect
import os
import pickle
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

import lcc.io as io_module
from lcc.cli import main
from lcc.errors import LCCInputError
from lcc.train import checkpoints as ckpt
from lcc.train.checkpoints import (
    AtomicCheckpointIO,
    checkpoint_candidates,
    find_resumable,
    history_names,
    inspect_checkpoint,
    save_checkpoint_atomic,
)

REPO = Path(__file__).resolve().parents[2]


def state(epoch: int, *, steps_per_epoch: int = 4, size: int = 64) -> dict:
    """A checkpoint shaped like Lightning's: counters that agree with the loop state."""
    step = steps_per_epoch * (epoch + 1)
    return {
        "epoch": epoch,
        "global_step": step,
        "state_dict": {"w": torch.full((size,), float(epoch))},
        "loops": {
            "fit_loop": {
                "epoch_progress": {"current": {"completed": epoch}},
                "epoch_loop.automatic_optimization.optim_progress": {
                    "optimizer": {"step": {"total": {"completed": step}}}
                },
            }
        },
    }


def epoch_of(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["epoch"])


class Payload:
    """Unpickling this creates ``marker``: the stand-in for code a malicious file would run."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


# --------------------------------------------------------------------------- history


@pytest.mark.parametrize("keep_last", [1, 2, 3])
def test_history_keeps_the_newest_checkpoints(tmp_path, keep_last):
    folder = tmp_path / "checkpoints"
    for epoch in range(4):
        save_checkpoint_atomic(state(epoch), folder / "last.ckpt", keep_last=keep_last)
    names = history_names(keep_last)
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert [epoch_of(folder / name) for name in names] == [3, 2, 1][:keep_last]


def test_other_names_are_written_atomically_without_history(tmp_path):
    for epoch in range(2):
        save_checkpoint_atomic(state(epoch), tmp_path / "epoch=E.ckpt")
    assert [p.name for p in tmp_path.iterdir()] == ["epoch=E.ckpt"]
    assert epoch_of(tmp_path / "epoch=E.ckpt") == 1


def test_a_damaged_last_is_not_kept_in_place_of_the_good_previous(tmp_path):
    last = tmp_path / "last.ckpt"
    save_checkpoint_atomic(state(0), last)
    save_checkpoint_atomic(state(1), last)
    last.write_bytes(last.read_bytes()[:500])  # e.g. a bad copy
    save_checkpoint_atomic(state(2), last)
    assert epoch_of(last) == 2
    assert epoch_of(tmp_path / "previous.ckpt") == 0  # not the damaged epoch-1 file


def test_keep_last_must_be_positive():
    with pytest.raises(LCCInputError, match="keep_last must be a positive integer"):
        history_names(0)
    with pytest.raises(LCCInputError, match="keep_last"):
        AtomicCheckpointIO(keep_last=0)


def test_an_interrupted_write_leaves_the_old_files_intact(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    save_checkpoint_atomic(state(0), last)
    save_checkpoint_atomic(state(1), last)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def killed_halfway(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # what SIGINT during the write raises

    monkeypatch.setattr(ckpt.torch, "save", killed_halfway)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint_atomic(state(2), last)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


@pytest.mark.slow
def test_sigkill_at_random_moments_always_leaves_a_checkpoint_to_resume(tmp_path):
    """A child process saves checkpoints in a loop (8 MB each, so a kill often lands inside
    a write); it is SIGKILLed at seeded random moments. After each kill, last.ckpt loads and
    is the newest complete checkpoint or the one before."""
    script = (
        "import sys, torch\n"
        "from lcc.train.checkpoints import save_checkpoint_atomic\n"
        f"{inspect.getsource(state)}\n"
        "folder, start = sys.argv[1], int(sys.argv[2])\n"
        "for epoch in range(start, start + 1000):\n"
        "    save_checkpoint_atomic(state(epoch, size=2_000_000), folder + '/last.ckpt')\n"
        "    print(epoch, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random(0)
    start = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "checkpoints"), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert child.stdout is not None
        done = [int(child.stdout.readline())]  # one checkpoint written: now kill it somewhere
        time.sleep(rng.uniform(0.0, 0.3))
        child.kill()
        done += [int(line) for line in child.stdout.read().split()]
        child.wait()
        path, notes = find_resumable(tmp_path)
        assert notes == []
        assert path.name == "last.ckpt"
        assert epoch_of(path) in (done[-1], done[-1] + 1)  # + 1: renamed, not yet printed
        start = epoch_of(path) + 1
    assert start > 3
    assert len(temporaries(tmp_path / "checkpoints")) <= 2  # leftovers: cleaned by the next save


# --------------------------------------------------------------------------- write failures


def test_disk_full_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    last = tmp_path / "last.ckpt"
    save_checkpoint_atomic(state(0), last)
    save_checkpoint_atomic(state(1), last)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def disk_full(obj, handle):
        handle.write(b"PK\x03\x04 some bytes")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt.torch, "save", disk_full)
    with pytest.raises(LCCInputError) as caught:
        save_checkpoint_atomic(state(2), last)
    message = str(caught.value)
    assert "\n" not in message
    assert f"cannot write checkpoint {last}: no space left on device" in message
    assert "last.ckpt and previous.ckpt left as they were" in message
    assert "--resume" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_disk_full_at_fsync_is_caught_too(tmp_path, monkeypatch):
    last = save_checkpoint_atomic(state(0), tmp_path / "last.ckpt")
    before = last.read_bytes()

    def fsync(descriptor):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_module.os, "fsync", fsync)
    with pytest.raises(LCCInputError, match=r"no space left on device; last\.ckpt left as it was"):
        save_checkpoint_atomic(state(1), last)
    assert last.read_bytes() == before and temporaries(tmp_path) == []


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_read_only_directory_is_one_line(tmp_path, monkeypatch, code):
    """Simulated (root, which runs these tests here, ignores permission bits)."""
    last = save_checkpoint_atomic(state(0), tmp_path / "last.ckpt")
    before = last.read_bytes()

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(io_module.tempfile, "NamedTemporaryFile", refuse)
    with pytest.raises(LCCInputError) as caught:
        save_checkpoint_atomic(state(1), last)
    message = str(caught.value)
    assert f"{tmp_path} is not writable ({os.strerror(code)})" in message
    assert "last.ckpt left as it was" in message and "\n" not in message
    assert last.read_bytes() == before


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root ignores permissions")
def test_read_only_directory_for_real(tmp_path):
    last = save_checkpoint_atomic(state(0), tmp_path / "last.ckpt")
    before = last.read_bytes()
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(LCCInputError, match="is not writable"):
            save_checkpoint_atomic(state(1), last)
    finally:
        tmp_path.chmod(0o700)
    assert last.read_bytes() == before


def test_a_checkpoint_that_would_need_unpickling_is_never_written(tmp_path):
    last = save_checkpoint_atomic(state(0), tmp_path / "last.ckpt")
    before = last.read_bytes()
    bad = state(1) | {"hyper_parameters": Payload(tmp_path / "marker")}
    with pytest.raises(TypeError, match=r"weights-only loading refuses \(io\.open\)"):
        save_checkpoint_atomic(bad, last)
    assert last.read_bytes() == before and temporaries(tmp_path) == []
    assert not (tmp_path / "marker").exists()


# --------------------------------------------------------------------------- choosing a checkpoint


def _damage(path: Path, how: str, marker: Path) -> str:
    """Damage ``path``; returns the words the note must contain."""
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return "truncated"
    if how == "zero-byte":
        path.write_bytes(b"")
        return "empty file (0 bytes)"
    if how == "random-bytes":
        path.write_bytes(random.Random(1).randbytes(4096))
        return "not a file written by torch.save"
    if how == "malicious":
        torch.save(state(9) | {"x": Payload(marker)}, path)
        return "needs arbitrary unpickling (io.open), refused"
    if how == "malicious-pickle":
        path.write_bytes(pickle.dumps(state(9) | {"x": Payload(marker)}, protocol=2))
        return "needs arbitrary unpickling (io.open"
    if how == "inconsistent":
        torch.save(state(9) | {"global_step": 3}, path)
        return "global_step 3 but the loop state counts 40 optimiser steps"
    raise AssertionError(how)


DAMAGES = [
    "truncated",
    "zero-byte",
    "random-bytes",
    "malicious",
    "malicious-pickle",
    "inconsistent",
]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_last_falls_back_to_previous_with_one_note(tmp_path, how):
    folder = tmp_path / "checkpoints"
    for epoch in range(3):
        save_checkpoint_atomic(state(epoch), folder / "last.ckpt")
    marker = tmp_path / "marker"
    words = _damage(folder / "last.ckpt", how, marker)
    path, notes = find_resumable(tmp_path)
    assert path == folder / "previous.ckpt" and epoch_of(path) == 1
    assert len(notes) == 1 and "\n" not in notes[0]
    assert notes[0].startswith(f"checkpoint {folder / 'last.ckpt'} is unusable (")
    assert words in notes[0]
    # the checkpoint's 0-based epoch 1 is the second epoch: shown from 1, as on the console
    assert notes[0].endswith("resuming from previous.ckpt (epoch 2, step 8)")
    assert not marker.exists()


def test_all_damaged_is_one_line_naming_each_file(tmp_path):
    folder = tmp_path / "checkpoints"
    for epoch in range(2):
        save_checkpoint_atomic(state(epoch), folder / "last.ckpt")
    marker = tmp_path / "marker"
    _damage(folder / "last.ckpt", "malicious", marker)
    _damage(folder / "previous.ckpt", "zero-byte", marker)
    with pytest.raises(LCCInputError) as caught:
        find_resumable(tmp_path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"no usable checkpoint in {folder} (")
    assert "last.ckpt: needs arbitrary unpickling (io.open), refused" in message
    assert "previous.ckpt: empty file (0 bytes)" in message
    assert "remove that folder to start the run over" in message
    assert not marker.exists()


def test_no_checkpoint_names_what_it_looked_for(tmp_path):
    with pytest.raises(LCCInputError, match=r"no checkpoint to resume in .* \(looked for last"):
        find_resumable(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    assert checkpoint_candidates(tmp_path) == []


def test_the_newest_loadable_checkpoint_wins_whatever_its_name(tmp_path):
    folder = tmp_path / "checkpoints"
    for epoch in range(3):
        save_checkpoint_atomic(state(epoch), folder / "last.ckpt")
        save_checkpoint_atomic(state(epoch), folder / f"epoch={epoch}.ckpt")
    save_checkpoint_atomic(state(3), folder / "epoch=3.ckpt")  # killed before last.ckpt
    path, notes = find_resumable(tmp_path)
    assert (path.name, notes) == ("epoch=3.ckpt", [])
    _damage(folder / "epoch=3.ckpt", "truncated", tmp_path / "m")
    path, notes = find_resumable(tmp_path)
    assert path.name == "last.ckpt" and len(notes) == 1 and "epoch=3.ckpt" in notes[0]


def test_inspect_checks_the_training_counters(tmp_path):
    good = save_checkpoint_atomic(state(2), tmp_path / "good.ckpt")
    info = inspect_checkpoint(good)
    assert (info.epoch, info.global_step) == (2, 12)
    cases = {
        "epoch": (state(2) | {"epoch": 5}, "epoch 5 but the loop state has 2 completed epochs"),
        "negative": (state(2) | {"global_step": -1}, "must be non-negative integers"),
        "weights": (state(2) | {"state_dict": {}}, "no model weights"),
        "list": ([1, 2], "holds a list, not a training checkpoint"),
    }
    for name, (obj, words) in cases.items():
        torch.save(obj, tmp_path / f"{name}.ckpt")
        with pytest.raises(LCCInputError, match="is unusable") as caught:
            inspect_checkpoint(tmp_path / f"{name}.ckpt")
        assert words in str(caught.value), name


def test_the_plugin_loads_weights_only_even_when_asked_otherwise(tmp_path):
    plugin = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    plugin.save_checkpoint(state(0), path)
    assert plugin.load_checkpoint(path, weights_only=False)["epoch"] == 0
    marker = tmp_path / "marker"
    torch.save(state(1) | {"x": Payload(marker)}, path)
    with pytest.raises(LCCInputError, match="refusing to load checkpoint"):
        plugin.load_checkpoint(path, weights_only=False)
    assert not marker.exists()
    plugin.remove_checkpoint(path)
    plugin.remove_checkpoint(path)  # already gone: fine
    assert not path.exists()


# --------------------------------------------------------------------------- lcc's own checkpoints


@pytest.fixture(scope="module")
def lcc_run() -> Path:
    out = Path(tempfile.mkdtemp()) / "run"
    argv = ["train", "small-cnn", "digits", "--out", str(out), "--k", "3", "--source", "recorded"]
    argv += ["--subset", "200", "--test-subset", "100", "--epochs", "2", "--batch-size", "50"]
    assert main(argv) == 0
    yield out
    shutil.rmtree(out.parent, ignore_errors=True)


def test_lcc_train_checkpoints_load_weights_only(lcc_run):
    """The Lightning checkpoint lcc writes (loops, optimiser, scheduler, callbacks, the module's
    LCC state) loads with plain torch.load(weights_only=True)."""
    folder = lcc_run / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "previous.ckpt"]
    for name, epoch in (("last.ckpt", 1), ("previous.ckpt", 0)):
        loaded = torch.load(folder / name, map_location="cpu", weights_only=True)
        assert loaded["epoch"] == epoch
        assert {"state_dict", "loops", "optimizer_states", "lr_schedulers", "callbacks"} <= set(
            loaded
        )
        assert inspect_checkpoint(folder / name).epoch == epoch
    assert find_resumable(lcc_run) == (folder / "last.ckpt", [])


@pytest.mark.filterwarnings("ignore:.*treespec:FutureWarning")
@pytest.mark.filterwarnings("ignore:.*resuming from a checkpoint that ended before the epoch")
def test_a_mid_epoch_save_through_the_plugin_is_found_and_resumed(tmp_path):
    """What a graceful stop does: trainer.save_checkpoint(last.ckpt) in the middle of an epoch.
    find_resumable accepts it (its counters agree) and trainer.fit resumes from it."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(4, 2)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.layer(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class StopAt(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1 and batch_idx == 2:
                trainer.save_checkpoint(tmp_path / "checkpoints" / "last.ckpt")
                trainer.should_stop = True

    generator = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 4, generator=generator), torch.arange(32) % 2)
    common = {
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "plugins": [AtomicCheckpointIO()],
    }
    pl.Trainer(max_epochs=3, callbacks=[StopAt()], **common).fit(
        Tiny(), DataLoader(data, batch_size=4)
    )
    path, notes = find_resumable(tmp_path)
    info = inspect_checkpoint(path)
    assert (path.name, notes, info.epoch, info.global_step) == ("last.ckpt", [], 1, 8 + 3)
    trainer = pl.Trainer(max_epochs=2, **common)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4), ckpt_path=path)
    assert trainer.global_step == 16
