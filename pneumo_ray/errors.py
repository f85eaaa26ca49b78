"""The errors a user can fix (bad flag, missing store, bad file name, bad bundle).

Jobs print these as one line and exit non-zero; anything else is a bug and keeps its traceback.
"""

from pneumo_ray.bundle import BundleError
from pneumo_ray.config import ConfigError
from pneumo_ray.data import StoreLayoutError
from pneumo_ray.labels import LabelError
from pneumo_ray.stores import StoreError

USER_ERRORS = (BundleError, ConfigError, LabelError, StoreError, StoreLayoutError)

__all__ = ["USER_ERRORS"]
