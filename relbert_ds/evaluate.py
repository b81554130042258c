"""``python -m relbert_ds.evaluate``: the evaluator's command line (same as ``relbert-ds-evaluate``)."""
from relbert_ds.cli.evaluate import run

if __name__ == "__main__":
    run()
