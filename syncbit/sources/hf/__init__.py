"""HuggingFace Hub sources: `hf://[models/|datasets/]<repo_id>[@revision]`.

Owns resolving a revision to its commit (the dataset version) and listing its files with
huggingface_hub (in worker threads), and range reads of `resolve` URLs at that commit
through `wire.Pool`, following the Hub's redirects to its storage. The token is read from
the environment (HF_TOKEN or the token file) and is never put in options, messages or logs.

    repo    hf:// URIs, globs, tree entries (no Hub calls)
    errors  huggingface_hub failures and read statuses -> syncbit errors
    source  HfSource (registered as hf://): listing and range reads
"""

from syncbit.hfenv import token_from_env
from syncbit.sources.hf.repo import parse_hf_uri, split_globs, tree_entries
from syncbit.sources.hf.source import DEFAULT_ENDPOINT, OPTION_KEYS, HfSource, warm

__all__ = [
    "DEFAULT_ENDPOINT",
    "OPTION_KEYS",
    "HfSource",
    "parse_hf_uri",
    "split_globs",
    "token_from_env",
    "tree_entries",
    "warm",
]
