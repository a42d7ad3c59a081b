"""A cell of a suite's grid, the grid's cells, and a cell record's checksum: what the runner computes and writes,
the model context serves, and the verdicts read back.

Below both the runner and the model context (each imports this module, neither the other).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

from bench.suites import ALL_LAYERS, CROSS_LAYER_FAMILIES, MethodSpec, Suite, sae_spec


@dataclass(frozen=True)
class Cell:
    model: str
    layer: int  # ALL_LAYERS for cross-layer families
    spec: str  # MethodSpec.label
    family: str

    @property
    def id(self) -> str:
        layer = "all" if self.layer == ALL_LAYERS else f"L{self.layer:02d}"
        return re.sub(r"[^A-Za-z0-9_.=-]+", "_", f"{self.model}__{layer}__{self.spec}__{self.family}")


def expand_cells(suite: Suite) -> list[Cell]:
    """Every cell of the grid, method by method (in suite order): a spec's build cells, then its other families in
    suite order, each layer in turn, cross-layer families last. A run stopped part-way (hours of `full` on a CPU)
    thus holds whole methods, not every method's builds and none of their scores."""
    cells = []
    from bench.synth import family_applies

    for model in suite.models:
        for spec in suite.methods:
            for family in suite.metrics:
                if not _applies(spec, family, suite) or not family_applies(family, model)[0]:
                    continue  # nothing to measure (e.g. text families on a synthetic model, or the reverse)
                model_layers = suite.layers_for(model)
                spec_layers = spec.layers_of(model, model_layers)
                if family in CROSS_LAYER_FAMILIES:
                    if len(spec_layers) > 1:
                        cells.append(Cell(model, ALL_LAYERS, spec.label, family))
                    continue
                layers = model_layers
                if family in suite.family_layers:  # limited to a few layers: those the model has, else its middle one
                    layers = [L for L in suite.family_layers[family] if L in model_layers] or [
                        model_layers[len(model_layers) // 2]]
                cells.extend(Cell(model, layer, spec.label, family) for layer in layers if layer in spec_layers)
    order = {f: i for i, f in enumerate(suite.metrics)}
    specs = {s.label: i for i, s in enumerate(suite.methods)}
    return sorted(cells, key=lambda c: (suite.models.index(c.model), specs[c.spec], order[c.family] != 0,
                                        c.layer == ALL_LAYERS, order[c.family], c.layer))


def _applies(spec: MethodSpec, family: str, suite: Suite) -> bool:
    """Whether a family has anything to measure for a method (e.g. no loss recovered without a decoder)."""
    from methods.registry import get_method

    cls = get_method(spec.method)
    keep = suite.family_artefacts.get(family)
    if keep is not None and not any(k == spec.label or k.startswith((f"{spec.label}:", f"{spec.label}("))
                                    for k in keep):
        return False  # the suite scores none of this spec's artefacts on this family
    if family == "correspondence":
        # EP, and the chance level of its share: random directions and k-means built at EP's K
        null = spec.match == "K" and spec.method in ("random", "kmeans") and any(
            s.method == "ep" for s in suite.methods if s.label in spec.match_to)
        return (spec.method == "ep" or null) and sae_spec(suite) is not None
    if family == "recon":
        return bool(cls.artefact_cls.reconstructs)
    if family == "causal":
        return bool(suite.prompt_sets)  # DiffMean is refitted on the causal train prompts (metrics.causal)
    if family == "stability":
        return not cls.supervised  # DiffMean's features are the concepts themselves at every layer
    if family == "refusal":
        return not cls.supervised
    return True


CELL_SHA256 = "sha256"  # a cell record's own checksum: sha256 of its canonical JSON without this key


def cell_sha256(record: dict[str, Any]) -> str:
    """sha256 of a cell record's canonical JSON (sorted keys, no whitespace), its own checksum key left out."""
    body = {k: v for k, v in record.items() if k != CELL_SHA256}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


def cell_problem(rec: Any) -> str:
    """"" for a well-formed cell record whose checksum matches (or that has none: legacy), else what is wrong."""
    if not (isinstance(rec, dict) and isinstance(rec.get("rows"), list) and rec["rows"] and "cell_id" in rec):
        return "has no rows or no cell_id"
    if CELL_SHA256 in rec and rec[CELL_SHA256] != cell_sha256(rec):
        return "is damaged (its sha256 does not match its content)"
    return ""
