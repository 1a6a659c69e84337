import os

from hypothesis import settings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The default run draws the same Hypothesis examples every time, so a red CI is a
# regression, not a new draw; `HYPOTHESIS_PROFILE=explore python -m pytest` draws
# fresh ones (and a failure found there becomes an `@example`).
settings.register_profile("default", derandomize=True)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
