"""Error types of metabench: one base class so the CLI can print clean messages."""


class MetabenchError(Exception):
    """A user-facing error: the message names the file or name and says what is wrong."""


class DataError(MetabenchError):
    """A dataset file or cache is missing, corrupt, or does not match its definition."""


class ResultsError(MetabenchError):
    """A result file is malformed or inconsistent."""


class UnknownNameError(MetabenchError, KeyError):
    """An unknown method, benchmark or source name (the message suggests the closest match)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


def unknown(kind: str, name: str, known: list[str]) -> UnknownNameError:
    """Build an UnknownNameError for `name` that suggests the closest of `known`."""
    import difflib

    close = difflib.get_close_matches(name, known, n=1, cutoff=0.4)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return UnknownNameError(f"unknown {kind} {name!r}.{hint} Known: {', '.join(sorted(known))}")


class MethodError(MetabenchError, ValueError):
    """A method broke the contract while running (logits of the wrong shape, NaN, a bad state_dict)."""
