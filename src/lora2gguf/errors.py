"""Typed errors. Library code raises these with a message a user can act on; only the CLI
turns them into exit codes and coloured text."""

from __future__ import annotations


class Lora2GGUFError(Exception):
    """Base class: a problem the user can fix. The message says what and how."""

    exit_code = 2


class InputError(Lora2GGUFError):
    """An input file or folder is missing, malformed or inconsistent."""


class HubError(InputError):
    """A hub id could not be resolved: a missing, private or gated repo, a revision that does not
    exist, no token, the hub out of reach, or offline without the files in the cache."""


class FormatError(InputError):
    """A file does not follow its format (safetensors header, JSON, index)."""


class UnsupportedError(Lora2GGUFError):
    """A feature lora2gguf does not handle yet (an adapter feature, an architecture, a weight format)."""


class BlockedError(Lora2GGUFError):
    """doctor found a blocking problem and the user did not --accept it."""


class OutputError(Lora2GGUFError):
    """Writing an output failed (disk full, permissions, another run holds the folder)."""


class NumericError(Lora2GGUFError):
    """A merged tensor contains NaN or Inf."""


class VerifyError(Lora2GGUFError):
    """A required verification check failed."""

    exit_code = 3
