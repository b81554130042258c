"""``python -m relbert_ds.plot``: figures of a training run (same as ``relbert-ds-plot``)."""
from relbert_ds.cli.plot import run

if __name__ == "__main__":
    run()
