"""Issue 9 items 8, 9, 10, 12, 13, 15 at the command line: flags honoured or refused, one-line errors naming the
path and the fix, generated per-method help, hf: corpora usable through --max-docs."""

import errno
import json
import sys
import types
from pathlib import Path

import pytest
import torch

from bench.cli import _folder_name, main, os_error_line, stop_time

DOCS = [f"line {i} about topic {i % 7} and a few more words " * 4 for i in range(120)]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t}) for t in DOCS) + "\n")
    return f"jsonl:{p}"


def _extract(corpus, *extra):
    return main(["extract", "--model", "tiny-gemma2", "--layers", "1", "--corpus", corpus, "--ctx-len", "32",
                 "--quiet", *extra])


@pytest.mark.parametrize("argv", [["extract", "--layers", "1", "--tokens", "0"],
                                  ["score", "--layer", "1", "--tokens", "0"],
                                  ["build", "--method", "pca", "--layer", "1", "--tokens", "0"]])
def test_tokens_0_is_refused_not_replaced_by_a_default(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and "must be a positive integer, got 0" in capsys.readouterr().err


def test_build_honours_store_flags_instead_of_reusing_any_store(env, capsys):
    assert _extract(env, "--tokens", "3000") == 0
    capsys.readouterr()
    build = ["build", "--method", "pca", "--k", "4", "--model", "tiny-gemma2", "--layer", "1", "--corpus", env]
    assert main(build) == 0  # no store flag given: the existing store serves
    assert "(3" in capsys.readouterr().out.split("store ", 1)[1].split("tokens")[0]
    assert main(build + ["--tokens", "1500", "--ctx-len", "32"]) == 0  # given flags must hold for the store used
    out = capsys.readouterr().out
    n_tokens = int(out.split("store ", 1)[1].split("(")[1].split()[0])
    assert 1500 <= n_tokens < 1600


def test_build_method_help_lists_the_methods_options_with_their_meaning(capsys):
    assert main(["build", "--method", "ep", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--percentiles" in out and "--calib-estimator" in out and "--layer" in out
    assert "calibration rows" in out  # EPConfig.n_calib's documented meaning
    assert main(["build", "--help"]) == 0 and "--method" in capsys.readouterr().out


def test_a_mistyped_method_parameter_gets_one_line(env, capsys):
    with pytest.raises(SystemExit) as e:
        main(["build", "--method", "pca", "--k", "2.5", "--model", "tiny-gemma2", "--layer", "1", "--corpus", env])
    assert e.value.code == 2 and "invalid int value: '2.5'" in capsys.readouterr().err
    assert main(["run", "--suite", "smoke", "--method", "pca:k=2.5", "--metrics", "build", "--layers", "1",
                 "--results-dir", str(Path(env[6:]).parent / "r"), "--no-report"]) == 2
    assert "PCAConfig: k=2.5 is not of type int" in capsys.readouterr().err
    from methods.pca import PCAConfig

    with pytest.raises(ValueError, match=r"PCAConfig: k=2.5 is not of type int; components kept"):
        PCAConfig.from_dict({"k": 2.5})


def test_hf_corpus_works_from_the_cli_with_max_docs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, split, streaming: iter([{"text": t} for t in DOCS])  # noqa: ARG005
    monkeypatch.setitem(sys.modules, "datasets", fake)
    assert _extract("hf:someone/corpus", "--tokens", "600") == 2
    assert "--max-docs N" in capsys.readouterr().err
    assert _extract("hf:someone/corpus", "--tokens", "600", "--max-docs", "30") == 0
    (manifest,) = (tmp_path / "cache" / "stores").glob("*/manifest.json")
    m = json.loads(manifest.read_text())
    assert m["corpus"]["n_docs"] == 30 and m["corpus"]["params"]["max_docs"] == 30


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_device_cuda_on_a_cpu_torch_is_one_line(env, capsys):
    assert _extract(env, "--device", "cuda") == 2
    err = capsys.readouterr().err.strip()
    assert "use --device cpu" in err and "\n" not in err


def test_ctx_len_beyond_the_models_context_is_one_line(env, capsys):
    assert _extract(env, "--ctx-len", "300") == 2
    assert "exceeds the context of tiny-gemma2 (256 tokens); use --ctx-len 256" in capsys.readouterr().err


def test_non_utf8_jsonl_names_the_file_and_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("EPBENCH_CACHE", str(tmp_path / "cache"))
    p = tmp_path / "bad.jsonl"
    p.write_bytes(b'{"text": "fine"}\n{"text": "caf\xe9"}\n')
    assert _extract(f"jsonl:{p}") == 2
    assert f"{p}:2: not valid UTF-8" in capsys.readouterr().err


def test_disk_full_during_extract_is_one_line_leaves_no_temp_and_resumes(env, monkeypatch, capsys, tmp_path):
    import safetensors.torch
    from safetensors import SafetensorError

    real, calls = safetensors.torch.save_file, []

    def full(tensors, path):  # what safetensors raises on a real full disk (its own error type, not an OSError);
        calls.append(path)  # the real fault on a real tmpfs is in test_reliability_integrity.py
        if len(calls) == 3:  # after two shard files landed
            Path(path).write_bytes(b"partial")
            raise SafetensorError(f"Error while serializing: I/O error: No space left on device "
                                  f"(os error {errno.ENOSPC})")
        return real(tensors, path)

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert _extract(env, "--tokens", "9000") == 1  # a runtime failure, not a usage error
    err = capsys.readouterr().err.strip()
    assert "No space left on device; free disk space, then rerun the same command" in err and "\n" not in err
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    assert _extract(env, "--tokens", "9000") == 0


def test_an_unwritable_results_dir_is_one_line(env, monkeypatch, capsys, tmp_path):
    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    assert main(["run", "--suite", "smoke", "--results-dir", str(tmp_path / "ro"), "--no-report"]) == 1
    assert "Permission denied; that location is not writable" in capsys.readouterr().err
    assert "EROFS" not in os_error_line(OSError(errno.EROFS, "Read-only file system", "/x"))


def test_a_corrupt_run_json_does_not_break_report_for_other_runs(tmp_path, capsys):
    import pandas as pd

    from metrics.common import MetricRow

    row = MetricRow(method="pca", method_config="{}", model="m", layer=1, metric="retrieval.purity@10",
                    value=0.5).to_dict()
    for name in ("good", "bad"):
        d = tmp_path / name
        d.mkdir()
        pd.DataFrame([row]).to_csv(d / "rows.csv", index=False)
        (d / "run.json").write_text(json.dumps({"run_id": name, "started": "2026-01-01T00:00:00Z"}))
    (tmp_path / "bad" / "run.json").write_text('{"run_id": "bad", "sta')
    from bench.report import list_runs

    assert {d.name for d in list_runs(tmp_path)} == {"good", "bad"}
    assert f"{tmp_path / 'bad' / 'run.json'} is unreadable" in capsys.readouterr().out
    assert main(["report", "bad", "--results-dir", str(tmp_path)]) == 1  # runtime: the file is damaged
    err = capsys.readouterr().err
    assert f"{tmp_path / 'bad' / 'run.json'} is corrupted" in err and "\n" not in err.strip()


def test_artefact_folder_names_never_nest_or_grow_with_paths():
    name = _folder_name("diffmean[axbench:/very/long/absolute/path/to/concept500/prod_2b_l20_v1]")
    assert "/" not in name and len(name) <= 60
    assert _folder_name("ep:p=2") == "ep_p2"
    assert _folder_name("x" * 80) != _folder_name("x" * 79 + "y")


def test_build_with_an_absolute_concept_path_writes_one_flat_folder(env, tmp_path, monkeypatch, capsys):
    """`--concepts axbench:/abs/path` used to nest the output folder along the data path."""
    from bench.context import ModelContext
    from methods.diffmean import DiffMeanArtefact, DiffMeanConfig

    label = f"diffmean[axbench:{tmp_path}/a/b/prod_2b_l20_v1]"
    art = DiffMeanArtefact(DiffMeanConfig(), {"directions": torch.eye(64)[:2], "diff_norms": torch.ones(2)},
                           {"label": label, "concepts": ["a", "b"]})
    monkeypatch.setattr(ModelContext, "build", lambda self, spec, fits_dir=None: {1: [art]})
    out = tmp_path / "arts"
    assert main(["build", "--method", "diffmean", "--model", "tiny-gemma2", "--layer", "1", "--corpus", env,
                 "--tokens", "600", "--ctx-len", "32", "--out", str(out)]) == 0
    (cfg,) = out.rglob("cfg.json")
    assert cfg.parent.parent == out / "tiny-gemma2" / "L01" and len(cfg.parent.name) <= 60


def test_disk_full_during_a_run_is_one_line_and_the_rerun_resumes(env, monkeypatch, capsys, tmp_path):
    import bench.cache

    real, written = bench.cache.atomic_write_text, []

    def full(path, text):
        if Path(path).parent.name == "cells" and written:  # the second cell finds the disk full
            tmp = Path(path).with_name(f".{Path(path).name}.x.tmp")
            tmp.write_text(text[:10])
            tmp.unlink()  # what atomic_write_text does on failure
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        if Path(path).parent.name == "cells":
            written.append(path)
        return real(path, text)

    monkeypatch.setattr(bench.cache, "atomic_write_text", full)
    argv = ["run", "--suite", "smoke", "--layers", "1", "--method", "pca", "--metrics", "build", "retrieval",
            "--results-dir", str(tmp_path / "r"), "--run-id", "x", "--no-report"]
    assert main(argv) == 1
    (line,) = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("epbench: error:")]
    assert "cells/" in line and "No space left on device; free disk space" in line  # progress bars aside
    cells = tmp_path / "r" / "x" / "cells"
    assert len(list(cells.glob("*.json"))) == 1 and not list(cells.glob("*.tmp"))
    monkeypatch.setattr(bench.cache, "atomic_write_text", real)
    assert main(argv) == 0 and "1 already finished" in capsys.readouterr().out


def test_stop_after_reads_durations_and_clock_times_and_refuses_the_past(capsys):
    import argparse
    import datetime

    now = datetime.datetime(2026, 12, 2, 13, 0, tzinfo=datetime.UTC).timestamp()
    assert stop_time("90m", now) == now + 5400 and stop_time("2.5h", now) == now + 9000
    assert stop_time("45s", now) == now + 45
    assert stop_time("2026-12-02T16:00Z", now) == now + 3 * 3600
    assert stop_time("2026-12-02T17:00+01:00", now) == now + 3 * 3600
    for bad, why in (("soon", "neither a duration"), ("0m", "neither a duration"),
                     ("2026-12-02T12:00Z", "in the past")):
        with pytest.raises(argparse.ArgumentTypeError, match=why):
            stop_time(bad, now)
    with pytest.raises(SystemExit) as e:
        main(["run", "--suite", "smoke", "--stop-after", "yesterday"])
    assert e.value.code == 2 and "neither a duration" in capsys.readouterr().err
