("""The plumbing behind tools.py, one file per job: data, tokenizer, checkpoint, hf, trainer, schedule, generate, """
 """sampling, metrics, cli, stability, experiment, stats, report.""")
