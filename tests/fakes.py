"""Fake dictionaries for metric tests: linear encoders with known directions (exact oracles for every metric)."""

from __future__ import annotations

import torch

from methods.base import Artefact, MethodConfig

LAYER = 2


class LinArtefact(Artefact):
    """Test dictionary: encode = (x - c) @ D^T (signed), decode = f @ D + c."""

    method = "lin-test"
    reconstructs = True
    readouts = ("signed",)

    @property
    def directions(self) -> torch.Tensor:
        return self.tensors["directions"]

    def encode(self, x, readout=None):
        return (self.check_input(x) - self.center.to(x)) @ self.directions.to(x).T

    def decode(self, f):
        return f @ self.directions.to(f) + self.center.to(f)


class IdentityArtefact(LinArtefact):
    method = "identity-test"

    def encode(self, x, readout=None):
        return x.clone()

    def decode(self, f):
        return f.clone()


class ZeroArtefact(IdentityArtefact):
    method = "zero-test"

    def decode(self, f):
        return torch.zeros_like(f)


def make(cls, dirs, layer=LAYER, center=None, **info):
    t = {"directions": torch.nn.functional.normalize(dirs.float(), dim=1)}
    if center is not None:
        t["center"] = center
    return cls(MethodConfig(), t, {"label": cls.method, "layer": layer, "model": "tiny-gemma2", **info})


def rand_dirs(K, d=64, seed=0):
    return torch.randn(K, d, generator=torch.Generator().manual_seed(seed))


def fake_gguf_build(monkeypatch) -> list:
    """Replace the (45 s) GGUF dequantisation by a deterministic small state; returns the list of builds made."""
    import bench.models as models

    calls = []

    def build(gguf_path, cdir):
        calls.append(cdir)
        g = torch.Generator().manual_seed(0)
        state = {"blocks.1.attn.W_Q": torch.randn(8, 16, generator=g), "embed.W_E": torch.randn(32, 16, generator=g)}
        models._write_weights_cache(cdir, state, models.tiny_gemma2_config(), {"gguf": str(gguf_path)},
                                    models.byte_tokenizer())

    monkeypatch.setattr(models, "_build_gguf_cache", build)
    return calls


def fake_hub_repo(hub, monkeypatch):
    """An empty offline Hugging Face cache at `hub` holding google/gemma-2-2b's folders; returns (repo, snapshot)."""
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(hub))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    repo_dir = hub / "models--google--gemma-2-2b"
    snap = repo_dir / "snapshots" / ("a" * 40)
    (repo_dir / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text("a" * 40)
    return repo_dir, snap
