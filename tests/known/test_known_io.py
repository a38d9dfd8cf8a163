import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from know_kernels import KNOWN, KNOWNHead

from support import spec_numpy
from support.spec_numpy import random_layers


@pytest.mark.parametrize("nested", [False, True])
def test_keras_import_reproduces_keras_model(tmp_path, nested):
    files = {}
    layers = {}
    for i, name in enumerate(("conv", "fc", "bias")):
        layers[name] = random_layers(seed=i)
        files[name] = tmp_path / f"KNOWN_{name}.h5"
        spec_numpy.write_keras_h5(files[name], layers[name], nested=nested)
    known = KNOWN.from_keras_h5(**files, norm="raw")
    x = np.random.default_rng(7).normal(0, 0.2, (64, 5))
    for name in ("conv", "fc", "bias"):
        head = known[name]
        assert head.S == 5 and head.norm == "raw"
        f32 = [(k.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64))
               for k, b in layers[name]]
        want = spec_numpy.keras_head(x, f32)
        got = head.double().residual(torch.from_numpy(x)).detach().numpy()
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    assert known.provenance["source"] == "keras-h5"


def test_keras_import_names_missing_layer(tmp_path):
    path = tmp_path / "broken.h5"
    spec_numpy.write_keras_h5(path, random_layers(), drop="dense_7")
    with pytest.raises(ValueError, match=r"dense_7.*stream d: Wd"):
        KNOWN.from_keras_h5(conv=path)


def test_keras_import_refuses_non_hdf5(tmp_path):
    path = tmp_path / "not.h5"
    path.write_bytes(b"hello")
    with pytest.raises(ValueError, match="not an HDF5 file"):
        KNOWN.from_keras_h5(fc=path)
    with pytest.raises(FileNotFoundError):
        KNOWN.from_keras_h5(fc=tmp_path / "absent.h5")
    with pytest.raises(ValueError, match="at least one"):
        KNOWN.from_keras_h5()


def test_keras_import_checks_stream_widths(tmp_path):
    layers = random_layers()
    layers[6] = (np.zeros((2, 64)), layers[6][1])
    path = tmp_path / "bad_width.h5"
    spec_numpy.write_keras_h5(path, layers)
    with pytest.raises(ValueError, match="stream d takes 2"):
        KNOWN.from_keras_h5(bias=path)


def test_save_load_round_trip(tmp_path):
    known = KNOWN({"conv": KNOWNHead(5, "wnn", seed=1), "fc": KNOWNHead(4, "raw", seed=2)},
                  provenance={"note": "test"})
    path = tmp_path / "k.safetensors"
    known.save(path)
    back = KNOWN.load(path)
    assert list(back) == ["conv", "fc"] and "bias" not in back
    assert back["fc"].S == 4 and back["fc"].norm == "raw" and back["conv"].norm == "wnn"
    assert back.provenance == {"note": "test"}
    for name in ("conv", "fc"):
        for k, v in known[name].params_dict().items():
            assert torch.equal(v, back[name].params_dict()[k]), k
    with pytest.raises(KeyError, match="no 'bias' head"):
        back["bias"]


def test_load_refuses_foreign_files(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(2)}, str(plain))
    with pytest.raises(ValueError, match="no 'know' metadata"):
        KNOWN.load(plain)
    wrong = tmp_path / "wrong.safetensors"
    meta = {"format": "other/9", "heads": {}}
    save_file({"a": torch.zeros(2)}, str(wrong), metadata={"know": json.dumps(meta)})
    with pytest.raises(ValueError, match="format"):
        KNOWN.load(wrong)
    missing = tmp_path / "missing.safetensors"
    meta = {"format": "know-kernels/1", "heads": {"conv": {"S": 5, "norm": "wnn"}}}
    save_file({"conv.x.w1": torch.zeros(5, 64)}, str(missing), metadata={"know": json.dumps(meta)})
    with pytest.raises(ValueError, match="missing"):
        KNOWN.load(missing)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 10)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        KNOWN.load(garbage)


def test_known_rejects_unknown_head_names():
    with pytest.raises(ValueError, match="unknown head"):
        KNOWN({"attention": KNOWNHead()})


def test_init_is_seeded():
    a, b = KNOWN.init(seed=3), KNOWN.init(seed=3)
    assert all(torch.equal(a["conv"].params_dict()[k], v) for k, v in b["conv"].params_dict().items())
    assert not torch.equal(a["conv"].x.w1, a["fc"].x.w1)


def test_pretrained_missing_file_is_a_clear_error(monkeypatch, tmp_path):
    from know_kernels.known import heads
    monkeypatch.setattr(heads, "WEIGHTS_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="shipped KNOWN weights are missing"):
        heads.KNOWN.pretrained()


def test_saved_files_get_the_default_mode_not_the_temp_files(tmp_path):
    # Outputs go through a private temporary file; the final file must be readable by
    # whoever could read any other new file (the shipped weights once were 0600).
    from know_kernels.fileio import _UMASK
    path = tmp_path / "k.safetensors"
    KNOWN.init().save(path)
    assert path.stat().st_mode & 0o777 == 0o666 & ~_UMASK


@pytest.mark.parametrize("S", [3, 4, 5])
def test_pretrained_ships_every_window_length(S):
    known = KNOWN.pretrained(S=S)
    assert set(known) == {"conv", "fc", "bias"}
    assert all(head.S == S for _, head in known.items())
    assert known.provenance["config"]["S"] == S


def test_pretrained_default_is_s5_and_other_lengths_are_refused():
    assert KNOWN.pretrained().provenance == KNOWN.pretrained(S=5).provenance
    for S in (2, 6, True):
        with pytest.raises(ValueError, match=r"ships KNOWN for S in \(3, 4, 5\)"):
            KNOWN.pretrained(S=S)
