"""The configuration file: YAML to Settings field values by a schema of dotted keys,
each checked by its own function; every error names the file, line and key."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import yaml

from turnserver.ops.config.values import ConfigError

Schema = dict[str, tuple[str, Callable[[Any, str], Any]]]


def load_yaml_file(path: str, schema: Schema) -> dict[str, Any]:
    """Read a YAML file into Settings field values; ConfigError names key and line."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: {not_utf8(exc)}") from None
    return parse_yaml_text(text, os.path.basename(path), schema)


def not_utf8(exc: UnicodeDecodeError) -> str:
    return f"not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start})"


def parse_yaml_text(text: str, name: str, schema: Schema) -> dict[str, Any]:
    """Parse YAML text into Settings field values."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        values: dict[str, Any] = {}
        if root is None:
            return values
        if not isinstance(root, yaml.MappingNode):
            raise ConfigError(f"{name}:{root.start_mark.line + 1}: the top level must be a mapping")
        sections = {key.split(".")[0] for key in schema if "." in key}
        _walk(loader, root, "", name, values, schema, sections)
        return values
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else 0
        raise ConfigError(f"{name}:{line}: invalid YAML: {exc.problem}") from None
    finally:
        loader.dispose()


NULL_TAG = "tag:yaml.org,2002:null"


def _walk(
    loader: yaml.SafeLoader,
    node: yaml.MappingNode,
    prefix: str,
    name: str,
    values: dict[str, Any],
    schema: Schema,
    sections: set[str],
) -> None:
    for key_node, value_node in node.value:
        line = key_node.start_mark.line + 1
        key = f"{prefix}{key_node.value}"
        if key in schema:
            attr, check = schema[key]
            raw = loader.construct_object(value_node, deep=True)
            try:
                values[attr] = check(raw, key)
            except ConfigError as exc:
                raise ConfigError(f"{name}:{line}: {exc}") from None
        elif key in sections:
            if isinstance(value_node, yaml.ScalarNode) and value_node.tag == NULL_TAG:
                continue  # a section whose keys are all commented out: its defaults
            if not isinstance(value_node, yaml.MappingNode):
                raise ConfigError(f"{name}:{line}: {key}: expected a mapping")
            _walk(loader, value_node, key + ".", name, values, schema, sections)
        else:
            known = sorted(k for k in schema if k.startswith(prefix))
            hint = f" (known keys: {', '.join(known)})" if prefix else ""
            raise ConfigError(f"{name}:{line}: unknown key {key!r}{hint}")
