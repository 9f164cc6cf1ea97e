"""DVC at the edge: the versioned inputs (`data/`, tracked by `data.dvc`) and the generated data sets
(`datasets/<stage>/<key>`, each tracked by its own `.dvc` file), so every model can be traced back
to the exact data it consumed.

Fresh clone: `data/` is restored with `dvc pull` from the configured remote; when the remote does
not have it (the embedded default is an empty local folder), it is copied from the bundled source
(`data.source`, by default the real public data in ../shared/data) and checked against data.dvc.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

os.environ.setdefault("DVC_NO_ANALYTICS", "1")


class LineageError(RuntimeError):
    pass


def _repo(root: Path):
    from dvc.repo import Repo

    return Repo(str(root))


def read_dvc_file(path: str | Path) -> dict:
    """{"md5": ..., "size": ..., "nfiles": ..., "path": ...} of a single-output .dvc file."""
    path = Path(path)
    if not path.is_file():
        raise LineageError(f"{path}: .dvc file not found")
    data = yaml.safe_load(path.read_text()) or {}
    outs = data.get("outs") or []
    if not outs or "md5" not in outs[0]:
        raise LineageError(f"{path}: no 'outs[0].md5' field")
    return outs[0]


def is_clean(root: Path, target: str) -> bool:
    """The workspace copy of `target` matches its .dvc file."""
    return not _repo(root).status(targets=[str(root / f"{target}.dvc")])


def _copy_bundled(source: Path, dest: Path, include: list[str]) -> None:
    tmp = dest.with_name(dest.name + ".tmp-copy")
    shutil.rmtree(tmp, ignore_errors=True)
    for rel in include:
        src = source / rel
        if not src.exists():
            raise LineageError(f"{src}: bundled data file missing (data.include lists {rel!r})")
        out = tmp / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, out)
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def _copy_missing(source: Path, dest: Path, include: list[str]) -> list[str]:
    """Copy the `include` entries that `dest` lacks (never overwriting what is there)."""
    added = []
    for rel in include:
        if (dest / rel).exists() or not (source / rel).exists():
            continue
        tmp = dest / (rel.rstrip("/") + ".tmp-copy")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (source / rel).is_dir() else shutil.copy2)(source / rel, tmp)
        tmp.rename(dest / rel)
        added.append(rel)
    return added


def build_derived(data: Path, derived: list) -> list[str]:
    """Build the `data.derived` sets that `data/` lacks; returns the ones it built."""
    from tasks.data import sts_to_beir, sts_to_pairs

    built = []
    for d in derived or []:
        out = data / d.out
        if not (data / d.source).is_file():
            raise LineageError(f"{data / d.source}: data.derived builds {d.out} from this file, which {data.name}/ "
                               f"lacks; add {d.source!r} to data.include, or drop {d.out!r} from data.derived")
        if d.kind == "sts_retrieval":
            if (out / "qrels" / "test.tsv").is_file():
                continue
            sts_to_beir(data / d.source, out, split=d.split or "dev", min_score=d.min_score)
        else:
            if out.is_file():
                continue
            sts_to_pairs(data / d.source, out, query_field=d.query_field, positive_field=d.positive_field,
                         score_field=d.score_field, split=d.split, min_score=d.min_score,
                         max_negative_score=d.max_negative_score)
        built.append(d.out)
    return built


def push(root: Path, targets: list[str], remote: str | None = None) -> bool:
    try:
        _repo(root).push(targets=[str(root / t) for t in targets], remote=remote)
        return True
    except Exception as e:  # a remote being down must not lose the local result
        log.warning("dvc push of %s failed (%s); the data stays in the local cache", targets, e)
        return False


def ensure_data(root: str | Path, data_dir: str = "data", *, source: str | Path | None = None,
                include: list[str] | None = None, remote: str | None = None, derived: list | None = None) -> str:
    """Make `data/` match a version tracked by DVC and return its md5 (the data version).

    - present and matching data.dvc: nothing to do;
    - missing: `dvc pull` from the remote, else copy the bundled source, then check;
    - present but changed (new data the user put there): record it as a new version
      (`dvc add`), push it, and say so: commit data.dvc to keep that version.
    """
    root = Path(root).resolve()
    data = root / data_dir
    dvc_file = root / f"{data_dir}.dvc"
    if not (root / ".dvc").is_dir():
        raise LineageError(f"{root}: not a DVC project (no .dvc/ folder); run `dvc init`")
    if not data.exists() and dvc_file.is_file():
        try:
            _repo(root).pull(targets=[str(dvc_file)], remote=remote)
            log.info("data: pulled %s from the DVC remote", data_dir)
        except Exception as e:
            if source is None:
                raise LineageError(f"{data}: missing and `dvc pull` failed ({e}); set data.source or a remote") from e
            log.info("data: remote has no copy (%s); using the bundled data in %s", type(e).__name__, source)
    if not data.exists():
        if source is None or not Path(source).is_dir():
            raise LineageError(f"{data}: missing, and the bundled source {source} is not a folder")
        _copy_bundled(Path(source), data, include or [])
    elif source is not None and Path(source).is_dir():
        for name in _copy_missing(Path(source), data, include or []):  # data.include grew
            log.info("data: added %s from %s", name, source)
    for name in build_derived(data, derived or []):
        log.info("data: built %s from %s", name, data_dir)
    if dvc_file.is_file() and is_clean(root, data_dir):
        version = read_dvc_file(dvc_file)["md5"]
    else:
        old = read_dvc_file(dvc_file)["md5"] if dvc_file.is_file() else None
        _repo(root).add([str(root / data_dir)])
        version = read_dvc_file(dvc_file)["md5"]
        if old is None:
            log.info("data: recorded %s as version %s (%s.dvc); commit %s.dvc to keep it", data_dir, version,
                     data_dir, data_dir)
        elif version == old:  # e.g. a fresh clone: the copied files are the version data.dvc names
            log.info("data: %s is version %s of %s.dvc; added to this machine's DVC cache", data_dir, version, data_dir)
        else:
            log.warning("data: %s changed (%s -> %s): recorded as a new DVC version; commit %s.dvc to keep it",
                        data_dir, old, version, data_dir)
    push(root, [f"{data_dir}.dvc"], remote)
    return version


def ensure_config_data(root: str | Path, cfg) -> str:
    """`ensure_data` with a loaded config's `data` section and DVC remote (a relative `data.source`
    is relative to `root`): what `q3e run` does first, and `q3e train/synth/eval --preset` on a fresh
    clone where `data/` is not there yet."""
    root = Path(root).resolve()
    source = Path(cfg.data.source).expanduser() if cfg.data.source else None
    if source is not None and not source.is_absolute():
        source = (root / source).resolve()
    return ensure_data(root, cfg.data.dir, source=source, include=cfg.data.include,
                       remote=cfg.infra.dvc_remote, derived=cfg.data.derived)


def track_dataset(root: str | Path, path: str | Path, remote: str | None = None) -> str:
    """Version a generated data set folder with DVC (`dvc add` + push); returns its md5."""
    root = Path(root).resolve()
    rel = Path(path).resolve().relative_to(root)
    dvc_file = root / f"{rel}.dvc"
    if dvc_file.is_file() and is_clean(root, str(rel)):
        return read_dvc_file(dvc_file)["md5"]
    _repo(root).add([str(root / rel)])
    push(root, [f"{rel}.dvc"], remote)
    return read_dvc_file(dvc_file)["md5"]
