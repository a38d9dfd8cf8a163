"""A write that fails (a full disk, injected at the write layer or real on a small tmpfs; a
read-only or unwritable place) gives one line naming the path, leaves no partial output and
never touches the inputs."""
import errno
import os
import re

import pytest
import torch

from know_kernels.cli import main
from know_kernels.fileio import save_safetensors, write_json
from know_kernels.research.metatrain import MetaTrainConfig, TrainState, save_state

from support.checkpoints import wide_checkpoints
from support.mounts import fill, no_space_after, tmpfs
from support.processes import digests
from support.stores import synthetic_store

pytestmark = pytest.mark.usefixtures("one_thread")
NO_SPACE = "[Errno 28] No space left on device"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return [str(p) for p in wide_checkpoints(root, width=128)], root


def one_error_line(capsys, command: str) -> str:
    """The error: one line, the last (meta-train's progress bars may come before it)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", capsys.readouterr().err)   # tqdm's cursor moves
    lines = text.replace("\r", "\n").strip().splitlines()
    errors = [line for line in lines if line.startswith(f"know {command}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    assert "Traceback" not in "\n".join(lines)
    return errors[0]


@pytest.mark.parametrize("limit", [0, 5000, 60000])   # the header, early, late
def test_predict_on_a_full_disk(inputs, tmp_path, monkeypatch, capsys, limit):
    paths, root = inputs
    before = digests(root)
    out = tmp_path / "out"
    no_space_after(monkeypatch, limit)
    assert main(["predict", *paths, "--out", str(out), "--steps", "2", "--chunk-rows", "256",
                 "--quiet"]) == 2
    line = one_error_line(capsys, "predict")
    assert NO_SPACE in line and f"{out}/know_step" in line
    assert not out.exists()      # nothing partial, and not even the directory it made
    assert digests(root) == before


def test_a_real_full_disk(inputs, tmp_path, capsys):
    paths, root = inputs
    before = digests(root)
    with tmpfs(tmp_path / "small", "64k") as small:
        assert main(["predict", *paths, "--out", str(small / "out"), "--quiet"]) == 2
        assert NO_SPACE in one_error_line(capsys, "predict")
        assert list(small.iterdir()) == []
        assert digests(root) == before

        fill(small, 4096)
        for write, name in ((lambda p: save_safetensors({"w": torch.zeros(10000)}, p), "a.st"),
                            (lambda p: write_json(list(range(10000)), p), "b.json"),
                            (lambda p: save_state(TrainState(MetaTrainConfig(), done={"fc": {"w": torch.zeros(10000)}}), p),
                             "c.ckpt")):
            with pytest.raises(OSError) as caught:
                write(small / name)
            assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(small / name)
            assert sorted(p.name for p in small.iterdir()) == ["filler"]

        store = synthetic_store(tmp_path / "store", runs=4, rows=100)
        store_before = digests(store.root)
        assert main(["meta-train", str(store.root), "--out", str(small / "k.safetensors"),
                     "--epochs", "1", "--batch-size", "64"]) == 2
        line = one_error_line(capsys, "meta-train")
        assert NO_SPACE in line and str(small / "k.safetensors") in line
        assert sorted(p.name for p in small.iterdir()) == ["filler"]
        assert digests(store.root) == store_before


@pytest.fixture
def unwritable(tmp_path):
    """A directory nothing can be written into: a read-only tmpfs as root (who ignores
    permission bits), else one without write permission."""
    place = tmp_path / "ro"
    if os.geteuid() == 0:
        with tmpfs(place, readonly=True):
            yield place, "[Errno 30] Read-only file system"
    else:
        place.mkdir()
        place.chmod(0o555)
        yield place, "[Errno 13] Permission denied"
        place.chmod(0o755)


def test_unwritable_places(inputs, unwritable, tmp_path, capsys):
    paths, root = inputs
    place, why = unwritable
    before = digests(root)
    store = synthetic_store(tmp_path / "store", runs=4, rows=100)
    commands = {"predict": ["predict", *paths, "--out", str(place / "out"), "--quiet"],
                "meta-train": ["meta-train", str(store.root), "--out", str(place / "k.st")],
                "collect": ["collect", "--out", str(place / "store"), "--preset", "quick",
                            "--runs", "1", "--quiet"]}
    for command, argv in commands.items():
        assert main(argv) == 2
        line = one_error_line(capsys, command)
        assert why in line and f"'{place}/" in line, line
    assert list(place.iterdir()) == [] and digests(root) == before

    a_file = tmp_path / "file"
    a_file.write_text("keep")
    for out, message in ((a_file, f"output directory {a_file} is a file"),
                         (a_file / "out", f"Not a directory: '{a_file / 'out'}'")):
        assert main(["predict", *paths, "--out", str(out), "--quiet"]) == 2
        assert message in one_error_line(capsys, "predict")
    assert a_file.read_text() == "keep"
