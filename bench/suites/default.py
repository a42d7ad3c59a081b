"""default: the main job. The embedded model, every method family and metric family, three layers, CPU."""

from bench.suites import MethodSpec, Suite

SUITE = Suite(
    name="default",
    description=("SmolLM2-135M-Instruct (embedded), layers 4/8/12, EP at p = 1, 2, 4, 8, 10 against a TopK SAE "
                 "trained on the same store, spherical k-means, PCA, random directions and DiffMean (supervised)"),
    models=["smollm2-135m"],
    layers=[4, 8, 12],
    methods=[
        MethodSpec("ep", {"percentiles": [1, 2, 4, 8, 10], "n_calib": 30_000}),
        MethodSpec("sae", {"architecture": "topk", "width": 2048, "k": 32, "training_tokens": 40_000,
                           "batch_rows": 1024, "buffer_rows": 16_384, "lr": 1e-3}),
        MethodSpec("kmeans", {"k": 512, "n_rows": 30_000, "n_calib": 30_000}),
        MethodSpec("pca", {"k": 64}),
        MethodSpec("random", {"k": 512}),
        MethodSpec("diffmean"),
    ],
    store_tokens=40_000,
    concept_sets=["wordnet", "bbc"],
    concept_examples=15,
    max_concepts=20,
    # causal and recon run the whole model many times per artefact; on this CPU they run at the middle layer
    # for EP p=2 against the baselines (every other family scores all five percentiles at every layer)
    family_layers={"causal": [8], "recon": [8]},
    family_artefacts={"causal": ["ep:p=2", "sae", "pca", "random"],
                      "recon": ["ep:p=2", "ep:p=8", "sae", "kmeans", "pca"]},
    causal_alphas=[1.0, 2.0],
    causal_unrelated_texts=2,
    prompt_sets=["city_continent"],
    ood_sets=["random_tokens", "shuffled_words", "code"],
    side_effect_texts=8,
)
