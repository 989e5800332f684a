"""Client mistakes are not server errors in the logs: Ray Serve logs every exception a replica method raises
as ERROR with its traceback ("Request failed."); for the errors a client causes (a bad request, a missing
key, overload) that record becomes one INFO line naming the error."""

from __future__ import annotations

import logging

from overfill_serve.errors import InvalidRequestError, OverloadedError, UnauthenticatedError
from overfill_serve.serve.ray_errors import unwrap

CLIENT_ERRORS = (InvalidRequestError, UnauthenticatedError, OverloadedError)
SERVE_LOGGER = "ray.serve"  # where Serve's replicas and proxies log


class ClientErrorFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and isinstance(unwrap(error), CLIENT_ERRORS):
            cause = unwrap(error)
            record.msg, record.args = f"{record.getMessage()} {type(cause).__name__}: {cause}", ()
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.exc_info, record.exc_text = None, None
        return True


def quiet_client_errors() -> None:
    """Install the filter on Serve's logger in this process (once)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
