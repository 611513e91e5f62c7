#!/usr/bin/env bash
# Publish a trained template checkpoint to ModelScope: package it with a model card, check that it
# loads (no code execution) and generates, then upload it.
#
#   MODELSCOPE_API_TOKEN=... scripts/publish_template.sh CHECKPOINT OWNER/NAME [publish flags]
#
# Flags go to `python -m diffsynth_templates publish`, e.g. --dry-run (stop before uploading and list
# the files), --public, --base_model ID, --license L, --message M, --out DIR, --shard_size 2GB,
# --overwrite (replace a package folder this tool wrote before; other folders are never replaced),
# --offline (never connect; also DIFFSYNTH_TEMPLATES_OFFLINE=1). Errors print "error: ..." (exit 2).
# Get a token at https://modelscope.cn/my/myaccesstoken (write permission). If an upload is
# interrupted, run the same command again: committed files are skipped.
set -euo pipefail

if [ "$#" -lt 2 ]; then
    echo "usage: $0 CHECKPOINT OWNER/NAME [--dry-run] [--public] [--base_model ID] [...]" >&2
    exit 2
fi
checkpoint=$1
repo=$2
shift 2

cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m diffsynth_templates publish "$checkpoint" --repo "$repo" "$@"
