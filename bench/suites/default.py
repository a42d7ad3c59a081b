"""default: the main job, a screening run. The embedded model, every method and metric family, three layers, CPU."""

from bench.suites import METRIC_FAMILIES, MethodSpec, Suite

# TopK SAE at lr 3e-3 (held-out EV ~0.82 after 3 epochs of this store, ~0.84 at convergence after ~7.5): capped at
# 3 epochs to fit the 15-minute budget, so the report shows it as stopped by the cap, not converged (`full` converges)
SAE = {"architecture": "topk", "k": 32, "training_tokens": 400_000, "max_epochs": 3.0, "batch_rows": 1024,
       "buffer_rows": 16_384, "lr": 3e-3, "progress": False}

SUITE = Suite(
    name="default",
    description=("SmolLM2-135M-Instruct (embedded), layers 4/12, EP at p = 1, 2, 4, 8, 10 against spherical k-means and "
                 "random directions at each EP K and a TopK SAE at each EP K from p = 2 (the primary comparisons), a "
                 "TopK SAE of width 2048 (capped at 3 epochs), k-means 512, PCA, random directions and DiffMean "
                 "(supervised)"),
    evidence=("screening only: a 40k-token store (too small for EP to saturate at fine p), two layers, SAEs capped "
              "at 3 epochs and none at p = 1's K, one fit seed per method, 20 WordNet concepts and 5 BBC topics x 15 "
              "examples per class (8 train, 7 test), 15 sae-probes datasets (every 8th) x 20 texts, one causal "
              "relation (country -> continent, 160 written prompts) at one layer for p = 8 and its baselines; with "
              "this few units a `no detectable difference` is weak evidence of equivalence. The credible run is the "
              "`full` suite (results/full/)"),
    models=["smollm2-135m"],
    layers=[4, 12],
    methods=[
        MethodSpec("ep", {"percentiles": [1, 2, 4, 8, 10], "n_calib": 30_000}),
        MethodSpec("sae", {**SAE, "width": 2048}),
        MethodSpec("kmeans", {"k": 512, "n_rows": 30_000, "n_calib": 30_000}),
        MethodSpec("pca", {"k": 64}),
        MethodSpec("random", {"k": 512}),
        MethodSpec("diffmean"),
        # the primary baselines: at every EP artefact's K (SAE sparsity scaled to width as in `full`; k-means on the
        # rows EP streamed)
        MethodSpec("sae", SAE, label="sae@K", match="K", match_to=["ep"], match_p=[2, 4, 8, 10], k_per_width=1 / 64),
        MethodSpec("kmeans", {"n_rows": 30_000, "n_calib": 30_000, "niter": 30}, label="kmeans@K", match="K",
                   match_to=["ep"], rows_as_target=True),
        MethodSpec("random", {}, match="K", match_to=["ep", "sae", "kmeans", "pca"]),
    ],
    store_tokens=40_000,
    concept_sets=["wordnet", "bbc", "saeprobes:every=8,n=20"],
    concept_examples=15,
    max_concepts=20,
    # causal and recon run the whole model many times per artefact; on this CPU they run at one layer on a subset
    # of artefacts (every other family scores every artefact at every layer). Refusal is left to `full`: SmolLM2
    # refuses 1 of 50 harmful requests, so only its baseline rate is measured (164 s here)
    metrics=[m for m in METRIC_FAMILIES if m not in ("refusal", "ground_truth")],
    family_layers={"causal": [12], "recon": [12]},
    family_artefacts={"causal": ["ep:p=8", "sae@K(ep:p=8)", "kmeans@K(ep:p=8)", "diffmean"],
                      "recon": ["ep:p=2", "ep:p=8", "sae", "sae@K", "kmeans", "pca"]},
    causal_alphas=[0.1, 0.25, 0.5, 1.0],
    causal_unrelated_texts=2,
    prompt_sets=["country_continent"],
    max_prompts=160,  # a seeded sample of the relation's prompts (the model answers about half)
    ood_sets=["random_tokens", "shuffled_words", "code"],
    side_effect_texts=8,
)
