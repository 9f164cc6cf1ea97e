"""What every `q3e` command shares: the Typer `app` they register on, the configuration options
(--preset, --config, overrides), logging and the watchdog, loading the configuration, readying data
and catalog, the one-line failure, and `main`, the console entry."""

from __future__ import annotations

import functools
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path
from typing import List, Optional

import typer

app = typer.Typer(
    help="Train and evaluate Qwen3-Embedding-style embedding and reranker models "
         "(arXiv 2506.05176): synthesis, filtering, contrastive pre-training, SFT, slerp merging, MTEB.",
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@functools.cache
def _base_yaml() -> dict:
    from tasks.config import base_defaults

    return base_defaults()


def base_default(key: str):
    """A setting's default from conf/base.yaml, the one place defaults live (`eval.batch_size`)."""
    value = _base_yaml()
    for part in key.split("."):
        value = value[part]
    return value


PresetOpt = typer.Option(base_default("preset"), "--preset", "-p",
                         help="conf/presets/<name>.yaml: micro, smol, qwen3-0.6b, ...")
ConfigOpt = typer.Option(None, "--config", "-c", help="extra YAML overlay files, applied in order")
OverridesArg = typer.Argument(None, help="overrides key.sub=value, e.g. stage2.steps=10")


DEBUG_ENV = "Q3E_DEBUG"


def debugging() -> bool:
    """--debug was given (`main` sets DEBUG_ENV) or DEBUG_ENV is set: failures print their traceback."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _NoFailureEcho(logging.Filter):
    """Prefect logs a failed flow or task run with its traceback (and then its state, with the
    exception's text again); `main` reports the failure as one line, so without --debug those
    records are dropped. Everything else Prefect logs passes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info:  # "Encountered exception during execution" with its traceback
            return False
        return not str(record.msg).startswith("Finished in state Failed")


def setup_logging(verbose: bool = False) -> None:
    """Log to stderr; start the watchdog that stops this command's services when it ends."""
    from tasks import reaper

    logging.basicConfig(level=logging.DEBUG if verbose or debugging() else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "urllib3", "filelock", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not debugging():
        for name in ("prefect.flow_runs", "prefect.task_runs"):
            logger = logging.getLogger(name)
            if not any(isinstance(f, _NoFailureEcho) for f in logger.filters):
                logger.addFilter(_NoFailureEcho())
    reaper.start()


def resolve_config(preset: str, overrides: Optional[List[str]], files: Optional[List[Path]] = None,
                   ablation: str | None = None):
    """The configuration base + preset + ablation + files + overrides; a bad one is one error line
    (exit 2)."""
    from tasks.config import ConfigError, load_config

    try:
        cfg = load_config(preset, overrides or [], files=files or [], ablation=ablation)
    except ConfigError as e:
        typer.secho(f"error: {e}", fg="red", err=True)
        raise typer.Exit(2) from None
    # Prefect reads its API URL from the environment: a configured server wins over ephemeral mode.
    if cfg.infra.prefect_api_url and "PREFECT_API_URL" not in os.environ:
        os.environ["PREFECT_API_URL"] = cfg.infra.prefect_api_url
    return cfg


def data_ready(cfg) -> None:
    """On a fresh clone `data/` is not there yet: restore it the way `q3e run` does (dvc pull, else the
    bundled source, then the derived sets), so a preset's data paths resolve."""
    if (Path.cwd() / cfg.data.dir).exists():
        return
    from tasks.lineage import LineageError, ensure_config_data

    try:
        version = ensure_config_data(Path.cwd(), cfg)
    except LineageError as e:
        raise fail(e) from None
    typer.echo(f"data: restored {cfg.data.dir}/ (version {version[:10]})", err=True)


def catalog_ready(cfg) -> None:
    """The catalog entries the stages name exist in a valid conf/catalog.yaml: a bad one is one error
    line before any service starts, not a failure at stage 2."""
    from tasks.data import DataError
    from tasks.data.catalog import check_entries

    try:
        check_entries([s.catalog for st in (cfg.stage1, cfg.stage2, cfg.reranker) for s in st.data if s.catalog])
    except DataError as e:
        raise fail(e) from None


def tracking_ready(cfg, project: Path) -> None:
    """A configured MLflow server answers: one that is down is one error line before Prefect and
    Ray start (seconds), not after them."""
    from tasks.tracking import TrackingError, check_reachable

    try:
        check_reachable(project / cfg.run_dir, cfg.infra.mlflow_tracking_uri)
    except TrackingError as e:
        raise fail(TrackingError(one_line(e))) from None


def fail(e: Exception) -> typer.Exit:
    """Print `e` as one error line; the exit (code 1) to raise: `raise fail(e) from None`."""
    typer.secho(f"error: {e}", fg="red", err=True)
    return typer.Exit(1)


def one_line(e: BaseException) -> str:
    """`error:` text of an exception: the project's own errors by their message (it names the file
    and field), anything else with its type; on one line."""
    text = " ".join(str(e).split()) or repr(e)
    return text if type(e).__module__.startswith(("tasks.", "flows.")) else f"{type(e).__name__}: {text}"


def _interrupted() -> None:
    typer.secho("error: interrupted; rerun the same command to resume where it stopped", fg="red", err=True)


def main(argv: list[str] | None = None) -> int:
    """The `q3e` console entry: runs a command; a failure is one `error:` line on stderr (exit 1)
    and its traceback is written to a file the line names, or printed with --debug / Q3E_DEBUG=1."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--debug" in args:
        args = [a for a in args if a != "--debug"]
        os.environ[DEBUG_ENV] = "1"
    try:
        app(args=args, prog_name="q3e")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if code == 130:  # typer turns Ctrl-C (KeyboardInterrupt) into exit code 130
            _interrupted()
        return code
    except KeyboardInterrupt:
        _interrupted()
        return 130
    except Exception as e:  # noqa: BLE001 - every failure ends as one line
        if debugging():
            raise
        fd, path = tempfile.mkstemp(prefix="q3e-traceback-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write("".join(traceback.format_exception(e)))
        typer.secho(f"error: {one_line(e)} (traceback: {path}; --debug prints it)", fg="red", err=True)
        return 1
    return 0
