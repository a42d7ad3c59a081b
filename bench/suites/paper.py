"""paper: the EP paper's setting. Gemma-2-2B / -it, layers 12 and 20, p = 1..10, Gemma Scope 16k canonical SAEs.

Needs the Gemma weights from the Hugging Face hub (licence accepted, token) and, realistically, a GPU. Offline it
fails in seconds with a message naming what is missing. The paper streams Pile-uncopyrighted (ctx 128); pass a
corpus you have, e.g. `hf:monology/pile-uncopyrighted` (set in `corpus` below) with network access.
"""

from bench.suites import MethodSpec, Suite

SUITE = Suite(
    name="paper",
    description="Gemma-2-2B and -it at the paper's layers and percentiles with Gemma Scope 16k canonical SAEs",
    models=["gemma-2-2b", "gemma-2-2b-it"],
    layers=[12, 20],
    methods=[
        MethodSpec("ep", {"percentiles": [1, 2, 4, 8, 10], "n_calib": 200_000, "batch_contexts": 128,
                          "sat_window": 1}),
        MethodSpec("sae", {"release": "gemma-scope-2b-pt-res-canonical", "sae_id": "layer_{layer}/width_16k/canonical",
                           "allow_model_mismatch": True}),
        MethodSpec("kmeans", {"k": [1024, 4096]}),
        MethodSpec("pca", {"k": 256}),
        MethodSpec("random", {"k": 16384}),
        MethodSpec("diffmean"),
    ],
    corpus="hf:monology/pile-uncopyrighted:train:text",
    store_tokens=16_000_000,
    concept_sets=["wordnet", "bbc"],
    prompt_sets=["capitals", "city_country", "city_continent", "first_letter"],
    ood_sets=["random_tokens", "shuffled_words", "code"],
    needs_hub=True,
)
