"""Celery settings for ``celery -A bgtransfer worker``: all of them derive from BGTRANSFER_*
environment variables (see bgtransfer/_settings.py and bgtransfer/_celeryconf.py)."""

from bgtransfer._celeryconf import celery_config
from bgtransfer._settings import load

globals().update(celery_config(load()))
