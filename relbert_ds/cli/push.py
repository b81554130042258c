"""``relbert-ds-push``: publish an exported model to the Hugging Face hub with its full model card.

    relbert-ds-push runs/default/best_model me/relbert-minilm --results runs/default/results.json
    relbert-ds-push runs/default/best_model me/relbert-minilm --dry_run     # print the card, upload nothing

The token comes from --token, HF_TOKEN or the saved login (``hf auth login``). Errors are one
``error:`` line and exit status 2; the local folder is never modified.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from relbert_ds.errors import UserError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="relbert-ds-push", description=(
        "Upload a model exported by relbert-ds (<run>/best_model or <run>/model) to the Hugging Face hub, with a "
        "model card: hub metadata (base_model, license, datasets, tags, model-index of every metric), the "
        "training recipe and DeepSpeed config, the results table, how to load it, and the citation."))
    p.add_argument("folder", help="the exported model folder")
    p.add_argument("repo_id", help="NAME or USER_OR_ORG/NAME on the hub")
    p.add_argument("--results", metavar="FILE.json", default=None,
                   help="results of relbert-ds-evaluate --output for this model: its metrics become the card's "
                        "model-index and results table (default: the validation numbers of the export)")
    p.add_argument("--token", default=None, help="hub write token (default: HF_TOKEN, else the saved login)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--exist_ok", action="store_true", help="add a commit to the repo if it already exists")
    p.add_argument("--endpoint", default=None, metavar="URL", help="hub address (default: HF_ENDPOINT, else "
                                                                   "https://huggingface.co)")
    p.add_argument("--license", default="apache-2.0",
                   help="licence in the card's metadata (default apache-2.0, the bundled backbone's; use your "
                        "backbone's licence, e.g. mit for roberta-large)")
    p.add_argument("--commit_message", default=None)
    p.add_argument("--revision", default=None, help="branch to commit to (default main)")
    p.add_argument("--dry_run", action="store_true", help="print the model card and the files, upload nothing")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the push; returns the exit code (0, or 2 for a user error)."""
    args = build_parser().parse_args(argv)
    from relbert_ds.publish import hub
    from relbert_ds.publish.model_card import card_from_folder

    try:
        if args.dry_run:
            folder = hub.check_export(args.folder)
            try:
                print(card_from_folder(folder, results=args.results, repo_id=args.repo_id, license=args.license))
            except UserError as exc:
                raise hub.HubError(str(exc)) from exc
            files = [rel for rel, _ in hub.export_files(folder)] + ["README.md (the card above)"]
            print("files to upload: " + ", ".join(files), file=sys.stderr)
            return 0
        result = hub.push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private,
                                 endpoint=args.endpoint, results=args.results, exist_ok=args.exist_ok,
                                 license=args.license, commit_message=args.commit_message, revision=args.revision)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    print(f"uploaded {len(result.files)} files to {result.repo_url} ({result.commit_url})", flush=True)
    return 0


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
