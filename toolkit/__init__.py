"""The plumbing behind tools.py, one file per job: data, tokenizer, tokenizer_training, checkpoint, hf, optim,
trainer, schedule, provenance, generate, sampling, metrics, cli, stability, experiment, stats, report."""
