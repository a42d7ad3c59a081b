"""The plugin guide's promises: the Artefact contract check (bench.plugin_contract) against a good toy plugin, the
README's example plugin and broken ones; `pytest bench/ --method NAME` running it; and the method-string syntax
(paths, budget-matched specs) a plugin author writes on the command line."""

import importlib.util
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from bench.plugin_contract import ContractError, assert_contract, check_method
from bench.plugin_contract import test_plugin_contract as contract_test_function
from bench.suites import MethodSpec, get_suite
from methods.base import Artefact, Method, MethodConfig
from methods.common import BuildMeter, base_info, stream_rows, tokens_behind

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_SRC = ROOT / "examples" / "epbench-example-plugin"


# ---------------------------------------------------------------------------------------------------------
# A good toy plugin: top-k principal-ish directions (the first k rows, orthonormalised), with a decoder


@dataclass
class ToyConfig(MethodConfig):
    k: int = 4  # directions


class ToyArtefact(Artefact):
    method, config_cls, reconstructs = "toy_good", ToyConfig, True
    readouts = ("projection", "binary")
    tensor_shapes = {"directions": ("K", "d"), "center": ("d",)}
    directions = property(lambda self: self.tensors["directions"])

    def encode(self, x, readout=None):
        f = (self.check_input(x) - self.center) @ self.directions.T
        if readout == "binary":
            return torch.zeros_like(f).scatter_(1, f.argmax(1, keepdim=True), 1.0)
        return f

    def decode(self, f):
        return f @ self.directions + self.center


class ToyGood(Method):
    name, config_cls, artefact_cls = "toy_good", ToyConfig, ToyArtefact
    size_param = "k"

    def fit(self, store, layer, concepts=None):
        with BuildMeter() as meter:
            x, ctx = next(stream_rows(store, layer))
            c = x.mean(0)
            q = torch.linalg.qr((x[: self.config.k] - c).T)[0].T.contiguous()  # [k, d] orthonormal rows
        cost = meter.cost(rows=len(x), tokens=tokens_behind(ctx), flops=2.0 * x.numel())
        return self.artefact_cls(self.config, {"directions": q, "center": c}, base_info(store, layer, self.name, cost))


def _variant(name, **overrides):
    """A broken copy of the toy plugin: `overrides` replace artefact (art_*) or method attributes."""
    art = type(f"{name}Artefact", (ToyArtefact,), {"method": name, **{k[4:]: v for k, v in overrides.items()
                                                                       if k.startswith("art_")}})
    return type(name, (ToyGood,), {"name": name, "artefact_cls": art,
                                   **{k: v for k, v in overrides.items() if not k.startswith("art_")}})


def _free_fit(self, store, layer, concepts=None):  # the README's example plugin before its fix: a zero cost
    art = ToyGood.fit(self, store, layer)
    art.info["cost"] = {k: 0 for k in ("rows", "tokens", "flops", "wall_seconds", "peak_memory_bytes")}
    return type(self).artefact_cls(art.config, art.tensors, art.info)


def _unnormalised_fit(self, store, layer, concepts=None):
    art = ToyGood.fit(self, store, layer)
    art.tensors["directions"] = art.tensors["directions"] * 3.0
    return type(self).artefact_cls(art.config, art.tensors, art.info)


def _stateful_fit(self, store, layer, concepts=None):  # state outside self.tensors: lost on save/load
    art = ToyGood.fit(self, store, layer)
    art = type(self).artefact_cls(art.config, art.tensors, art.info)
    art.scale = 2.0
    return art


def test_good_plugin_passes_and_says_which_families_it_joins():
    r = assert_contract(ToyGood)
    assert r.ok and r.K == 4 and not r.problems
    assert r.cost["rows"] > 0 and r.cost["tokens"] > r.cost["rows"] and r.cost["wall_seconds"] > 0
    fam = {f: (j, why) for f, j, why in r.families}
    for f in ("build", "retrieval", "detection", "probing", "ood", "causal", "recon", "cost", "stability"):
        assert fam[f][0], f
    assert "binary" in fam["probing"][1]
    assert not fam["correspondence"][0] and "EP" in fam["correspondence"][1]
    assert fam["matching (@K)"] == (True, "`toy_good@K:match_to=ep` sets `k` to each target's K")
    text = r.format()
    assert "contract of toy_good" in text and "OK" in text and "recon" in text
    assert any("explained variance" in n for n in r.notes)


def test_families_follow_the_runners_rules():
    no_decode = _variant("toy_nodecode", art_reconstructs=False, art_decode=Artefact.decode)
    r = check_method(no_decode)
    fam = {f: (j, why) for f, j, why in r.families}
    assert r.ok and not fam["recon"][0] and "reconstructs" in fam["recon"][1]
    supervised = _variant("toy_sup", supervised=True, art_supervised=True)
    fam = {f: (j, why) for f, j, why in check_method(supervised).families}
    assert not fam["stability"][0] and not fam["refusal"][0] and not fam["causal"][0]
    assert "DiffMean" in fam["causal"][1]
    no_size = _variant("toy_nosize", size_param=None)
    assert {f: j for f, j, _ in check_method(no_size).families}["matching (@K)"] is False


@pytest.mark.parametrize("plugin, expected", [
    (_variant("toy_free", fit=_free_fit), "cost is all zeros"),
    (_variant("toy_norm", fit=_unnormalised_fit), "not unit-norm"),
    (_variant("toy_shape", art_encode=lambda self, x, readout=None: ToyArtefact.encode(self, x, readout).T),
     "must return [N, K]"),
    (_variant("toy_state", fit=_stateful_fit,
              art_encode=lambda self, x, readout=None: getattr(self, "scale", 1.0) * ToyArtefact.encode(self, x, readout)),
     "save/load round trip differs in encode"),
    (_variant("toy_nodec", art_decode=Artefact.decode), "reconstructs is True but decode"),
    (_variant("toy_name", art_method="something_else"), "set it to 'toy_name'"),
    (_variant("toy_sup2", supervised=True), "the runner reads the method's"),
    (_variant("toy_size", size_param="width"), "size_param 'width' is not a field"),
])
def test_broken_plugins_fail_with_a_clear_message(plugin, expected):
    r = check_method(plugin)
    assert not r.ok and any(expected in p for p in r.problems), r.problems
    with pytest.raises(ContractError, match="BROKEN"):
        assert_contract(plugin)


def test_zero_tokens_and_seconds_are_named():
    def fit(self, store, layer, concepts=None):
        art = ToyGood.fit(self, store, layer)
        art.info["cost"] = {**art.info["cost"], "tokens": 0, "wall_seconds": 0.0}
        return type(self).artefact_cls(art.config, art.tensors, art.info)

    r = check_method(_variant("toy_half", fit=fit))
    assert any("tokens = 0, wall_seconds = 0" in p and "free" in p for p in r.problems)


def test_fit_failure_and_unknown_names_are_problems_not_crashes():
    def fit(self, store, layer, concepts=None):
        raise ValueError("k exceeds the rows")

    r = check_method(_variant("toy_fail", fit=fit))
    assert not r.ok and "fit failed on the toy store" in r.problems[0] and "--method 'toy_fail:key=value'" in r.problems[0]
    r = check_method("no_such_method_anywhere")
    assert not r.ok and "cannot resolve" in r.problems[0]
    r = check_method(ToyGood, params={"nope": 1})
    assert not r.ok and "not fields of ToyConfig" in r.problems[0]


def test_builtin_methods_pass_the_contract():
    for spec in ("pca:k=8", "random:k=8", "kmeans:k=8,n_rows=2000,n_calib=2000"):
        r = check_method(spec)
        assert r.ok, r.format()


def _example_plugin():
    spec = importlib.util.spec_from_file_location("epbench_example_plugin_src", PLUGIN_SRC / "epbench_example_plugin.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.MeanDirection


def test_the_readme_example_plugin_passes_with_a_non_zero_cost_row():
    r = assert_contract(_example_plugin())
    assert r.cost["rows"] == 2048 and r.cost["tokens"] == 2048 + 64  # rows + one BOS per context
    assert r.cost["wall_seconds"] > 0 and r.cost["flops"] > 0
    readme = (ROOT / "README.md").read_text()
    code = (PLUGIN_SRC / "epbench_example_plugin.py").read_text()
    assert code.split('"""', 2)[2].strip() in readme  # the README shows the example exactly as shipped


def test_the_pytest_entry_point_fails_with_the_report():
    reports = []
    with pytest.raises(pytest.fail.Exception, match="cost is all zeros"):
        contract_test_function(_variant("toy_free2", fit=_free_fit), reports, None)
    assert reports and not reports[0][1].ok


@pytest.fixture(scope="module")
def installed_example(tmp_path_factory):
    """The example plugin pip-installed (offline, from a copy) into a --target folder."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed: the offline plugin build needs it")
    tmp = tmp_path_factory.mktemp("plugin")
    src, site = tmp / "src", tmp / "site"
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                           "--no-index", "--disable-pip-version-check", "--target", str(site), str(src)],
                          capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr
    return site


def test_pytest_bench_method_name_runs_the_contract(installed_example):
    env = {"PYTHONPATH": str(installed_example), "HF_HUB_OFFLINE": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "bench/", "--method",
                           "mean_direction", "-k", "contract"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "epbench plugin contract" in out and "contract of mean_direction" in out and "1 passed" in out
    assert "recon           no" in out and "tokens 2112" in out


# ---------------------------------------------------------------------------------------------------------
# Method strings: paths stay strings, budget-matched specs parse into MethodSpec fields


def test_paths_and_templates_in_method_strings_stay_strings():
    assert MethodSpec.parse("sae:path=/x/y_L{layer}").params == {"path": "/x/y_L{layer}"}
    assert MethodSpec.parse("sae:path=data/saes/l8").params == {"path": "data/saes/l8"}  # the key is `path`
    assert MethodSpec.parse("sae:path=./saes/l8,k=16").params == {"path": "./saes/l8", "k": 16}
    assert MethodSpec.parse("myplug:weights_dir=~/w/a").params == {"weights_dir": "~/w/a"}
    assert MethodSpec.parse("sae:release=r,sae_id=layer_{layer}/width_16k/canonical").params == {
        "release": "r", "sae_id": "layer_{layer}/width_16k/canonical"}
    assert MethodSpec.parse("ep:p=1/2/4").params == {"percentiles": [1, 2, 4]}  # lists keep working
    assert MethodSpec.parse("kmeans:k=16/64").params == {"k": [16, 64]}


def test_matched_spec_strings_parse_into_spec_fields():
    s = MethodSpec.parse("kmeans@K:match_to=ep")
    assert (s.method, s.match, s.match_to, s.params, s.label) == ("kmeans", "K", ["ep"], {}, "kmeans@K")
    s = MethodSpec.parse("sae@K:match_to=ep,match_p=1/2,k_per_width=1/64,seeds=0/1/2,lr=0.001")
    assert (s.match, s.match_to, s.match_p, s.k_per_width, s.seeds) == ("K", ["ep"], [1, 2], 1 / 64, [0, 1, 2])
    assert s.params == {"lr": 0.001} and s.label == "sae@K:lr=0.001"
    s = MethodSpec.parse("kmeans@K:match_to=ep/pca,rows_as_target=true,label=km-matched")
    assert s.match_to == ["ep", "pca"] and s.rows_as_target and s.label == "km-matched"
    s = MethodSpec.parse("sae@tokens:match_to=ep,match_p=10")
    assert s.match == "tokens" and s.match_p == [10] and s.label == "sae@tokens"
    assert MethodSpec.parse("kmeans:k=64,seeds=0/1").seeds == [0, 1]
    for bad, msg in (("kmeans@K", "name it with match_to"), ("kmeans@Q:match_to=ep", "not a budget"),
                     ("kmeans:match=K,match_to=ep", "goes after the name"),
                     ("kmeans:match_to=ep", "budget-matched spec"), ("sae@K:match_to=ep,k_per_width=x", "fraction"),
                     ("kmeans:seeds=a/b", "numbers"), ("kmeans@K:match_to=ep,rows_as_target=2", "true or false")):
        with pytest.raises(ValueError, match=msg):
            MethodSpec.parse(bad)


@pytest.mark.parametrize("suite", ["smoke", "default", "full", "paper", "synth", "synth16k"])
def test_every_suite_spec_round_trips_through_its_method_string(suite):
    for spec in get_suite(suite).methods:
        text = spec.to_text()
        assert MethodSpec.parse(text) == spec, text


def test_narrowed_suite_with_a_matched_spec_string_expands_the_matched_cells():
    from bench.cells import expand_cells
    from bench.cli import narrow_suite

    suite = narrow_suite(get_suite("default"), layers=[8], methods=["ep", "kmeans@K:match_to=ep,rows_as_target=true"],
                         metrics=["build", "detection", "correspondence"])
    spec = next(s for s in suite.methods if s.method == "kmeans")
    assert (spec.label, spec.match, spec.match_to, spec.rows_as_target) == ("kmeans@K", "K", ["ep"], True)
    cells = expand_cells(suite)
    assert {(c.spec, c.family) for c in cells if c.spec == "kmeans@K"} == {("kmeans@K", "build"),
                                                                         ("kmeans@K", "detection")}
    # the verdict plan's primary baseline label is the matched spec's label
    assert "kmeans@K" in suite.verdicts.primary_baselines
    with pytest.raises(ValueError, match="match_to"):  # a target not in the narrowed suite is named
        narrow_suite(get_suite("default"), methods=["pca", "kmeans@K:match_to=ep"])


def test_at_layers_has_a_method_string():
    spec = MethodSpec.parse("sae@K:match_to=ep,match_p=1,at_layers=smollm2-135m:12/gemma-3-270m:9/gemma-3-270m:12")
    assert spec.at_layers == {"smollm2-135m": [12], "gemma-3-270m": [9, 12]}
    assert MethodSpec.parse(spec.to_text()) == spec
    with pytest.raises(ValueError, match="at_layers takes model:layer pairs"):
        MethodSpec.parse("pca:at_layers=smollm2-135m")
