"""The one exception type the CLI turns into a clear one-line message instead of a traceback."""


class DfadError(Exception):
    """A problem the user can fix: bad input, missing file, missing optional dependency."""


def missing_extra(package: str, extra: str, why: str) -> DfadError:
    return DfadError(f"{why} needs '{package}', which is not installed: pip install 'dfad-edge[{extra}]'")
