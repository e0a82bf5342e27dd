"""dpvl: differentially private pretraining of vision and vision-language models in JAX."""
