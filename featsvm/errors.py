"""Every error featsvm reports to a user derives from `FeatsvmError`.

The command line turns a `FeatsvmError` into a one-line message and exit status 1 in one
place (`featsvm.cli.main`); anything else is a bug and keeps its traceback. Each subclass
also derives from the built-in exception it replaced, so `except ValueError` still works.
The message always says what went wrong and, where it can, what to do about it.
"""

from __future__ import annotations


class FeatsvmError(Exception):
    """Base class of all user-facing featsvm errors."""


class ConfigError(FeatsvmError, ValueError):
    """A configuration file or value that cannot be used (names file, section and key)."""


class ImageError(FeatsvmError):
    """An image file that cannot be used; the message says why."""


class ManifestError(FeatsvmError, ValueError):
    """A split manifest that is missing, malformed or inconsistent."""


class DeviceError(FeatsvmError, RuntimeError):
    """A device or precision that cannot be used here; the message says what to do."""


class WeightsError(FeatsvmError, RuntimeError):
    """Weights that cannot be found, verified or loaded; the message says what to do."""


class CacheError(FeatsvmError, RuntimeError):
    """A feature cache file that cannot be used; the message says what to do."""


class CacheLockedError(CacheError):
    """Another process is writing the same cache file."""


class StaleCacheError(CacheError):
    """A cache file made from different images or settings."""


class CacheFullError(CacheError):
    """The disk holding a feature cache is full; the message names the space needed."""


class CacheMissingError(CacheError):
    """No cache file for the requested features."""


class CoverageError(FeatsvmError, RuntimeError):
    """The feature cache lacks embeddings for some images of the split."""


class FinetuneError(FeatsvmError, RuntimeError):
    """A fine-tuning request that cannot run; the message says what to change."""


class RunRecordError(FeatsvmError):
    """A run folder that is incomplete, inconsistent or tampered with."""


class PredictError(FeatsvmError, RuntimeError):
    """A run that cannot be used for prediction; the message says what to do."""


class StudyError(FeatsvmError, RuntimeError):
    """The study cannot start (missing data, bad config); the message says what to do."""


class MissingInputError(FeatsvmError, FileNotFoundError):
    """A data folder, manifest or run folder that does not exist; says how to create it."""


class UsageError(FeatsvmError, ValueError):
    """An option value that cannot be used (unknown name, bad ratio, bad layer...)."""


class FitError(FeatsvmError, ValueError):
    """Training data that a head cannot be fitted on (too few groups, NaN features...)."""


class PreprocessingError(UsageError):
    """A preprocessing record that cannot be read or used (missing, bad or unknown key)."""


class ClusterError(FeatsvmError, RuntimeError):
    """A Ray worker that could not start or failed past its retries (the rows computed so far
    stay in the cache: the same command resumes)."""


class EnsembleError(FeatsvmError, ValueError):
    """Runs that cannot be combined into one ensemble (other kinds, images, split or folds);
    the message names the first difference."""
