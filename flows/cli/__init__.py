"""`q3e`: the command line of the pipeline. Every command has --help.

The commands, by module:
  common.py  the Typer `app`, the shared options, loading the configuration, `main` (the console entry)
  models.py  config, train, merge, encode, export, eval
  data.py    synth, filter, data check
  runs.py    run, ablate, rerun, retrain, schedule, runs compare, lineage, report

Configuration options shared by most commands:
  --preset NAME        conf/presets/NAME.yaml (micro, smol, qwen3-0.6b, qwen3-4b, qwen3-8b)
  --config FILE        extra YAML overlays (repeatable)
  KEY.SUB=VALUE ...    overrides, e.g. stage2.steps=10 stage2.loss.temperature=0.02
  --debug              (anywhere on the line, or Q3E_DEBUG=1) print the traceback of a failure;
                       without it a failure is one `error:` line and its traceback goes to a file

Commands that start services (run, ablate, rerun, retrain, schedule, synth, filter, train, eval)
start a watchdog first (tasks/reaper.py): the Prefect server and Ray processes they start are
stopped when the command ends, however it ends (a SIGKILL included).
"""

from flows.cli.common import app, main, one_line

# Importing a command module registers its commands on `app`; `q3e --help` lists them in this order.
from flows.cli import models, data, runs
from flows.cli.runs import _print_summary  # tests/test_report.py prints a run summary with it

__all__ = ["app", "main", "one_line", "models", "data", "runs", "_print_summary"]
