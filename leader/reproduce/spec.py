"""The pipeline file: what a study runs, read from YAML into a checked `Pipeline`.

    pipeline = load_pipeline("configs/paper.yaml", profile=None)

A pipeline file names:
- `datasets`: each shard set to build: its adapter, its `root` as the dataset is distributed,
  `build` flags of `leader shards build` (with `options` for the adapter's `--option`s), and
  whether the student distils from it (`pretrain`, true by default);
- `teachers`: each teacher's `kind`, `model` (weights file or folder) and `options`, with
  `precompute` flags of `leader precompute`; or `make`, a `leader` command that makes the weights
  inside the output folder (the demo trains its own teachers);
- `students`: each student's trainer `config`, `set` overrides and `datasets` (default: every
  pretraining dataset);
- `evaluations`: `leader eval PROTOCOL` runs, each on one `dataset`, over `representations`, with
  `options` that become that command's flags; a list, or a mapping by name (so that a profile can
  add evaluations or change one);
- `report`: `claims` to mark PASS/FAIL (a list, or a mapping by name), the `tables` and `figures`
  laid out as a paper has them, and `notes` (paragraphs of text);
- `profiles`: named partial pipelines merged over the rest with `--profile NAME` (e.g. a smoke
  run on a few images of each dataset before the real one).

Relative paths (roots, models, configs) are read from the pipeline file's own folder. Every key is
checked; a wrong one is one LeaderError naming the file and the key.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from leader.errors import LeaderError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# The representation kinds that name several representations; every other kind is passed through.
GROUP_KINDS = ("concat", "average")
TEACHER_IN_OWN_PROCESS = ("cxr-foundation",)      # these load TensorFlow, which must not share torch's process

TOP_KEYS = {"name", "title", "datasets", "teachers", "students", "evaluations", "protocol_options", "report", "profiles"}
DATASET_KEYS = {"adapter", "root", "pretrain", "build"}
TEACHER_KEYS = {"kind", "model", "options", "precompute", "own_process", "make"}
MAKE_KEYS = {"command", "dataset", "output", "options", "own_process"}
STUDENT_KEYS = {"config", "set", "datasets"}
EVALUATION_KEYS = {"name", "protocol", "dataset", "representations", "options"}
REPRESENTATION_KEYS = {"label", "repr"}
REPORT_KEYS = {"claims", "tables", "figures", "notes"}
TABLE_KEYS = {"title", "rows", "columns", "note"}
COLUMN_KEYS = {"title", "evaluation", "metric", "fraction"}
FIGURE_KEYS = {"title", "evaluation", "figure", "representations"}


@dataclass(frozen=True)
class Dataset:
    name: str                       # the shard set's name (the manifest's dataset name)
    adapter: str                    # `leader shards build ADAPTER`
    root: Path | None               # None: the adapter needs no files (the phantom)
    pretrain: bool
    build: dict                     # flags of `leader shards build`; "options" -> --option key=value


@dataclass(frozen=True)
class MakeTeacher:
    """A `leader` command that writes a teacher's weights to `--out OUT/teachers/OUTPUT`."""

    command: tuple[str, ...]        # e.g. ("demo", "teacher", "disease")
    dataset: str | None             # its --shards, when it learns from a shard set
    output: str                     # file or folder name under OUT/teachers
    options: dict                   # its other flags
    own_process: bool


@dataclass(frozen=True)
class Teacher:
    name: str                       # the cache's teacher name: disease, anatomy, ...
    kind: str
    model: Path | None              # None when `make` writes it
    options: dict                   # --option key=value
    precompute: dict                # flags of `leader precompute`
    own_process: bool
    make: MakeTeacher | None = None


@dataclass(frozen=True)
class Student:
    name: str                       # the run folder OUT/NAME; representations call it by this name
    config: Path
    overrides: tuple[str, ...]      # --set key=value
    datasets: tuple[str, ...]


@dataclass(frozen=True)
class Representation:
    label: str                      # names its folder, its table row and its step
    text: str                       # as written in the pipeline file (student names unresolved)


@dataclass(frozen=True)
class Evaluation:
    name: str
    protocol: str                   # `leader eval PROTOCOL`
    dataset: str
    representations: tuple[Representation, ...]
    options: dict                   # that command's flags


@dataclass(frozen=True)
class Pipeline:
    name: str
    title: str
    path: Path
    profile: str | None
    datasets: dict[str, Dataset]
    teachers: dict[str, Teacher]
    students: dict[str, Student]
    evaluations: list[Evaluation]
    report: dict = field(default_factory=dict)

    def evaluation(self, name: str) -> Evaluation:
        return next(e for e in self.evaluations if e.name == name)


def load_pipeline(path: str | Path, profile: str | None = None) -> Pipeline:
    path = Path(path)
    if not path.is_file():
        raise LeaderError(f"pipeline file {path} not found")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise LeaderError(f"pipeline file {path} is not valid YAML: {e}") from None
    return parse_pipeline(raw, path, profile)


def parse_pipeline(raw, path: Path, profile: str | None = None) -> Pipeline:
    where = str(path)
    raw = _mapping(raw, where)
    _known(raw, TOP_KEYS, where)
    profiles = _mapping(raw.pop("profiles", None) or {}, f"{where}: profiles")
    if profile is not None:
        if profile not in profiles:
            raise LeaderError(f"{where}: no profile {profile!r}; it has {sorted(profiles) or 'none'}")
        raw = merge(raw, _mapping(profiles[profile], f"{where}: profiles.{profile}"))
        _known(raw, TOP_KEYS - {"profiles"}, f"{where}: profiles.{profile}")
    base = path.resolve().parent
    name = _name(raw.get("name"), f"{where}: name")
    datasets = {k: _dataset(k, v, base, f"{where}: datasets.{k}")
                for k, v in _mapping(raw.get("datasets"), f"{where}: datasets").items()}
    if not datasets:
        raise LeaderError(f"{where}: datasets is empty; name at least one dataset to build")
    teachers = {k: _teacher(k, v, base, datasets, f"{where}: teachers.{k}")
                for k, v in _mapping(raw.get("teachers") or {}, f"{where}: teachers").items()}
    students = {k: _student(k, v, base, datasets, teachers, f"{where}: students.{k}")
                for k, v in _mapping(raw.get("students") or {}, f"{where}: students").items()}
    clash = set(students) & (set(datasets) | {"teacher", "run", "timm", *GROUP_KINDS})
    if clash:
        raise LeaderError(f"{where}: student name {sorted(clash)[0]!r} is taken; name students apart from "
                          "datasets and representation kinds")
    defaults = _mapping(raw.get("protocol_options") or {}, f"{where}: protocol_options")
    evaluations = []
    for i, entry in enumerate(_named_list(raw.get("evaluations") or [], f"{where}: evaluations")):
        evaluations.append(_evaluation(entry, defaults, datasets, f"{where}: evaluations[{i}]"))
    names = [e.name for e in evaluations]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise LeaderError(f"{where}: evaluation name {repeated[0]!r} is used twice; names must be unique")
    report = _report(raw.get("report") or {}, evaluations, f"{where}: report")
    return Pipeline(name, str(raw.get("title") or name), path, profile, datasets, teachers, students, evaluations, report)


def merge(base: dict, override: dict) -> dict:
    """`override` over `base`: mappings merge key by key, anything else (lists too) is replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def representation_label(text: str) -> str:
    """A folder- and step-safe name for a representation: `teacher:disease` -> `teacher-disease`."""
    return re.sub(r"[^A-Za-z0-9_.+-]+", "-", text).strip("-")


def split_group(text: str) -> tuple[str | None, list[str]]:
    """`concat:A+B` -> ("concat", [A, B]); anything else -> (None, [text])."""
    kind, sep, rest = text.partition(":")
    if sep and kind in GROUP_KINDS:
        return kind, rest.split("+")
    return None, [text]


# ---------------------------------------------------------------------------------------------
# Sections


def _dataset(name: str, raw, base: Path, where: str) -> Dataset:
    _name(name, where)
    raw = _mapping(raw if raw is not None else {}, where)
    _known(raw, DATASET_KEYS, where)
    build = _mapping(raw.get("build") or {}, f"{where}.build")
    for key in ("out", "root", "name", "overwrite"):
        if key in build:
            raise LeaderError(f"{where}.build.{key}: set by the pipeline itself; remove it")
    root = raw.get("root")
    return Dataset(name, str(raw.get("adapter") or name), _path(root, base) if root is not None else None,
                   _bool(raw.get("pretrain", True), f"{where}.pretrain"), build)


def _teacher(name: str, raw, base: Path, datasets: dict, where: str) -> Teacher:
    _name(name, where)
    raw = _mapping(raw, where)
    _known(raw, TEACHER_KEYS, where)
    if "kind" not in raw:
        raise LeaderError(f"{where}: needs a kind (cxr-foundation, cxr-foundation-import, adam, timm, ...)")
    kind = str(raw["kind"])
    if ("model" in raw) == ("make" in raw):
        raise LeaderError(f"{where}: give exactly one of model (the weights you hold) or make (a command that makes them)")
    make = None
    if "make" in raw:
        make = _make(_mapping(raw["make"], f"{where}.make"), datasets, f"{where}.make")
    precompute = _mapping(raw.get("precompute") or {}, f"{where}.precompute")
    for key in ("teacher", "shards", "cache", "kind", "model", "option", "config", "overwrite_teacher"):
        if key in precompute:
            raise LeaderError(f"{where}.precompute.{key}: set by the pipeline itself; remove it")
    own = raw.get("own_process", kind in TEACHER_IN_OWN_PROCESS)
    return Teacher(name, kind, _path(raw["model"], base) if "model" in raw else None,
                   _mapping(raw.get("options") or {}, f"{where}.options"), precompute, _bool(own, f"{where}.own_process"),
                   make)


def _make(raw: dict, datasets: dict, where: str) -> MakeTeacher:
    _known(raw, MAKE_KEYS, where)
    command = raw.get("command")
    if isinstance(command, str):
        command = command.split()
    if not command or not all(isinstance(c, str) for c in command):
        raise LeaderError(f"{where}.command: the leader subcommand that makes the weights, e.g. [demo, teacher, disease]")
    dataset = raw.get("dataset")
    if dataset is not None and dataset not in datasets:
        raise LeaderError(f"{where}.dataset: {dataset!r} is not in datasets ({', '.join(datasets)})")
    output = raw.get("output")
    if not isinstance(output, str) or not output or "/" in output or output.startswith("."):
        raise LeaderError(f"{where}.output: a file or folder name for the weights, e.g. anatomy.pth")
    return MakeTeacher(tuple(command), dataset, output, _mapping(raw.get("options") or {}, f"{where}.options"),
                       _bool(raw.get("own_process", False), f"{where}.own_process"))


def _student(name: str, raw, base: Path, datasets: dict, teachers: dict, where: str) -> Student:
    _name(name, where)
    raw = _mapping(raw, where)
    _known(raw, STUDENT_KEYS, where)
    if "config" not in raw:
        raise LeaderError(f"{where}: needs a config (the trainer's YAML, e.g. leader-swinb.yaml)")
    overrides = raw.get("set") or []
    if isinstance(overrides, dict):
        overrides = [f"{k}={option_value(v)}" for k, v in overrides.items()]
    overrides = [str(o) for o in _list(overrides, f"{where}.set")]
    for item in overrides:
        if "=" not in item:
            raise LeaderError(f"{where}.set: {item!r} is not key=value")
    chosen = raw.get("datasets")
    if chosen is None:
        chosen = [d for d, entry in datasets.items() if entry.pretrain]
    for d in _list(chosen, f"{where}.datasets"):
        if d not in datasets:
            raise LeaderError(f"{where}.datasets: {d!r} is not in datasets ({', '.join(datasets)})")
    if not chosen:
        raise LeaderError(f"{where}: no dataset to distil from (no dataset has pretrain: true)")
    if not teachers:
        raise LeaderError(f"{where}: a student needs teachers; the pipeline names none")
    return Student(name, _path(raw["config"], base), tuple(overrides), tuple(chosen))


def _evaluation(raw, defaults: dict, datasets: dict, where: str) -> Evaluation:
    raw = _mapping(raw, where)
    _known(raw, EVALUATION_KEYS, where)
    for key in ("name", "protocol", "dataset", "representations"):
        if key not in raw:
            raise LeaderError(f"{where}: needs {key!r}")
    name = _name(raw["name"], f"{where}.name")
    if raw["dataset"] not in datasets:
        raise LeaderError(f"{where}.dataset: {raw['dataset']!r} is not in datasets ({', '.join(datasets)})")
    protocol = str(raw["protocol"])
    options = merge(_mapping(defaults.get(protocol) or {}, f"protocol_options.{protocol}"),
                    _mapping(raw.get("options") or {}, f"{where}.options"))
    for key in ("shards", "out", "repr", "ensemble"):
        if key in options:
            raise LeaderError(f"{where}.options.{key}: set by the pipeline itself; remove it")
    reps = []
    for j, item in enumerate(_list(raw["representations"], f"{where}.representations")):
        if isinstance(item, dict):
            _known(item, REPRESENTATION_KEYS, f"{where}.representations[{j}]")
            if "repr" not in item:
                raise LeaderError(f"{where}.representations[{j}]: needs 'repr'")
            text = str(item["repr"])
            label = str(item.get("label") or representation_label(text))
        else:
            text = str(item)
            label = representation_label(text)
        _name(label, f"{where}.representations[{j}] label")
        reps.append(Representation(label, text))
    if not reps:
        raise LeaderError(f"{where}.representations is empty")
    labels = [r.label for r in reps]
    if len(set(labels)) != len(labels):
        raise LeaderError(f"{where}.representations: two representations share the label "
                          f"{next(x for x in labels if labels.count(x) > 1)!r}; give one a label")
    return Evaluation(name, protocol, str(raw["dataset"]), tuple(reps), options)


def _report(raw, evaluations: list[Evaluation], where: str) -> dict:
    raw = _mapping(raw, where)
    _known(raw, REPORT_KEYS, where)
    by_name = {e.name: e for e in evaluations}

    def evaluation(name, at: str) -> Evaluation:
        if name not in by_name:
            raise LeaderError(f"{at}: evaluation {name!r} is not in evaluations")
        return by_name[name]

    claims = _named_list(raw.get("claims") or [], f"{where}.claims")
    for i, claim in enumerate(claims):
        claim = _mapping(claim, f"{where}.claims[{i}]")
        if "evaluation" in claim:
            evaluation(claim["evaluation"], f"{where}.claims[{i}]")
    tables = _list(raw.get("tables") or [], f"{where}.tables")
    for i, table in enumerate(tables):
        at = f"{where}.tables[{i}]"
        _known(_mapping(table, at), TABLE_KEYS, at)
        columns = _list(table.get("columns"), f"{at}.columns")
        if not columns:
            raise LeaderError(f"{at}.columns: a table needs columns (each an evaluation)")
        for j, column in enumerate(columns):
            _known(_mapping(column, f"{at}.columns[{j}]"), COLUMN_KEYS, f"{at}.columns[{j}]")
            evaluation(column.get("evaluation"), f"{at}.columns[{j}]")
        for row in _list(table.get("rows") or [], f"{at}.rows"):
            if not any(r.label == row for c in columns for r in by_name[c["evaluation"]].representations):
                raise LeaderError(f"{at}.rows: no column's evaluation has a representation labelled {row!r}")
    figures = _list(raw.get("figures") or [], f"{where}.figures")
    for i, figure in enumerate(figures):
        at = f"{where}.figures[{i}]"
        _known(_mapping(figure, at), FIGURE_KEYS, at)
        for key in ("title", "evaluation", "figure"):
            if key not in figure:
                raise LeaderError(f"{at}: needs {key!r}")
        evaluation(figure["evaluation"], at)
    notes = [str(n) for n in _list(raw.get("notes") or [], f"{where}.notes")]
    return {"claims": claims, "tables": tables, "figures": figures, "notes": notes}


# ---------------------------------------------------------------------------------------------
# Values


def flag_value(value) -> str:
    """A YAML value as a command-line value: lists comma-joined (--fraction 0.05,0.1), mappings as JSON
    (a YAML flow mapping, as --option and --set read them), everything else as YAML writes it."""
    import json

    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return ",".join(flag_value(v) for v in value)
    return json.dumps(value)


def option_value(value) -> str:
    """A value for `--option key=value` (read back with yaml.safe_load): lists and mappings as JSON."""
    import json

    return value if isinstance(value, str) else json.dumps(value)


def _named_list(value, where: str) -> list:
    """A list of mappings, or a mapping of them by name (which a profile can extend by merging)."""
    if isinstance(value, dict):
        return [{"name": name, **_mapping(entry, f"{where}.{name}")} for name, entry in value.items()]
    return _list(value, where)


def _mapping(value, where: str) -> dict:
    if not isinstance(value, dict):
        raise LeaderError(f"{where}: expected a mapping, got {type(value).__name__}")
    return value


def _list(value, where: str) -> list:
    if not isinstance(value, list):
        raise LeaderError(f"{where}: expected a list, got {type(value).__name__}")
    return value


def _known(raw: dict, allowed: set, where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise LeaderError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")


def _name(value, where: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.match(value):
        raise LeaderError(f"{where}: {value!r} is not a name (letters, digits, _ . + -)")
    return value


def _bool(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise LeaderError(f"{where}: expected true or false, got {value!r}")
    return value


def _path(value, base: Path) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else base / path
