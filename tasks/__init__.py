"""Stage logic of the Qwen3-Embedding recipe: models, losses, data, training, merging, synthesis,
filtering, evaluation. Plain functions on paths and typed configs; no orchestration in here."""

import os as _os

# Quiet, offline-friendly defaults; users can still set these themselves.
_os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
_os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
_os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
# No phoning home from the embedded services (the default run is offline).
_os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
_os.environ.setdefault("DO_NOT_TRACK", "1")
_os.environ.setdefault("DVC_NO_ANALYTICS", "1")
_os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
