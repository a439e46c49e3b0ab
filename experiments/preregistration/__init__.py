"""Pre-registration records: ``experiments/preregistration/<name>.toml``, one per experiment.

A record is a list of versions (``[[version]]``), appended and never edited: a change after a pilot run is a
new version, and the old one keeps its pilots and results. Each version states the hypothesis, the metric,
the arms, the seeds and the ``criterion`` (the threshold), which must equal the config's ``criterion`` for
the latest version (tests/test_provenance.py checks it). A run records the version it ran under and its
`digest`, a hash of what was registered (everything but the pilots and results added later).
"""

import hashlib
import json
import pathlib

import tomllib

FOLDER = pathlib.Path(__file__).resolve().parent
REQUIRED = {
  "version": int,
  "registered": str,
  "hypothesis": str,
  "metric": str,
  "arms": list,
  "seeds": list,
  "criterion": dict,
}
LATER = ("pilot", "result")  # Added after registration: not part of the digest.


class PreregistrationError(ValueError):
  """A record that is missing, malformed, or does not match the config; the message names the file and field."""


def path(name: str) -> pathlib.Path:
  return FOLDER / f"{name}.toml"


def _fail(where, field: str, got, expected: str):
  raise PreregistrationError(f"{where}: {field}: got {got!r:.120}, expected {expected}")


def _check_version(entry, i: int, where) -> dict:
  if not isinstance(entry, dict):
    _fail(where, f"version[{i}]", entry, "a [[version]] table")
  for field, kind in REQUIRED.items():
    if not isinstance(entry.get(field), kind) or isinstance(entry.get(field), bool):
      _fail(where, f"version[{i}].{field}", entry.get(field), f"a {kind.__name__}")
  if entry["version"] != i + 1:
    _fail(where, f"version[{i}].version", entry["version"], f"{i + 1} (versions are numbered 1, 2, ... in order)")
  if not all(isinstance(s, int) and not isinstance(s, bool) for s in entry["seeds"]):
    _fail(where, f"version[{i}].seeds", entry["seeds"], "a list of integer seeds")
  for field in LATER:
    if not isinstance(entry.get(field, []), list) or not all(isinstance(p, dict) for p in entry.get(field, [])):
      _fail(where, f"version[{i}].{field}", entry.get(field), f"[[version.{field}]] tables")
  return entry


def load(name: str, folder: pathlib.Path | None = None) -> list:
  """The versions of experiment ``name``'s record, oldest first, checked field by field."""
  where = (folder or FOLDER) / f"{name}.toml"
  try:
    record = tomllib.loads(where.read_text())
  except FileNotFoundError:
    raise PreregistrationError(f"{where}: missing; expected the pre-registration record of {name!r}") from None
  except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
    raise PreregistrationError(f"{where}: unreadable ({e}); expected a TOML record") from None
  if record.get("experiment") != name:
    _fail(where, "experiment", record.get("experiment"), repr(name))
  versions = record.get("version")
  if not isinstance(versions, list) or not versions:
    _fail(where, "version", versions, "one [[version]] table or more")
  return [_check_version(v, i, where) for i, v in enumerate(versions)]


def digest(version: dict) -> str:
  """The sha256 of what was registered in ``version`` (its fields but the pilots and results)."""
  registered = {k: v for k, v in version.items() if k not in LATER}
  return hashlib.sha256(json.dumps(registered, sort_keys=True).encode()).hexdigest()


def differences(registered: dict, criterion: dict) -> list:
  """The criterion keys whose value differs between the record and ``criterion`` (missing on one side too)."""
  return sorted(k for k in set(registered) | set(criterion) if registered.get(k) != criterion.get(k))


def check(name: str, criterion: dict, folder: pathlib.Path | None = None) -> dict:
  """The latest version of ``name``'s record; a `PreregistrationError` if its criterion is not ``criterion``."""
  latest = load(name, folder)[-1]
  changed = differences(latest["criterion"], criterion)
  if changed:
    where = (folder or FOLDER) / f"{name}.toml"
    raise PreregistrationError(
      f"{where}: version {latest['version']}: criterion differs from the config's in {changed} (record "
      f"{ {k: latest['criterion'].get(k) for k in changed} }, config { {k: criterion.get(k) for k in changed} }); "
      f"expected equal: a changed criterion is a new [[version]] of the record, with the old one kept"
    )
  return latest


def describe(name: str, criterion: dict, folder: pathlib.Path | None = None) -> dict:
  """What a run records: the record's file, latest version, its digest and whether ``criterion`` matches it.

  A missing or malformed record is recorded (``error``), not raised: the run still goes on.
  """
  try:
    latest = load(name, folder)[-1]
  except PreregistrationError as e:
    return {
      "file": f"experiments/preregistration/{name}.toml",
      "version": None,
      "digest": None,
      "criterion_matches": False,
      "error": str(e),
    }
  return {
    "file": f"experiments/preregistration/{name}.toml",
    "version": latest["version"],
    "digest": digest(latest),
    "criterion_matches": not differences(latest["criterion"], criterion),
  }
