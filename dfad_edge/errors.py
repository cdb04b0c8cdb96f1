"""The one exception type the CLI turns into a clear one-line message instead of a traceback."""


class DfadError(Exception):
    """A problem the user can fix: bad input, missing file, missing optional dependency."""

    def user_message(self) -> str:
        """The message alone. Raised in a DataLoader worker (e.g. an unreadable image), the error is re-raised in the
        main process with the worker's traceback as its text; the original message is that traceback's last line."""
        text = str(self)
        if "Original Traceback" in text:
            last = text.strip().splitlines()[-1]
            return last.split("DfadError: ", 1)[-1]
        return text


def missing_extra(package: str, extra: str, why: str) -> DfadError:
    return DfadError(f"{why} needs '{package}', which is not installed: pip install 'dfad-edge[{extra}]'")
