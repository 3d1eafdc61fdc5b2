"""What a run parameter may not change on a cluster: where the pipeline's Secrets go.

The compiled pipeline takes the whole config as one run parameter, so whoever starts a run could point
`tracking.tracking_uri` or `hub.endpoint` at a server of their own, and the MLflow login and Hub token that
the task pods hold would follow (or rename `hub.token_env`). `medtune compile` writes these fields of the
profile into every task pod's environment (MEDTUNE_PINNED: part of the compiled YAML, not a parameter), and
a step refuses a config that differs. kfp.local never sets it: it runs on the user's own machine, where no
cluster Secret exists and `medtune run` points the config at its local server.
"""

from __future__ import annotations

import json
import os

from medtune.config import Config

ENV = "MEDTUNE_PINNED"
FIELDS = ("tracking.tracking_uri", "hub.endpoint", "hub.token_env")


class PinnedFieldChanged(ValueError):
    """A run's config redirects a field fixed when the pipeline was compiled."""


def _get(cfg: Config, dotted: str):
    section, field = dotted.split(".")
    return getattr(getattr(cfg, section), field)


def of(cfg: Config) -> str:
    """The pinned fields of `cfg`, as the compiled pipeline carries them."""
    return json.dumps({name: _get(cfg, name) for name in FIELDS}, sort_keys=True)


def enforce(cfg: Config) -> Config:
    """`cfg` unchanged, or PinnedFieldChanged naming each field a run tried to redirect."""
    pinned = os.environ.get(ENV)
    if not pinned:
        return cfg
    changed = [f"{name}={_get(cfg, name)!r} (compiled: {value!r})" for name, value in json.loads(pinned).items()
               if _get(cfg, name) != value]
    if changed:
        raise PinnedFieldChanged("fixed when the pipeline was compiled, so that a run cannot send the cluster's "
                                 f"Secrets elsewhere: {'; '.join(changed)}; recompile from the profile to change "
                                 "them")
    return cfg
