"""Building a :class:`~farmer_cli.config.schema.Config` from text: TOML presets, stored JSON, ``--set`` overrides.

Presets live in ``presets/*.toml`` (installed as ``farmer_cli.presets``); named sampling settings in
``presets/sampling/*.toml``. Every value passes :func:`coerce` (type, ``Literal`` choices, finite numbers) and
every result passes :meth:`Config.validate`: unknown sections or keys, wrong types and out-of-range values raise
a :class:`ConfigError` that names the key and suggests the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from farmer_cli.config.schema import SECTIONS, Config, ConfigError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def _at(origin: str) -> str:
    """Where a bad value came from, as a message prefix (none for command-line options: the key says it)."""
    return f"{origin}: " if origin else ""


def suggest(word: str, options: list[str]) -> str:
    """`` (did you mean 'x'?)`` for the nearest option, or an empty string."""
    lowered = {o.lower(): o for o in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1)
    return f" (did you mean '{lowered[close[0]]}'?)" if close else ""


def coerce(value: Any, kind: Any, name: str, origin: str) -> Any:
    """Convert ``value`` (TOML/JSON value or command-line string) to ``kind`` or raise a ConfigError."""
    if get_origin(kind) is Literal:
        choices = [str(c) for c in get_args(kind)]
        if value == "no" and "fp32" in choices:  # Accelerate's name for fp32 (older farmer configs used it)
            value = "fp32"
        if str(value) not in choices:
            raise ConfigError(f"{_at(origin)}'{name}' must be one of {', '.join(choices)}, got {value!r}"
                              f"{suggest(str(value), choices)}")
        return str(value)
    try:
        result = _convert(value, kind)
    except (TypeError, ValueError, OverflowError):
        hint = "; use true or false" if kind is bool else ""
        raise ConfigError(f"{_at(origin)}'{name}' expects {getattr(kind, '__name__', kind)}, got {value!r}{hint}") from None
    if isinstance(result, float) and not math.isfinite(result):
        raise ConfigError(f"{_at(origin)}'{name}' must be a finite number, got {value!r}")
    return result


def _convert(value: Any, kind: Any) -> Any:
    """``value`` as bool, int, float or str; ValueError where it is not one (booleans are never numbers)."""
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ValueError
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError
    if kind is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError
        return int(value)
    return float(value) if kind is float else str(value)


def _assign(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{_at(origin)}unknown section '{section}'{suggest(section, list(SECTIONS))}; "
                          f"sections: {', '.join(SECTIONS)}")
    target = getattr(cfg, section)
    fields = [f.name for f in dataclasses.fields(target)]
    if key not in fields:
        raise ConfigError(f"{_at(origin)}unknown key '{section}.{key}'{suggest(key, fields)}")
    setattr(target, key, coerce(value, get_type_hints(type(target))[key], f"{section}.{key}", origin))


def apply_dict(cfg: Config, raw: Any, origin: str) -> Config:
    """Apply a ``{section: {key: value}}`` mapping (a preset or a stored config) onto ``cfg`` and validate."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{_at(origin)}expected a table of [section] key = value, got {type(raw).__name__}")
    for section, values in raw.items():
        if section == "preset":
            cfg.preset = _preset_name(values, origin)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{_at(origin)}[{section}] must be a table of key = value")
        for key, value in values.items():
            _assign(cfg, section, key, value, origin)
    return _validated(cfg, origin)


def from_dict(raw: Any, origin: str = "config") -> Config:
    """A whole configuration (a preset, or config.json's "config"): it must set the model, whose defaults alone
    describe no model (every preset sets its [model] section)."""
    if isinstance(raw, dict) and not isinstance(raw.get("model"), dict):
        raise ConfigError(f"{_at(origin)}no [model] section: a preset or stored configuration sets the model "
                          "(see presets/tiny.toml)")
    return apply_dict(Config(), raw, origin)


def _preset_name(value: Any, origin: str) -> str:
    """A preset name becomes part of run directory names: letters, digits, '-', '_' and '.' only."""
    name = str(value)
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise ConfigError(f"{_at(origin)}preset = {value!r} must be a plain name (letters, digits, '-', '_', '.')")
    return name


def _validated(cfg: Config, origin: str) -> Config:
    try:
        return cfg.validate()
    except ConfigError as err:
        raise ConfigError(f"{_at(origin)}{err}") from None


def _preset_dir():
    """Installed: the ``farmer_cli.presets`` package (mapped from ./presets by pyproject.toml). Run from a source
    checkout (``python -m farmer_cli`` or pytest at the repository root): the ./presets folder itself."""
    try:
        return resources.files("farmer_cli.presets")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "presets"


def _names(folder) -> list[str]:
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".toml"))


def preset_names() -> list[str]:
    return _names(_preset_dir())


def sampling_preset_names() -> list[str]:
    return _names(_preset_dir() / "sampling")


def _parse_toml(text: str, origin: str) -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{_at(origin)}not valid TOML ({err})") from None
    except RecursionError:  # tomllib recurses into nested arrays and tables
        raise ConfigError(f"{_at(origin)}not a preset: its arrays or tables are nested too deeply") from None


MAX_PRESET_BYTES = 1 << 20  # the largest preset is under 3 KB


def _read_preset(path: Path) -> str:
    """The text of a preset file; ConfigError naming it when it is not a readable UTF-8 file (TOML is UTF-8)."""
    if not path.is_file():
        what = ("is a directory, not a preset file" if path.is_dir() else
                "is not a regular file (a FIFO, device or socket)" if path.exists() else "does not exist")
        raise ConfigError(f"preset file {path} {what}; give a .toml file or a preset name ({', '.join(preset_names())})")
    if path.stat().st_size > MAX_PRESET_BYTES:
        raise ConfigError(f"preset file {path}: {path.stat().st_size:,} bytes; a preset is a short TOML file (at most "
                          f"{MAX_PRESET_BYTES:,} bytes): give the right file")
    try:
        return path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"preset file {path}: unreadable ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"preset file {path}: not UTF-8 text (byte {err.start}: {err.object[err.start]:#04x}); "
                          "TOML files are UTF-8: save it as UTF-8") from None


def _preset_table(name_or_path: str) -> tuple[dict, str, Path]:
    """A preset's parsed TOML, where it comes from (for messages) and its path as given: by name (``quickstart``; a
    built-in name wins over a file of that name here) or a TOML file path."""
    if not name_or_path.strip():
        raise ConfigError(f"the preset name is empty; give one of {', '.join(preset_names())} or a .toml file")
    path = Path(name_or_path)
    if name_or_path not in preset_names() and (path.suffix == ".toml" or path.exists()):
        text, origin = _read_preset(path), str(path)
    else:
        names = preset_names()
        if name_or_path not in names:
            raise ConfigError(f"unknown preset '{name_or_path}'{suggest(name_or_path, names)}; "
                              f"available: {', '.join(names)}")
        text, origin = (_preset_dir() / f"{name_or_path}.toml").read_text(), f"preset {name_or_path}"
    return _parse_toml(text, origin), origin, path


def preset_settings(name_or_path: str) -> list[str]:
    """The settings a preset names (``section.key``), whatever their values."""
    table = _preset_table(name_or_path)[0]
    return [f"{section}.{key}" for section, keys in table.items() if isinstance(keys, dict) for key in keys]


def load_preset(name_or_path: str) -> Config:
    """Load a preset by name (``quickstart``; a built-in name wins over a file of that name here) or from a TOML
    file path."""
    table, origin, path = _preset_table(name_or_path)
    cfg = from_dict(table, origin)
    if not cfg.preset:  # named after its file: a name that does not fit a run directory's is the file's to change
        try:
            cfg.preset = _preset_name(path.stem, origin)
        except ConfigError:
            raise ConfigError(f"preset file {path}: its name '{path.stem}' names the runs (runs/<preset>-<time>) but "
                              "is not a plain name (letters, digits, '-', '_', '.'); rename the file or add a line "
                              "preset = \"my-name\"") from None
    builtins = preset_names()
    if name_or_path not in builtins and cfg.preset in builtins and table != _preset_table(cfg.preset)[0]:
        # a run records its preset's name: an edited copy under a built-in's name would pass for that preset
        # (runs/<name>-<time>, --resume --preset <name>)
        raise ConfigError(f"preset file {path}: its name '{cfg.preset}' is a built-in preset's, but its settings are "
                          f"not that preset's; give it a name of its own with a line preset = \"{cfg.preset}-mine\" "
                          "(or rename the file if it has no such line)")
    return cfg


def sampling_preset(name: str) -> dict:
    """The settings of a named sampling preset (``presets/sampling/<name>.toml``): {"sampling": {key: value}}."""
    names = sampling_preset_names()
    if name not in names:
        raise ConfigError(f"unknown sampling preset '{name}'{suggest(name, names)}; available: {', '.join(names)}")
    origin = f"sampling preset {name}"
    raw = _parse_toml((_preset_dir() / "sampling" / f"{name}.toml").read_text(), origin)
    if set(raw) - {"sampling"}:
        raise ConfigError(f"{_at(origin)}may only set [sampling] keys")
    return raw


def apply_sampling_preset(cfg: Config, name: str) -> Config:
    """Apply a named sampling setting (:func:`sampling_preset`)."""
    return apply_dict(cfg, sampling_preset(name), f"sampling preset {name}")


def _parse_override(item: str) -> tuple[str, str, str]:
    """``section.key=value`` -> (section, key, value); ConfigError for anything else."""
    if "=" not in item or "." not in item.split("=", 1)[0]:
        raise ConfigError(f"--set '{item}': expected section.key=value, e.g. --set train.lr=3e-4")
    dotted, value = item.split("=", 1)
    section, key = (part.strip() for part in dotted.split(".", 1))
    return section, key, value.strip()


def apply_overrides(cfg: Config, overrides: list[str], allowed: tuple[str, ...] = SECTIONS) -> Config:
    """Apply ``section.key=value`` strings in order, then validate; raises ConfigError on any bad one.
    ``allowed`` limits which sections may be overridden (``sample`` takes only ``sampling.*``). A setting given
    twice is refused (the last would win without a word)."""
    seen: dict[str, str] = {}
    for item in overrides:
        section, key, value = _parse_override(item)
        dotted = f"{section}.{key}"
        same = next((seen[k] for k in SAME_SETTING.get(dotted, (dotted,)) if k in seen), None)
        if same is not None:
            raise ConfigError(f"--set {same} and --set {item} both decide {dotted}: give it once")
        seen[dotted] = item
        if section in SECTIONS and section not in allowed:
            raise ConfigError(f"'{item}': only {', '.join(s + '.*' for s in allowed)} keys can be set here")
        _assign(cfg, section, key, value, "")
    return _validated(cfg, "")


# Settings that decide the same thing: the run's length is train.steps, or train.epochs where that is set.
SAME_SETTING = {"train.steps": ("train.steps", "train.epochs"), "train.epochs": ("train.steps", "train.epochs")}


def apply_options(cfg: Config, options: dict[str, tuple[str, Any]], overrides: list[str] = (),
                  allowed: tuple[str, ...] = SECTIONS) -> Config:
    """A command's settings: its typed option values, then its ``--set`` strings, then one validation.

    ``options`` maps a setting to (the option that gives it, its value), e.g. ``{"train.lr": ("--lr", 3e-4)}``;
    a value of None means the option was not given. Values are assigned as they are (no string round trip). An
    option and a ``--set`` that decide the same setting are refused (neither would win visibly)."""
    given = {key: (flag, value) for key, (flag, value) in options.items() if value is not None}
    set_keys = {".".join(_parse_override(item)[:2]): item for item in overrides}
    for key, (flag, _) in given.items():
        clash = next((set_keys[k] for k in SAME_SETTING.get(key, (key,)) if k in set_keys), None)
        if clash is not None:
            what = " / ".join(SAME_SETTING.get(key, (key,)))
            raise ConfigError(f"{flag} and --set {clash} both decide {what}: give one of them")
    for key, (flag, value) in given.items():
        section, name = key.split(".", 1)
        _assign(cfg, section, name, value, flag)
    return apply_overrides(cfg, list(overrides), allowed)
