"""Errors reach the user as readable messages in the page, never as tracebacks."""

from __future__ import annotations

import html
import inspect
import logging
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps

import gradio as gr

from quiver.errors import QuiverError

logger = logging.getLogger("quiver.app")


def _title(kind: type[QuiverError]) -> str:
    """``NotFoundError`` -> "Not found"; the base class -> "Error"."""
    words = re.sub(r"(?<!^)(?=[A-Z])", " ", kind.__name__.removesuffix("Error")).lower()
    return words.capitalize() if kind is not QuiverError else "Error"


@contextmanager
def _as_gradio_errors() -> Iterator[None]:
    try:
        yield
    except gr.Error:
        raise
    except QuiverError as error:
        raise gr.Error(
            html.escape(str(error), quote=False), title=_title(type(error)), print_exception=False
        ) from error
    except Exception as error:  # a bug of ours: log it whole, show the user one line
        logger.exception("unexpected error in the app")
        message = html.escape(f"unexpected {type(error).__name__}: {error}", quote=False)
        raise gr.Error(message, print_exception=False) from error


def readable_errors(fn: Callable) -> Callable:
    """Wrap an event handler (a function or a generator) so any error becomes a ``gr.Error``."""
    if inspect.isgeneratorfunction(fn):

        @wraps(fn)
        def stream(*args, **kwargs):
            with _as_gradio_errors():
                yield from fn(*args, **kwargs)

        return stream

    @wraps(fn)
    def call(*args, **kwargs):
        with _as_gradio_errors():
            return fn(*args, **kwargs)

    return call
