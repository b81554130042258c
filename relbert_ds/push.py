"""``python -m relbert_ds.push``: publish an exported model to the hub (same as ``relbert-ds-push``)."""
from relbert_ds.cli.push import run

if __name__ == "__main__":
    run()
