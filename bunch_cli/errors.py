"""Exit codes a script can rely on, and the one error type the commands raise."""

from enum import IntEnum
from typing import Any


class ExitCode(IntEnum):
    OK = 0
    JOB_FAILED = 1  # with --wait / watch / export: a job or an export ended failed or canceled
    USAGE = 2  # bad arguments, or a request the server refused as invalid (400, 413, 415, 422)
    AUTH = 3  # 401 / 403: a missing or wrong API key
    NOT_FOUND = 4  # 404 / 409: no such job (or route), or not possible in the job's state
    SERVER = 5  # the server is unreachable, timed out or answered 5xx
    BUDGET = 6  # 402: the job would cost more than is left of the project's budget
    INTERRUPTED = 130


class CliError(Exception):
    """A failure to report to the user as one readable message, then exit with `exit_code`."""

    def __init__(
        self,
        message: str,
        exit_code: ExitCode,
        status: int | None = None,
        detail: str | None = None,
        body: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status
        self.detail = detail
        self.body = body  # the server's whole error answer (a 402 carries the budget's figures)


def usage(message: str) -> CliError:
    return CliError(message, ExitCode.USAGE)


def exit_code_for_status(status: int) -> ExitCode:
    if status in (401, 403):
        return ExitCode.AUTH
    if status == 402:
        return ExitCode.BUDGET
    if status in (404, 405, 409, 410):
        return ExitCode.NOT_FOUND
    if status == 429 or status >= 500:
        return ExitCode.SERVER
    return ExitCode.USAGE
