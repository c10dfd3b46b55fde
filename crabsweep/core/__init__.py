"""The core: models, tasks, bases, interventions, observers, adapters, sessions.

Granularities defined outside core/ register here, so that any import of crabsweep.core makes them known
to the GRANULARITIES registry (config validation and make_basis look names up there).
"""

from ..dictionary import basis as _dictionary_basis  # noqa: E402,F401  (registers suppression=dictionary_feature)
