"""smoke: a tiny random Gemma-2-architecture model, every method and metric family, seconds; runs in CI."""

from bench.suites import MethodSpec, Suite

SUITE = Suite(
    name="smoke",
    description="tiny random Gemma-2 model: exercises every method and metric family end to end (numbers meaningless)",
    models=["tiny-gemma2"],
    layers=[1, 2],
    methods=[
        MethodSpec("ep", {"percentiles": [2, 10], "n_calib": 2000, "batch_contexts": 8}),
        MethodSpec("sae", {"architecture": "topk", "width": 64, "k": 4, "training_tokens": 4096, "batch_rows": 256,
                           "buffer_rows": 512, "progress": False}),
        MethodSpec("kmeans", {"k": 16, "n_rows": 2000, "n_calib": 2000}),
        MethodSpec("pca", {"k": 8}),
        MethodSpec("random", {"k": 32}),
        MethodSpec("diffmean"),
        # budget-matched baselines: at each EP artefact's K, and an SAE on exactly the tokens EP streamed
        MethodSpec("kmeans", {"n_rows": 2000, "n_calib": 2000}, match="K", match_to=["ep"], rows_as_target=True),
        MethodSpec("sae", {"architecture": "topk", "k": 4, "training_tokens": 4096, "batch_rows": 256,
                           "buffer_rows": 512, "progress": False}, match="K", match_to=["ep"], k_per_width=1 / 16),
        MethodSpec("random", {"k": 32}, match="K", match_to=["ep", "sae", "kmeans", "pca"]),
        MethodSpec("sae", {"architecture": "topk", "k": 4, "training_tokens": 4096, "batch_rows": 256,
                           "buffer_rows": 512, "progress": False}, match="tokens", match_to=["ep"], match_p=[10]),
    ],
    store_tokens=6_000,
    ctx_len=64,
    concept_sets=["bbc"],
    concept_examples=6,
    # causal is left out: a random model answers no prompt, so there is nothing to intervene on (the causal
    # code path is tested on the tiny model in tests/test_causal.py and runs in the default suite)
    metrics=["build", "retrieval", "detection", "probing", "sparse_probing", "ood", "recon", "cost", "correspondence",
             "stability", "compositional"],
    prompt_sets=[],
    ood_sets=["random_tokens", "shuffled_words"],
    side_effect_texts=4,
)
