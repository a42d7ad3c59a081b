"""Issue 9 item 1 (and the artefact cases of item 12): a saved artefact is verified on load, never scored damaged."""

import json
import shutil

import pytest
import torch

from methods.base import ArtefactError, load_artefact
from methods.pca import PCAArtefact, PCAConfig
from methods.random_directions import RandomArtefact, RandomConfig


def _pca(K=3, d=8) -> PCAArtefact:
    g = torch.Generator().manual_seed(0)
    dirs = torch.linalg.qr(torch.randn(d, K, generator=g))[0].T.contiguous()
    return PCAArtefact(PCAConfig(k=K), {"directions": dirs, "center": torch.randn(d, generator=g),
                                        "explained_variance": torch.rand(K, generator=g)},
                       {"label": "pca", "model": "synthetic", "layer": 1})


def _random(K=3, d=8) -> RandomArtefact:
    return RandomArtefact(RandomConfig(k=K), {"directions": torch.eye(d)[:K], "center": torch.zeros(d)},
                          {"label": "random"})


def test_a_saved_artefact_loads_back_identical(tmp_path):
    art = _pca()
    back = load_artefact(art.save(tmp_path / "a"))
    assert all(torch.equal(back.tensors[k], v) for k, v in art.tensors.items()) and back.info == art.info
    cfg = json.loads((tmp_path / "a" / "cfg.json").read_text())
    assert len(cfg["tensors_sha256"]) == 64 and len(cfg["content_sha256"]) == 64
    assert not list((tmp_path / "a").glob("*.tmp"))


def test_flipped_bits_in_the_tensors_are_refused(tmp_path):
    path = _pca().save(tmp_path / "a")
    f = path / "artefact.safetensors"
    data = bytearray(f.read_bytes())
    data[-3] ^= 0x01  # one bit in the last float: the silent 0.2875 -> 0.300
    f.write_bytes(bytes(data))
    with pytest.raises(ArtefactError, match="artefact.safetensors is corrupted"):
        load_artefact(path)


def test_an_edited_cfg_json_is_refused(tmp_path):
    path = _pca().save(tmp_path / "a")
    cfg = json.loads((path / "cfg.json").read_text())
    cfg["info"]["layer"] = 2
    (path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtefactError, match="modified after saving"):
        load_artefact(path)


def test_another_methods_file_is_refused_by_name(tmp_path):
    """A random artefact's tensors under a PCA cfg.json (hashes made consistent): refused by tensor names."""
    pca_dir, rnd_dir = _pca().save(tmp_path / "pca"), _random().save(tmp_path / "rnd")
    shutil.copy(rnd_dir / "artefact.safetensors", pca_dir / "artefact.safetensors")
    cfg = json.loads((pca_dir / "cfg.json").read_text())
    rnd_cfg = json.loads((rnd_dir / "cfg.json").read_text())
    from methods.base import _content_sha256

    cfg["tensors_sha256"] = rnd_cfg["tensors_sha256"]
    cfg["content_sha256"] = _content_sha256({k: cfg[k] for k in ("method", "config", "info")}, cfg["tensors_sha256"])
    (pca_dir / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtefactError, match=r"not a pca artefact \(missing tensor\(s\) \['explained_variance'\]"):
        load_artefact(pca_dir)


def test_wrong_shapes_and_nan_are_refused_at_save(tmp_path):
    art = _pca()
    art.tensors["explained_variance"] = torch.rand(5)
    with pytest.raises(ArtefactError, match="'explained_variance' has shape \\[5\\]"):
        art.save(tmp_path / "a")
    art = _pca()
    art.tensors["directions"][1, 2] = float("nan")
    with pytest.raises(ArtefactError, match="'directions' holds 1 NaN/inf"):
        art.save(tmp_path / "b")
    assert not (tmp_path / "b" / "cfg.json").exists()


def test_a_nan_written_into_a_saved_file_is_refused_at_load(tmp_path, monkeypatch):
    """Even with consistent hashes (a build that diverged under an older version), NaN never reaches a metric."""
    art = _pca()
    monkeypatch.setattr(PCAArtefact, "check_tensors", classmethod(lambda cls, t, w: None))
    art.tensors["directions"][0, 0] = float("inf")
    path = art.save(tmp_path / "a")
    monkeypatch.undo()
    with pytest.raises(ArtefactError, match="'directions' holds 1 NaN/inf"):
        load_artefact(path)


@pytest.mark.parametrize("text, match", [
    ("[]", "holds a list"), ("{\"format_version\": 2, \"method\": \"pca\", \"config\": null}", "wrong type"),
    ("{\"format_version\": 2, \"config\": {}}", "'method'"), ("{\"format_ver", "is corrupted"),
    ("{\"format_version\": 1, \"method\": \"pca\", \"config\": {}, \"info\": {}}", "older versions"),
])
def test_a_malformed_cfg_json_gets_one_line_naming_it(tmp_path, text, match):
    path = _pca().save(tmp_path / "a")
    (path / "cfg.json").write_text(text)
    with pytest.raises(ArtefactError, match=match) as e:
        load_artefact(path)
    assert str(path / "cfg.json") in str(e.value) and "\n" not in str(e.value)


def test_a_missing_file_is_named(tmp_path):
    path = _pca().save(tmp_path / "a")
    (path / "artefact.safetensors").unlink()
    with pytest.raises(ArtefactError, match="artefact.safetensors is missing"):
        load_artefact(path)
