"""full: the credible run. Every learned family swept along dictionary size on the same 1M-token store, compared at
matched K with independent units, declared primary comparisons, controls that faced the same selection.

Design (issue: "a verdict that survives review"):
- Size axis. EP at p = 1, 2, 4, 6, 8, 10 (p6 fills the p4-p8 gap of the curve). At every EP artefact's K (the
  trained baselines from p2: see Amendment): a TopK SAE
  (`sae@K`, sparsity scaled to width: k = clip(round(width / 64), 1, 32), i.e. the reference SAE's L0/width of
  32/2048 up to L0 32), spherical k-means fitted on as many store rows as that EP build streamed (`kmeans@K`,
  `rows_as_target`: the same store prefix, both read in store order), and random directions (`random@K`).
  Beside them the reference SAE (width 2048, k 32, trained to convergence), k-means 2048, PCA 256, DiffMean†.
- Primary family (bench.suites.VerdictPlan, the default plan): EP vs sae@K and EP vs kmeans@K at each p from p2 and
  pooled over those p, on detection (contrast and SAE-A rules, exemplar and region mean), retrieval p@10, probing retention
  above its majority floor, sparse probing (k = 1, over up to 113 sae-probes datasets as well as the concepts),
  causal ablation and steering at matched KL; Holm within it, every other comparison exploratory.
- Causal: at the middle layer, EP p2 and p8 and their sae@K / kmeans@K, and DiffMean (fitted on the causal train
  prompts); every effect against random directions of the artefact's K selected by the same train rule, with
  prompts clustered by the direction used (relation/answer).

Reduced fits on this 2-core CPU (stated, chosen before any baseline result): the baselines at p <= 2 (widths and
k-means K of 2k-26k on ~990k rows each) are fitted with one seed, the others with three; the SAEs on EP's tokens (the
token claim) with one seed. A GPU, where one is lent, may run them all with three seeds (recorded in run.json).

Amendment (third sitting, 2026-12-02, before any sae@K, kmeans@K or random@K cell had run; run.json `amendments`):
the trained baselines at EP's K start at p2, and random@K takes one seed at p <= 2 as every other baseline does.
Why: caches do not outlive a session here (a sitting of at most 3 h re-extracts the store, the concept texts and EP,
about 32 min, measured), and every cell of a spec needs that spec's fits at all layers. Extrapolated from rates the
previous run measured on an Intel Xeon (k-means 0.1 TFLOP/s: 171 s for K 22,476 x 100k rows x 7 iterations; SAE
about 130 s per 2,048 latents to convergence; the third sitting's AMD EPYC took about 4.3 min per w2048 SAE), k-means
at p1's K (11k-26k) on the 989,599 rows EP streamed needs about 75 min and SAEs at that width about 65 min for the
three layers. With the rest of each spec's fits (about 55 min) and the re-extraction, that fills a sitting before its
first cell, so the spec could never complete. From p2 each spec's fits take about an
hour. EP p1 stays in the grid: against random directions at its K and the reference SAE (exploratory); the matched
comparison at p1 needs a GPU or a cache that survives sessions. Measured cost of a finished EP cell (six artefacts,
one layer): detection 12-13 min, probing 2-5 min, OOD 3.5-5 min, recon 45 s, causal (L8, 2 artefacts) 17 min.
Second amendment (fourth sitting, 2026-12-02, before any random@K or Gemma cell had run):
- random@K at EP's and PCA's K only. At the reference SAE's and k-means 2048's K it drew the very directions of the
  `random` spec (k 2048, seeds 0-2: a draw depends on seed, layer and K alone), 18 artefacts per layer that were 3
  draws repeated, about half of random@K's scoring; their control is now `random` itself (bench.verdict: a random
  spec of the method's own K at every layer, where no random@K is matched to it).
- Gemma-3-270m at two layers, 9 and 12 (56% and 72% depth), not 4/9/13: the measured cost of this design's cells
  on SmolLM2 (EP's at layer 8: 48 min for 34k features over six artefacts, about 14 min per 10k features) puts one
  Gemma layer, with about 119k features over all specs and their fits, at about 4 h, three at about 14 h with the
  causal cell, against that model's 6 h budget; its issue allows two layers (about 9.5 h: still over, stated). 9 and 12 are the middle layer and the
  one nearest the paper's depths (Gemma-2-2B layers 12 and 20 of 26: 48%, 77%), and both carry Gemma Scope 2's
  `gemma-scope-2-270m-pt-res` SAEs (layers 5, 9, 12, 15), so a user with hub access can put the published SAEs at
  exactly these layers. Causal and refusal cells run at its middle entry, layer 12 (the suite's layer 8 is not one
  of this model's).
Third amendment (eighth sitting, 2026-12-08, before any of its cells ran): one TopK SAE at EP p1's K (`sae@K-p1`,
one seed, k 32) at SmolLM2 layer 12 only, where p1's K is smallest (11,308; 22,476 and 26,029 at L4 / L8). The first
amendment left no trained baseline at p1's K, but the fair-verdict issue asks for SAEs up to at least p1's K at one
layer or more; one width-11k fit (about 15-30 min here) fits a sitting where three layers (about 65 min) did not. It is
exploratory (EP p1 vs this SAE at matched K, Holm within the exploratory family), not part of the primary family,
which was declared before any result; its random control is random@K at p1's K. In the same amendment, before any
Gemma cell: Gemma-3-270m's store in float32, not float16. A preflight of every family of this grid on a 6k-token
Gemma store found its residual stream at |x| up to 60,064 at layer 9 and beyond float16's 65,504 (stored as inf) at
layer 12 (row norms 6k-17k), so EP's first Gemma cell would have failed; SmolLM2 (|x| well inside the range) keeps its
float16 store, whose finished cells it backs. Extraction now refuses such a store with the fix named.
Committed as results/full/ (cells, rows, report; no activations).
"""

from bench.suites import MethodSpec, Suite

SEEDS = [0, 1, 2]  # stochastic methods (SAE, k-means, random) at the sizes a CPU affords three fits of
FINE_SEEDS = {1: [0], 2: [0]}  # EP percentiles whose K (2k-26k) make a baseline fit take 10-70 minutes here
# A TopK SAE trained on the store until held-out NMSE stops improving (methods/sae.py: converge_tol over the last
# converge_window of steps), with a cap so it always ends.
SAE = {"architecture": "topk", "k": 32, "training_tokens": 8_000_000, "batch_rows": 1024, "buffer_rows": 65_536,
       "lr": 1e-3, "progress": False}
KMEANS = {"n_rows": 100_000, "n_calib": 200_000, "niter": 30}
K_PER_WIDTH = 1 / 64  # the reference SAE's L0 / width (32 / 2048)
MATCHED_P = [2, 4, 6, 8, 10]  # EP percentiles with a trained baseline at their K on this CPU (p1: a GPU's; see above)

SUITE = Suite(
    name="full",
    description=("SmolLM2-135M-Instruct (embedded; layers 4/8/12) and Gemma-3-270m (base; layers 9/12), 1M-token "
                 "stores: EP at p = 1, 2, 4, 6, 8, 10 against "
                 "TopK SAEs and spherical k-means at each EP K from p2, random directions at every EP K, the "
                 "reference TopK SAE (w2048, "
                 "converged, 3 seeds), a TopK SAE at EP p1's K at SmolLM2 layer 12, k-means 2048, exact PCA and "
                 "DiffMean (supervised)"),
    evidence=("the credible run: 1M tokens; every learned family along the dictionary-size axis and compared only at "
              "matched K (10%); 40 WordNet concepts and 5 BBC topics x 50 test examples per class, up to 113 "
              "sae-probes datasets, countryinfo prompts over 4 relations clustered by the direction used; a declared "
              "primary family with Holm; baselines at p <= 2 with one seed and a trained baseline at p1's K at one "
              "layer only (CPU budget; amended before those cells ran)"),
    # two model families: SmolLM2 (Llama architecture, instruct) and Gemma-3-270m (the base model Gemma Scope 2 was
    # trained on); SmolLM2 at 4/8/12 of 30, as in every earlier run (its store and fits are reused), Gemma at two of
    # its 18 layers (second amendment, above)
    models=["smollm2-135m", "gemma-3-270m"],
    layers=[4, 8, 12],
    model_layers={"gemma-3-270m": [9, 12]},  # (L + 1) / 18 = 56%, 72% depth; Gemma Scope 2 res layers
    methods=[
        MethodSpec("ep", {"percentiles": [1, 2, 4, 6, 8, 10], "n_calib": 200_000}),
        MethodSpec("sae", {**SAE, "width": 2048}, seeds=SEEDS),
        MethodSpec("kmeans", {**KMEANS, "k": 2048}, seeds=SEEDS),
        MethodSpec("pca", {"k": 256}),
        MethodSpec("random", {"k": 2048}, seeds=SEEDS),
        MethodSpec("diffmean"),
        # the size axis: one baseline per EP artefact, at its K (labels `sae@K(ep:p=4)` etc.)
        # (amended in the third sitting, before any of these cells ran: not at p1, whose fits cannot finish
        # inside one cache lifetime here; random@K with one seed at p <= 2 like the other baselines; see above)
        MethodSpec("sae", SAE, label="sae@K", match="K", match_to=["ep"], match_p=MATCHED_P, seeds=SEEDS,
                   match_seeds=FINE_SEEDS, k_per_width=K_PER_WIDTH),
        MethodSpec("kmeans", KMEANS, label="kmeans@K", match="K", match_to=["ep"], match_p=MATCHED_P, seeds=SEEDS,
                   match_seeds=FINE_SEEDS, rows_as_target=True),
        # (second amendment: not at the K of `sae` and `kmeans`, 2048, where `random` is the same draw)
        MethodSpec("random", {}, match="K", match_to=["ep", "pca"], seeds=SEEDS, match_seeds=FINE_SEEDS),
        # the paper's token-efficiency claim: an SAE trained only on the tokens the EP build streamed
        MethodSpec("sae", {**SAE, "width": 2048}, match="tokens", match_to=["ep"], match_p=[8, 10], seeds=[0]),
        # (third amendment: an SAE at p1's K at one layer, where that K is smallest; exploratory)
        MethodSpec("sae", SAE, label="sae@K-p1", match="K", match_to=["ep"], match_p=[1], seeds=[0],
                   k_per_width=K_PER_WIDTH, at_layers={"smollm2-135m": [12]}),
    ],
    store_tokens=1_000_000,
    store_dtype="float16",
    model_store_dtype={"gemma-3-270m": "float32"},  # (third amendment) its residual stream exceeds float16's range
    concept_sets=["wordnet", "bbc", "saeprobes"],
    concept_test_examples=50,
    prompt_sets=["country_capital", "country_continent", "country_demonym", "country_language"],
    ood_sets=["random_tokens", "shuffled_words", "code"],
    side_effect_texts=32,
    # doses for comparing at matched KL on unrelated text (the full run measured 0.01-0.64 nat for plain ablations,
    # ~2 nat for steering at 0.5x): small strengths put 0.1 nat between two measured points
    causal_alphas=[0.1, 0.25, 0.5, 1.0],
    causal_ablation_scales=[0.25, 1.0, 4.0],
    causal_unrelated_texts=8,
    family_layers={"causal": [8], "refusal": [8]},
    family_artefacts={
        "causal": ["ep:p=2", "ep:p=8", "sae@K(ep:p=2)", "sae@K(ep:p=8)", "kmeans@K(ep:p=2)", "kmeans@K(ep:p=8)",
                   "diffmean"],
        "recon": ["ep", "sae", "sae@K", "sae@tokens", "kmeans", "kmeans@K", "pca"],
        "refusal": ["ep", "sae"],
    },
)
