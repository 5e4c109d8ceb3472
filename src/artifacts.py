"""Where runs write, what they publish, and the provenance that later stages check.

* The project root: ``$HIAR_ROOT`` when set, else the nearest folder above this file holding ``pyproject.toml``
  (never ``hydra:runtime.cwd``, which a sweep does not know when it resolves its folder). ``setup_root`` exports it
  so ``conf/paths`` reads it as ``${oc.env:HIAR_ROOT}``.
* Run folders: ``${hiar_run_id:}`` is unique per process (pid + random), so two runs started in the same second get
  two folders.
* A stage exports into ``<run>/export/`` with a manifest, ``provenance.json``, written only once every file the
  export must hold is there: the stage, the settings that made it, the digests of its input files (teacher, base
  weights) and the ids of the upstream artifacts it read, the digest of every file it wrote.
* ``publish`` verifies the export against its manifest (an incomplete or changed one is refused), places a copy (hard
  links) in a new version folder ``<artifacts_dir>/.versions/<stage>/<n>-<id>`` with ``published.json`` naming the run
  it came from, and points the link ``<artifacts_dir>/<stage>`` at it by one atomic rename: a reader finds the previous
  version or the new one, never no stage and never a partial one. Publishers take turns (an fcntl lock); each first
  repairs what an interrupted one left (``tidy_stage``). Sweep jobs and ``fast_dev_run`` never publish.
* A consumer names its inputs (``inputs.ode_pairs``, ``inputs.ode_init``; default: the published ones) and
  ``check_inputs`` refuses any whose manifest disagrees with the consumer's config, saying what differs and the
  command that rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from src.io import (
    OLD_MARK,
    TMP_MARK,
    atomic_path,
    atomic_write_text,
    clean_partial,
    exclusive_lock,
    file_mode,
    replace_link,
    sha256_file,
)

log = logging.getLogger(__name__)

ROOT_ENV = "HIAR_ROOT"
RUN_ID_ENV = "HIAR_RUN_ID"
ROOT_MARKER = "pyproject.toml"
MANIFEST = "provenance.json"
PUBLISHED = "published.json"
VERSIONS = ".versions"  # <artifacts_dir>/.versions/<stage>/<n>-<id>: the published versions a stage link points at
# a replaced version stays this long (and the last replaced one until the next publish): a reader that resolved the
# stage link just before a publish still finds every file of the version it resolved
REPLACED_GRACE_S = 60.0
# files larger than this are identified by name, size and mtime rather than hashed (a Wan DiT is tens of GB)
FULL_HASH_LIMIT = 2 << 30


# ------------------------------------------------------------------------------------------- root and run ids


def find_root(start: str | Path) -> Path:
    """The nearest folder at or above ``start`` that holds the project marker."""
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        if (folder / ROOT_MARKER).is_file():
            return folder
    raise FileNotFoundError(f"no {ROOT_MARKER} above {start}: set {ROOT_ENV} to the project root")


def setup_root() -> Path:
    """Exports $HIAR_ROOT (kept when already set) and registers the run-id resolver; returns the root."""
    os.environ.setdefault(ROOT_ENV, str(find_root(Path(__file__).parent)))
    if not OmegaConf.has_resolver("hiar_run_id"):
        OmegaConf.register_new_resolver("hiar_run_id", run_id)
    return Path(os.environ[ROOT_ENV])


_RUN_ID: str | None = None


def run_id() -> str:
    """Unique per process and stable within it (the run folder and anything naming it agree); $HIAR_RUN_ID when set
    (a sweep sets it for its jobs, which a launcher such as submitit runs in other processes that resolve the sweep
    folder again)."""
    global _RUN_ID
    if _RUN_ID is None:
        _RUN_ID = os.environ.get(RUN_ID_ENV) or f"{os.getpid()}-{uuid.uuid4().hex[:4]}"
    return _RUN_ID


def share_run_id_with_sweep_jobs(argv: list[str]) -> None:
    """A multirun's jobs resolve ``hydra.sweep.dir`` in their own processes: give them this process's run id."""
    if "-m" in argv or "--multirun" in argv:
        os.environ.setdefault(RUN_ID_ENV, run_id())


# ------------------------------------------------------------------------------------------- digests


def file_digest(path: str | Path) -> str:
    """sha256 of a file; for a folder or a file over FULL_HASH_LIMIT, a digest of (name, size, mtime) per file
    (``stat:`` prefix: identifies the version on this disk without reading tens of GB)."""
    path = Path(path)
    if path.is_file() and path.stat().st_size <= FULL_HASH_LIMIT:
        return sha256_file(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(path) if path.is_dir() else p.name}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return "stat:" + h.hexdigest()


def _canonical(value) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


# ------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class Stage:
    """A stage's output and what it depends on.

    settings: name -> (key in the producing run's config, key in a consumer's config that must agree with it);
    input_files: name -> config key of a file whose digest is recorded (teacher, base weights);
    inputs: upstream stages (their artifact ids are recorded and must be the ones a consumer uses)."""

    name: str
    command: str
    settings: dict[str, tuple[str, str]]
    input_files: dict[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()


def _same(*keys: str) -> dict[str, tuple[str, str]]:
    return {k: (k, k) for k in keys}


ODE_PAIRS = Stage(
    "ode_pairs", "python -m src.train experiment=ode_pairs",
    {**_same("world.name", "world.ode_teacher", "world.text_encoder", "world.latent", "world.negative_prompt"),
     "num_frames": ("task.num_frames", "ode_pairs.num_frames"), "num_steps": ("task.num_steps", "ode_pairs.num_steps"),
     "shift": ("task.shift", "ode_pairs.shift"), "guidance": ("task.guidance", "ode_pairs.guidance"),
     "save_indices": ("task.save_indices", "ode_pairs.save_indices"), "seed": ("task.seed", "ode_pairs.seed"),
     "num_prompts": ("data.num_prompts", "ode_pairs.num_prompts"), "prompts": ("data.source", "ode_pairs.prompts")},
    {"ode_teacher": "world.ode_teacher_checkpoint"},
)
ODE_INIT = Stage(
    "ode_init", "python -m src.train experiment=ode_init",
    {**_same("world.name", "world.student"),
     "frames_per_block": ("task.frames_per_block", "world.frames_per_block"),
     "steps": ("trainer.max_steps", "world.training.ode_init_steps"),
     "lr": ("task.lr", "world.training.lr_ode_init"), "batch_size": ("data.batch_size", "world.training.batch_size")},
    {"base": "world.critic_init"},
    ("ode_pairs",),
)
# a student is read by src.generate and the demo, never by another training stage: its settings are its own config
_STUDENT_SETTINGS = _same("world.name", "world.student", "world.critic", "world.teacher", "sampler", "fkl", "task.dmd",
                          "task.optim", "task.ema", "task.num_frames", "task.gen_update_ratio", "task.min_exit_step",
                          "trainer.max_steps", "seed")
STAGES = {s.name: s for s in (ODE_PAIRS, ODE_INIT)}


def stage_of(cfg: DictConfig) -> Stage | None:
    """The stage a train config runs, by the `stage` its experiment declares (None: one without a manifest, e.g. the
    toy teacher)."""
    kind = cfg.get("stage")
    if kind in STAGES:
        return STAGES[kind]
    if kind == "student":
        name = str(cfg.task_name)
        # a student started from the base weights (task.generator_init=null) reads no ODE init
        inputs = ("ode_pairs", "ode_init") if OmegaConf.select(cfg, "task.generator_init") else ("ode_pairs",)
        return Stage(name, f"python -m src.train experiment={name}", _STUDENT_SETTINGS,
                     {"teacher": "world.teacher_checkpoint", "critic_init": "world.critic_init"}, inputs)
    return None


def _value(cfg: DictConfig, key: str):
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def settings_of(cfg: DictConfig, stage: Stage, side: str) -> dict:
    """The stage's settings read from a producer's (side 0) or a consumer's (side 1) config."""
    index = {"producer": 0, "consumer": 1}[side]
    return {name: _value(cfg, keys[index]) for name, keys in stage.settings.items()}


def input_file_digests(cfg: DictConfig, stage: Stage) -> dict[str, dict]:
    out = {}
    for name, key in stage.input_files.items():
        path = OmegaConf.select(cfg, key) or OmegaConf.select(cfg, "world.teacher_checkpoint")
        out[name] = {"path": str(path), "digest": file_digest(path)}
    return out


# ------------------------------------------------------------------------------------------- manifests


def artifact_folder(path: str | Path) -> Path:
    """The folder of an artifact (itself, or the folder holding an artifact file), its links resolved once: a published
    stage is a link that a publish may point elsewhere, and a reader must read one version, not two."""
    path = Path(path)
    return (path if path.is_dir() else path.parent).resolve()


def read_manifest(path: str | Path) -> dict | None:
    """The manifest of an artifact folder, or of the folder holding an artifact file; None when there is none."""
    manifest = artifact_folder(path) / MANIFEST
    return json.loads(manifest.read_text()) if manifest.is_file() else None


class ExportError(RuntimeError):
    """An export that is not complete: a file it must hold is missing."""


def write_manifest(export_dir: str | Path, cfg: DictConfig, stage: Stage, inputs: dict[str, dict],
                   required: list[str | Path] = ()) -> dict:
    """manifest.json for the files in export_dir, written only when every ``required`` file (the files the stage's
    export step wrote) is there; returns it (with its ``id``, a digest of everything but the time)."""
    export_dir = Path(export_dir)
    missing = [str(f) for f in required if not (export_dir / f).is_file()]
    if missing:
        raise ExportError(f"the export in {export_dir} is incomplete (missing {', '.join(missing)}): no manifest "
                          "written; resume the run from its last checkpoint to export again")
    files = {str(p.relative_to(export_dir)): file_digest(p) for p in sorted(export_dir.rglob("*"))
             if p.is_file() and p.name not in (MANIFEST, PUBLISHED) and not p.name.startswith(".")}
    body = {
        "stage": stage.name,
        "settings": settings_of(cfg, stage, "producer"),
        "input_files": input_file_digests(cfg, stage),
        "inputs": {name: {"id": m["id"], "path": m.get("_path"), "run_dir": m.get("run_dir")} for name, m in inputs.items()},
        "files": files,
    }
    manifest = {"id": hashlib.sha256(_canonical(body).encode()).hexdigest()[:16], **body,
                "run_dir": str(OmegaConf.select(cfg, "paths.output_dir", default="")),
                "created": time.strftime("%Y-%m-%d %H:%M:%S"), "command": stage.command,
                "config": OmegaConf.to_container(cfg, resolve=True)}
    atomic_write_text(export_dir / MANIFEST, json.dumps(manifest, indent=2, default=str))
    return manifest


def verify_artifact(path: str | Path) -> dict | None:
    """At a load site: the files of the artifact at ``path`` are those its manifest recorded (None when it has none)."""
    folder = artifact_folder(path)
    manifest = read_manifest(folder)
    if manifest is None:
        return None
    for name, digest in manifest["files"].items():
        file = folder / name
        if not file.is_file():
            raise ProvenanceError(f"{file} is listed in {folder / MANIFEST} but missing; rebuild: {manifest['command']}")
        if file_digest(file) != digest:
            raise ProvenanceError(f"{file} differs from what {folder / MANIFEST} recorded (changed after it was "
                                  f"written); rebuild: {manifest['command']}")
    return manifest


class ProvenanceError(RuntimeError):
    pass


class MissingStageError(FileNotFoundError):
    pass


def _describe(value) -> str:
    text = _canonical(value) if isinstance(value, dict | list) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def mismatches(manifest: dict, cfg: DictConfig, stage: Stage, current_inputs: dict[str, dict] | None = None
               ) -> list[tuple[str | None, str]]:
    """(the consumer's config key or None, what differs) between an artifact's manifest and what ``cfg`` expects."""
    problems = []
    for name, value in settings_of(cfg, stage, "consumer").items():
        made = manifest["settings"].get(name)
        if made != value:
            key = stage.settings[name][1]
            problems.append((key, f"{key}: made with {_describe(made)}, this run expects {_describe(value)}"))
    for name, now in input_file_digests(cfg, stage).items():
        made = manifest["input_files"].get(name, {})
        if made.get("digest") != now["digest"]:
            key = stage.input_files[name] if OmegaConf.select(cfg, stage.input_files[name]) else "world.teacher_checkpoint"
            problems.append((_source_key(cfg, key), f"{name} weights: made from {made.get('path')} "
                             f"({str(made.get('digest'))[:12]}), this run uses {now['path']} ({now['digest'][:12]})"))
    for name, current in (current_inputs or {}).items():
        made = manifest["inputs"].get(name)
        if made is not None and made["id"] != current["id"]:
            problems.append((None, f"{name}: made from {name} {made['id']} (run {made.get('run_dir')}), "
                                   f"this run uses {name} {current['id']} (run {current.get('run_dir')})"))
    return problems


def _source_key(cfg: DictConfig, key: str) -> str:
    """The key a value is set at: ``world.ode_teacher_checkpoint: ${world.teacher_checkpoint}`` gives
    world.teacher_checkpoint, the key whose override changes every stage that reads it."""
    for _ in range(8):
        parent, _, leaf = key.rpartition(".")
        node = OmegaConf.select(cfg, parent) if parent else cfg
        raw = node._get_node(leaf)._value() if OmegaConf.is_dict(node) and leaf in node else None
        match = re.fullmatch(r"\$\{([\w.]+)\}", raw) if isinstance(raw, str) else None
        if match is None:
            return key
        key = match.group(1)
    return key


def _override(key: str, value) -> str:
    text = value if isinstance(value, str) and value and " " not in value else json.dumps(value)
    return f"{key}={text}"


def load_input(cfg: DictConfig, consumer: str, stage: Stage, current_inputs: dict[str, dict]) -> dict:
    """The manifest of the input ``stage`` named by ``inputs.<stage>``; refuses a missing or mismatched one."""
    path = Path(str(OmegaConf.select(cfg, f"inputs.{stage.name}")))
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        raise MissingStageError(f"{consumer} needs {stage.name} at {path}, which does not exist: run "
                                f"`{stage.command}` first (or point inputs.{stage.name} at a run's export folder)")
    manifest = read_manifest(path)
    if manifest is None:
        raise ProvenanceError(f"{path} has no {MANIFEST} (made before provenance was recorded): rebuild it with "
                              f"`{stage.command}`")
    problems = mismatches(manifest, cfg, stage, {k: v for k, v in current_inputs.items() if k in stage.inputs})
    if problems:
        overrides = [_override(key, _value(cfg, key)) for key, _ in problems if key is not None]
        raise ProvenanceError(
            f"{consumer} refuses {stage.name} at {path} (run {manifest.get('run_dir')}):\n  "
            + "\n  ".join(message for _, message in problems)
            + f"\nrebuild it with: {' '.join([stage.command, *overrides])}"
            + f"\n(or point inputs.{stage.name} at an export folder made with these settings)")
    manifest["_path"] = str(path)
    return manifest


def _carried_overrides() -> list[str]:
    """The command-line overrides a missing stage must be built with too: the world and the paths (where it lands)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    keep = ("world=", "world.", "paths.", "ode_pairs.", "+world", "inputs.")
    return [o for o in HydraConfig.get().overrides.task if o.startswith(keep) and " " not in o]


def check_missing_inputs(cfg: DictConfig) -> None:
    """Every input stage of the stage ``cfg`` runs that does not exist, in chain order, each with its command, in one
    error (MissingStageError); before any check of their contents (check_inputs)."""
    stage = stage_of(cfg)
    if stage is None:
        return
    missing = []
    for name in (s for s in STAGES if s in stage.inputs):  # STAGES is in chain order
        path = Path(str(OmegaConf.select(cfg, f"inputs.{name}")))
        if not path.exists() or (path.is_dir() and not any(path.iterdir())):
            missing.append((name, path))
    if missing:
        extra = " ".join(_carried_overrides())
        lines = [f"  {i}. {name} (expected at {path}): {STAGES[name].command}{' ' + extra if extra else ''}"
                 for i, (name, path) in enumerate(missing, 1)]
        raise MissingStageError(
            f"{stage.name} needs {len(missing)} stage output(s) that do not exist; run, in this order:\n"
            + "\n".join(lines) + "\n(or point inputs.<stage> at a run's export folder)")


def check_inputs(cfg: DictConfig) -> dict[str, dict]:
    """Every input of the stage ``cfg`` runs, checked against ``cfg``; returns their manifests by stage name."""
    stage = stage_of(cfg)
    used: dict[str, dict] = {}
    for name in stage.inputs if stage else ():
        used[name] = load_input(cfg, stage.name, STAGES[name], used)
        log.info("input %s: %s (id %s, run %s)", name, used[name]["_path"], used[name]["id"], used[name]["run_dir"])
    return used


# ------------------------------------------------------------------------------------------- publishing


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hard links where the filesystem allows (a Wan checkpoint is not copied), else a copy; True when linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
        return True
    except OSError:
        shutil.copy2(src, dst)
        return False


def verify_export(export_dir: str | Path) -> dict:
    """The manifest of a complete export: every file it lists is there with its digest (else ProvenanceError)."""
    manifest = verify_artifact(export_dir)
    if manifest is None:
        raise ProvenanceError(f"{export_dir} has no {MANIFEST}: nothing is published without provenance (an export "
                              "killed before it was complete has none; resume the run to finish it)")
    return manifest


def _versions(artifacts_dir: Path, stage: str) -> dict[int, Path]:
    """The complete version folders of a stage by number (a version is renamed to its name only once complete)."""
    folder = artifacts_dir / VERSIONS / stage
    found = {}
    for p in folder.iterdir() if folder.is_dir() else ():
        number = p.name.split("-", 1)[0]
        if p.is_dir() and not p.name.startswith(".") and number.isdigit():
            found[int(number)] = p
    return found


def _version_name(number: int, manifest: dict | None) -> str:
    return f"{number:06d}-{(manifest or {}).get('id', 'unrecorded')}"


def tidy_stage(artifacts_dir: str | Path, stage: str) -> None:
    """What interrupted publishers left, repaired (call it holding the stage's lock): their temporaries go; a stage
    folder published before stages were links becomes a version; a missing or dangling link (a kill between the
    aside-rename and the rename-in of the folder swap of old, or before a first link) points at the newest complete
    version again; a version made but never linked goes, and so do replaced ones, but the last and any replaced in
    the last REPLACED_GRACE_S seconds (a reader may be in them)."""
    artifacts_dir = Path(artifacts_dir)
    link = artifacts_dir / stage
    versions_dir = artifacts_dir / VERSIONS / stage
    versions_dir.mkdir(parents=True, exist_ok=True)
    clean_partial(versions_dir)  # a killed publisher's version folder, never renamed to its name
    versions = _versions(artifacts_dir, stage)
    number = max(versions, default=0) + 1
    asides = sorted(artifacts_dir.glob(f".{stage}{OLD_MARK}*"))  # the folder swap of old, killed between renames
    if link.is_dir() and not link.is_symlink():  # published before stages were links: the folder becomes a version
        versions[number] = versions_dir / _version_name(number, read_manifest(link))
        os.replace(link, versions[number])
        number += 1
    elif not os.path.lexists(link) and asides:
        versions[number] = versions_dir / _version_name(number, read_manifest(asides[-1]))
        os.replace(asides[-1], versions[number])
        number += 1
    for leftover in [*artifacts_dir.glob(f".{stage}{OLD_MARK}*"), *artifacts_dir.glob(f".{stage}{TMP_MARK}*")]:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover)
        else:
            leftover.unlink()
    if versions and not link.exists():  # missing, or pointing at nothing
        replace_link(link, os.path.relpath(versions[max(versions)], artifacts_dir))
    by_folder = {v.resolve(): n for n, v in versions.items()}
    current = by_folder.get(link.resolve()) if link.exists() else None
    if current is None:
        return
    order = sorted(versions)
    replaced_at = {n: versions[after].stat().st_mtime for n, after in zip(order, order[1:])}
    previous = max((n for n in versions if n < current), default=None)
    for n, folder in versions.items():
        never_linked = n > current  # made by a publisher killed before its swap: no reader ever saw it
        if never_linked or (n < current and n != previous and time.time() - replaced_at[n] > REPLACED_GRACE_S):
            shutil.rmtree(folder)


def publish(export_dir: str | Path, artifacts_dir: str | Path, stage: str) -> Path:
    """Verifies the export (complete, unchanged since its manifest), copies it (hard links where possible) into a new
    version folder with ``published.json`` naming its run, then points ``<artifacts_dir>/<stage>`` at it in one rename.
    Returns the stage link. The published files' mode follows the umask (0644 under the usual 022)."""
    export_dir, artifacts_dir = Path(export_dir), Path(artifacts_dir)
    manifest = verify_export(export_dir)
    link = artifacts_dir / stage
    with exclusive_lock(artifacts_dir / f".{stage}.lock"):
        tidy_stage(artifacts_dir, stage)
        versions = _versions(artifacts_dir, stage)
        version = artifacts_dir / VERSIONS / stage / _version_name(max(versions, default=0) + 1, manifest)
        mode = file_mode()
        with atomic_path(version) as tmp:
            copied = False
            for name in manifest["files"]:
                copied |= not _link_or_copy(export_dir / name, tmp / name)
                os.chmod(tmp / name, mode)
            shutil.copy2(export_dir / MANIFEST, tmp / MANIFEST)
            record = {"stage": stage, "id": manifest["id"], "run_dir": manifest["run_dir"],
                      "export_dir": str(export_dir), "published": time.strftime("%Y-%m-%d %H:%M:%S"),
                      "host": socket.gethostname(), "pid": os.getpid()}
            (tmp / PUBLISHED).write_text(json.dumps(record, indent=2))
            for file in (tmp / MANIFEST, tmp / PUBLISHED):
                os.chmod(file, mode)
            if copied:  # a copy is read back (a hard link is the verified file itself)
                verify_export(tmp)
        replace_link(link, os.path.relpath(version, artifacts_dir))
        tidy_stage(artifacts_dir, stage)  # the version replaced now stays (a reader may be in it), older ones go
    return link


def stale_reason(cfg: DictConfig) -> str | None:
    """Why the published output of the stage ``cfg`` runs must be rebuilt (None: it is current). Used by src.demo:
    the published manifest is compared with the settings this config would make it with, its input files and the
    upstream artifacts published now."""
    stage = stage_of(cfg)
    target = Path(str(cfg.paths.artifacts_dir)) / stage.name
    manifest = read_manifest(target)
    if manifest is None:
        return "not built yet" if not target.exists() else f"{target} has no {MANIFEST}"
    problems = []
    made = manifest["settings"]
    for name, value in settings_of(cfg, stage, "producer").items():
        if made.get(name) != value:
            problems.append(f"{stage.settings[name][0]}: {_describe(made.get(name))} -> {_describe(value)}")
    for name, now in input_file_digests(cfg, stage).items():
        if manifest["input_files"].get(name, {}).get("digest") != now["digest"]:
            problems.append(f"{name} weights changed ({now['path']})")
    for name in stage.inputs:
        upstream = read_manifest(Path(str(cfg.paths.artifacts_dir)) / name)
        if upstream is None or manifest["inputs"].get(name, {}).get("id") != upstream["id"]:
            problems.append(f"{name} was rebuilt")
    return "; ".join(problems) or None
