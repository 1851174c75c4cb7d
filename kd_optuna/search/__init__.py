"""Where candidates come from: EvolutionSampler (Algorithm 1 on Optuna), its proposers, the
sampler a study config's [search] table describes, the additive predictor that ranks contestants,
the genome helpers and the lineage each trial keeps."""
