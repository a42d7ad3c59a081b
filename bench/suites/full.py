"""full: the credible run. SmolLM2-135M-Instruct on a 1M-token store, every baseline at its best and at EP's budgets.

Hours on a 2-core CPU (the store alone is ~1-2 h of forward passes; SAE training and k-means at EP's K dominate the
rest), minutes on a GPU. Resumable: run `epbench run --suite full --run-id full` again in a later sitting and it
continues (finished cells are kept; the store resumes shard by shard). Committed as results/full/.
"""

from bench.suites import MethodSpec, Suite

SEEDS = [0, 1, 2]  # every stochastic method (SAE, k-means, random) is fitted three times
# A TopK SAE trained on the store until held-out NMSE stops improving (bench/methods/sae.py: converge_tol over the
# last converge_window of steps), with a cap so it always ends.
SAE = {"architecture": "topk", "k": 32, "training_tokens": 8_000_000, "batch_rows": 4096, "buffer_rows": 65_536,
       "lr": 1e-3, "progress": False}

SUITE = Suite(
    name="full",
    description=("SmolLM2-135M-Instruct (embedded), 1M-token store, layers 4/8/12: EP at p = 1, 2, 4, 8, 10 against "
                 "TopK SAEs trained to convergence (3 seeds), SAEs at EP's K and on EP's tokens, spherical k-means and "
                 "random directions at EP's K (3 seeds), exact PCA and DiffMean (supervised)"),
    evidence=("the credible run: 1M tokens, 3 fit seeds per stochastic method, every baseline at EP's dictionary "
              "size, 40 WordNet concepts x 50 test examples per class and 5 BBC topics, >= 100 countryinfo prompts "
              "over 4 relations; verdicts are paired over concepts / prompts with Holm correction"),
    models=["smollm2-135m"],
    layers=[4, 8, 12],
    methods=[
        MethodSpec("ep", {"percentiles": [1, 2, 4, 8, 10], "n_calib": 200_000}),
        MethodSpec("sae", {**SAE, "width": 4096}, seeds=SEEDS),
        MethodSpec("kmeans", {"k": 4096, "n_rows": 200_000, "n_calib": 200_000}, seeds=SEEDS),
        MethodSpec("pca", {"k": 256}),
        MethodSpec("random", {"k": 4096}, seeds=SEEDS),
        MethodSpec("diffmean"),
        # the same dictionary size as each EP build: the fair axis for every comparison with EP
        MethodSpec("kmeans", {"n_rows": 200_000, "n_calib": 200_000}, match="K", match_to=["ep"], seeds=SEEDS),
        MethodSpec("random", {}, match="K", match_to=["ep", "sae", "kmeans", "pca"], seeds=SEEDS),
        MethodSpec("sae", SAE, match="K", match_to=["ep"], match_p=[2, 4, 8, 10], seeds=SEEDS),
        # the paper's token-efficiency claim: an SAE trained only on the tokens the EP build streamed
        MethodSpec("sae", SAE, match="tokens", match_to=["ep"], match_p=[4, 8, 10], seeds=SEEDS),
    ],
    store_tokens=1_000_000,
    store_dtype="float16",
    concept_sets=["wordnet", "bbc"],
    concept_test_examples=50,
    prompt_sets=["country_capital", "country_continent", "country_demonym", "country_language"],
    ood_sets=["random_tokens", "shuffled_words", "code"],
    side_effect_texts=32,
    causal_alphas=[0.5, 1.0, 2.0],
    causal_unrelated_texts=8,
    family_layers={"refusal": [8]},
    # model-in-the-loop families score the unmatched baselines and every EP percentile
    family_artefacts={"causal": ["ep", "sae", "kmeans", "pca", "random"],
                      "recon": ["ep", "sae", "sae@K", "sae@tokens", "kmeans", "kmeans@K", "pca"],
                      "refusal": ["ep", "sae"]},
)
