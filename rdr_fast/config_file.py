"""Settings files of the training CLI: a run's config.json (read by --resume and by the
commands that reopen a run) and `--config FILE`, JSON or YAML by its extension.

A --config file is a mapping of flag names (``batch-size`` or ``batch_size``) to values
of the flag's type: ``{"dataset": "cifar10_lt", "lr": 0.05, "amp": false}``. YAML needs
PyYAML (``pip install "rdr_fast[yaml]"``) and is read as YAML 1.2 reads numbers, so that
``5e-4`` is a float (PyYAML alone reads it as a string).
"""
from __future__ import annotations

import difflib
import json
import os
import re

from .cli_checks import UsageError

EXTENSIONS = (".json", ".yaml", ".yml")
YAML_INSTALL = 'pip install "rdr_fast[yaml]"'


def read_config_json(path: str, context: str = "") -> dict:
    """The settings a run's config.json holds (UsageError, its message after ``context``,
    when the file cannot be read or holds no JSON object)."""
    try:
        with open(path) as handle:
            saved = json.load(handle)
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
        raise UsageError(f"{context}cannot read {path} ({exc})") from None
    if not isinstance(saved, dict):
        raise UsageError(f"{context}{path} does not hold a configuration (a JSON object)")
    return saved


def _yaml_mapping(path: str, context: str):
    try:
        import yaml
    except ImportError:
        raise UsageError(f"{context}reading YAML needs PyYAML, which is not installed: {YAML_INSTALL} "
                         "(or give the settings as a .json file)") from None

    class Loader(yaml.SafeLoader):
        """SafeLoader (no code, no custom tags) with YAML 1.2's floats: 1e-4, not only 1.0e-4."""
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    try:
        with open(path) as handle:
            values = yaml.load(handle, Loader=Loader)
    except (OSError, ValueError, yaml.YAMLError) as exc:  # ValueError: not UTF-8
        raise UsageError(f"{context}cannot read {path} ({exc})") from None
    return {} if values is None else values   # an empty file: no settings


def read_config_file(path: str, fields) -> dict:
    """The settings of ``--config path`` as {field: value} over ``fields`` (the Config field
    names). UsageError naming the file, and the key where one is at fault: a file that
    cannot be read or holds no mapping, an unknown key, a key given twice. The values
    themselves are checked by the caller."""
    context = f"--config {path}: "
    extension = os.path.splitext(path)[1].lower()
    if extension not in EXTENSIONS:
        raise UsageError(f"{context}give a {', '.join(EXTENSIONS)} file (JSON or YAML by the extension)")
    values = read_config_json(path, context) if extension == ".json" else _yaml_mapping(path, context)
    if not isinstance(values, dict):
        raise UsageError(f"{context}it does not hold settings (a mapping of flag names to values)")
    settings = {}
    for key, value in values.items():
        name = str(key).replace("-", "_")
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=3)
            hint = f" (did you mean {', '.join(k.replace('_', '-') for k in close)}?)" if close else ""
            raise UsageError(f"{context}unknown key {key!r}{hint}; the keys are the training flags' names")
        if name in settings:
            raise UsageError(f"{context}the key {key!r} is given twice (as - and _ spellings)")
        settings[name] = value
    return settings
