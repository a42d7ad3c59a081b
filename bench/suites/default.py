"""default: the main job, a screening run. The embedded model, every method and metric family, three layers, CPU."""

from bench.suites import MethodSpec, Suite

# TopK SAE at lr 3e-3 (held-out EV ~0.82 after 3 epochs of this store, ~0.84 at convergence after ~7.5): capped at
# 3 epochs to fit the 15-minute budget, so the report shows it as stopped by the cap, not converged (`full` converges)
SAE = {"architecture": "topk", "k": 32, "training_tokens": 400_000, "max_epochs": 3.0, "batch_rows": 1024,
       "buffer_rows": 16_384, "lr": 3e-3, "progress": False}

SUITE = Suite(
    name="default",
    description=("SmolLM2-135M-Instruct (embedded), layers 4/8/12, EP at p = 1, 2, 4, 8, 10 against a TopK SAE "
                 "trained on the same store (capped at 3 epochs), k-means, random directions and an SAE at EP's K, "
                 "spherical k-means, PCA, random directions and DiffMean (supervised)"),
    evidence=("screening only: a 40k-token store (too small for EP to saturate at fine p), SAEs capped at 3 epochs, "
              "one fit seed per method, 20 WordNet concepts and 5 BBC topics x 15 examples per class (8 train, "
              "7 test), one causal relation (country -> continent) at one layer; with this few units a `no "
              "detectable difference` is weak evidence of equivalence. The credible run is the `full` suite "
              "(results/full/)"),
    models=["smollm2-135m"],
    layers=[4, 8, 12],
    methods=[
        MethodSpec("ep", {"percentiles": [1, 2, 4, 8, 10], "n_calib": 30_000}),
        MethodSpec("sae", {**SAE, "width": 2048}),
        MethodSpec("kmeans", {"k": 512, "n_rows": 30_000, "n_calib": 30_000}),
        MethodSpec("pca", {"k": 64}),
        MethodSpec("random", {"k": 512}),
        MethodSpec("diffmean"),
        # baselines at EP's dictionary size (k-means and the SAE at the coarser percentiles, to fit 15 minutes)
        MethodSpec("kmeans", {"n_rows": 30_000, "n_calib": 30_000}, match="K", match_to=["ep"], match_p=[4, 8, 10]),
        MethodSpec("random", {}, match="K", match_to=["ep", "sae", "kmeans", "pca"]),
        MethodSpec("sae", SAE, match="K", match_to=["ep"], match_p=[8]),
    ],
    store_tokens=40_000,
    concept_sets=["wordnet", "bbc"],
    concept_examples=15,
    max_concepts=20,
    # causal, recon and refusal run the whole model many times per artefact; on this CPU they run at the middle
    # layer on a subset of artefacts (every other family scores every artefact at every layer)
    family_layers={"causal": [8], "recon": [8], "refusal": [8]},
    family_artefacts={"causal": ["ep:p=2", "sae", "pca", "random"],
                      "recon": ["ep:p=2", "ep:p=8", "sae", "sae@K", "kmeans", "pca"],
                      "refusal": ["ep:p=8"]},
    causal_alphas=[0.5, 1.0, 2.0],
    causal_unrelated_texts=2,
    prompt_sets=["country_continent"],
    max_prompts=240,  # a seeded sample of the relation's prompts (the model answers about half)
    ood_sets=["random_tokens", "shuffled_words", "code"],
    side_effect_texts=8,
)
