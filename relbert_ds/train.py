"""``python -m relbert_ds.train``: the training command line (same as ``relbert-ds-train``)."""
from relbert_ds.cli.train import run

if __name__ == "__main__":
    run()
